"""GPUs: reserved per deployment, handed to a process through CUDA_VISIBLE_DEVICES, none when NVML is missing."""

from __future__ import annotations

import sys
import types

import pytest

from agent.errors import ProvisionFailed
from agent.gpus import GpuAllocator, GpuDevice, cuda_env, nvml_devices, pci_bus_id
from miaas.identity import CONTROLLER
from miaas.testing import Pki

H100S = [GpuDevice(0, "0000:3b:00.0", "H100"), GpuDevice(1, "0000:5e:00.0", "H100"),
         GpuDevice(2, "0000:af:00.0", "H100")]


def test_gpus_are_reserved_lowest_first_and_released() -> None:
    gpus = GpuAllocator(lambda: H100S)
    assert [d.index for d in gpus.reserve("dep-a", 2)] == [0, 1]
    assert [d.index for d in gpus.reserve("dep-b", 1)] == [2]
    assert gpus.reserve("dep-c", 0) == []
    with pytest.raises(ProvisionFailed, match="needs 1 GPU"):
        gpus.reserve("dep-c", 1)
    assert gpus.release("dep-a") == [0, 1]
    assert gpus.release("dep-a") == []
    assert [d.index for d in gpus.reserve("dep-c", 2)] == [0, 1]
    assert gpus.held() == {0: "dep-c", 1: "dep-c", 2: "dep-b"}


def test_a_restarted_agent_holds_the_gpus_of_its_vms_again() -> None:
    gpus = GpuAllocator(lambda: H100S)
    assert [d.pci_bus_id for d in gpus.reserve_indexes("dep-vm", [2, 7])] == ["0000:af:00.0"]  # 7 is gone
    assert gpus.held() == {2: "dep-vm"}


def test_a_process_sees_only_its_gpus() -> None:
    assert cuda_env(H100S[1:], host_has_gpus=True) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                                                       "CUDA_VISIBLE_DEVICES": "1,2"}
    assert cuda_env([], host_has_gpus=True)["CUDA_VISIBLE_DEVICES"] == ""  # asked for none: sees none
    assert cuda_env([], host_has_gpus=False) == {}  # no GPU here: the environment is left alone


def test_nvml_bus_ids_become_libvirt_ones() -> None:
    assert pci_bus_id("00000000:3B:00.0") == "0000:3b:00.0"
    assert pci_bus_id("0001:AF:1F.7") == "0001:af:1f.7"
    with pytest.raises(ValueError):
        pci_bus_id("3B:00.0")


def fake_nvml(count: int, fail: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")

    def init() -> None:
        if fail:
            raise RuntimeError("NVML Shared Library Not Found")

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: count  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    module.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=f"00000000:{0x3B + h:02X}:00.0".encode())  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"  # type: ignore[attr-defined]
    return module


def test_gpus_are_found_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(2))
    found = nvml_devices()
    assert found == [GpuDevice(0, "0000:3b:00.0", "NVIDIA H100 80GB HBM3"),
                     GpuDevice(1, "0000:3c:00.0", "NVIDIA H100 80GB HBM3")]


def test_without_nvml_there_is_no_gpu_and_no_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(2, fail=True))
    assert nvml_devices() == []
    gpus = GpuAllocator()
    with pytest.raises(ProvisionFailed, match="this agent has 0"):
        gpus.reserve("dep", 1)


def test_the_process_runtime_hands_its_gpus_to_the_model(  # type: ignore[no-untyped-def]
    make_agent, settings, store, pki: Pki, eventually
) -> None:
    from agent.runtimes import build_runtimes

    # given an agent on a machine with three GPUs, one of them already held
    gpus = GpuAllocator(lambda: H100S)
    gpus.reserve("someone-else", 1)
    store.add("gpu-model", setup=["echo cuda=$CUDA_VISIBLE_DEVICES order=$CUDA_DEVICE_ORDER"],
              resources={"cpus": 1, "memory_mb": 256, "gpus": 2})
    app = make_agent(settings, runtimes=build_runtimes(settings, gpus))
    client = pki.client(app, CONTROLLER)

    # when a model asking for two GPUs is deployed
    client.post("/create-vm", json={"deployment_id": "dep-gpu", "model_id": "gpu-model", "version": 1})
    eventually(lambda: client.get("/deployments/dep-gpu").json["status"] == "running", 60, "dep-gpu running")

    # then it sees the two free ones, numbered as NVML numbers them, and gives them back when stopped
    assert "cuda=1,2 order=PCI_BUS_ID" in client.get("/deployments/dep-gpu/logs").text
    assert gpus.held() == {0: "someone-else", 1: "dep-gpu", 2: "dep-gpu"}
    client.post("/stop-vm", json={"deployment_id": "dep-gpu"})
    assert gpus.held() == {0: "someone-else"}
