"""The GPUs of this machine and which deployment holds each: runtimes reserve them for `resources.gpus`.

The process runtime hands a model the GPUs it reserved through CUDA_VISIBLE_DEVICES; the vagrant runtime passes
them through to the VM by PCI address. GPUs are found through NVML once, on first use; any NVML failure (no
library, no driver) means a machine without GPUs, never a crash.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.errors import ProvisionFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuDevice:
    index: int
    """NVML's index, which is CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID."""
    pci_bus_id: str
    """'0000:3b:00.0'."""
    name: str = ""


def nvml_devices() -> list[GpuDevice]:
    """Every GPU NVML sees, by index; none when NVML is missing or fails."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no library, no driver, NVMLError: all mean no GPU
        log.info("no GPUs to reserve: NVML unavailable (%s: %s)", exc.__class__.__name__, exc)
        return []
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            bus_id = pynvml.nvmlDeviceGetPciInfo(handle).busId
            name = pynvml.nvmlDeviceGetName(handle)
            found.append(GpuDevice(index, pci_bus_id(_text(bus_id)), _text(name)))
        return found
    except Exception as exc:  # noqa: BLE001 - a GPU that cannot be read cannot be reserved
        log.warning("listing GPUs failed (%s: %s); reserving none", exc.__class__.__name__, exc)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a broken NVML is not our problem
            log.debug("nvmlShutdown failed", exc_info=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def pci_bus_id(nvml_bus_id: str) -> str:
    """NVML's '00000000:3B:00.0' → '0000:3b:00.0' (the form of sysfs and libvirt)."""
    bus_slot = nvml_bus_id.strip().split(":")
    if len(bus_slot) != 3:
        raise ValueError(f"not a PCI bus id: {nvml_bus_id!r}")
    domain, bus, slot_function = bus_slot
    return f"{int(domain, 16):04x}:{bus.lower()}:{slot_function.lower()}"


class GpuAllocator:
    """Hands out this machine's GPUs to deployments (owners); a GPU is held by at most one. Thread-safe."""

    def __init__(self, devices: Callable[[], Sequence[GpuDevice]] = nvml_devices) -> None:
        self._list_devices = devices
        self._devices: list[GpuDevice] | None = None
        self._held: dict[int, str] = {}
        self._lock = threading.Lock()

    def devices(self) -> list[GpuDevice]:
        with self._lock:
            return list(self._known())

    def _known(self) -> list[GpuDevice]:
        if self._devices is None:
            self._devices = sorted(self._list_devices(), key=lambda d: d.index)
        return self._devices

    def reserve(self, owner: str, count: int) -> list[GpuDevice]:
        """`count` free GPUs for owner (the lowest indexes first), or ProvisionFailed; 0 is an empty list."""
        if count <= 0:
            return []
        with self._lock:
            known = self._known()
            free = [d for d in known if d.index not in self._held]
            if len(free) < count:
                raise ProvisionFailed(
                    f"the model needs {count} GPU(s); this agent has {len(known)}, "
                    f"{len(known) - len(free)} of them held by other deployments"
                )
            chosen = free[:count]
            for device in chosen:
                self._held[device.index] = owner
            return chosen

    def reserve_indexes(self, owner: str, indexes: Sequence[int]) -> list[GpuDevice]:
        """Hold these GPUs for owner again (a deployment found after a restart); unknown indexes are skipped."""
        with self._lock:
            by_index = {d.index: d for d in self._known()}
            chosen = [by_index[i] for i in indexes if i in by_index and self._held.get(i, owner) == owner]
            for device in chosen:
                self._held[device.index] = owner
            return chosen

    def release(self, owner: str) -> list[int]:
        """Give back every GPU of owner; releasing twice is harmless."""
        with self._lock:
            indexes = [i for i, o in self._held.items() if o == owner]
            for index in indexes:
                del self._held[index]
            return indexes

    def held(self) -> dict[int, str]:
        with self._lock:
            return dict(self._held)


def cuda_env(reserved: Sequence[GpuDevice], *, host_has_gpus: bool) -> dict[str, str]:
    """What a process sees of the GPUs: the reserved ones only (none when it reserved none on a GPU host)."""
    if not reserved and not host_has_gpus:
        return {}
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(d.index) for d in reserved),
    }
