"""The files of a VM deployment, generated from meta.json: pinned by golden files, and valid for Vagrant itself.

After a deliberate change, rewrite the golden files with
`MIAAS_UPDATE_GOLDEN=1 pytest agent/tests/test_agent_vagrantfile.py` and review their diff.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.gpus import pci_bus_id
from agent.runtimes.vagrantfile import (
    PciAddress,
    VagrantConfig,
    VmPlan,
    domain_name,
    plan_vm,
    rb,
    render_provision,
    render_vagrantfile,
)
from agent.vmhost import INSTALL
from miaas.schemas import PackageMeta

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# A GPU model: no named port, fractional CPUs, two GPUs, commands that need quoting.
GPU_META = PackageMeta(
    setup_commands=["echo \"setting up $MIAAS_MODEL_ID\" 'in /app'", "python3 -c 'import sys; print(sys.prefix)'"],
    start_commands=["export TORCH_HOME=$MIAAS_WORKDIR", "exec python3 serve.py --port \"$PORT\""],
    resources={"cpus": 3.5, "memory_mb": 8192, "gpus": 2},
    health_path="/healthz",
)


def iris_plan() -> VmPlan:
    """The example model on an agent without KVM (TCG), its requirements from a wheelhouse."""
    meta = PackageMeta.model_validate_json((ROOT / "examples" / "iris" / "meta.json").read_text())
    return plan_vm(
        deployment_id="d-0123abcd", model_id="m-5f2a9c", version=3, ports=meta.ports, host_ports={"http": 20017},
        primary_host_port=20017, cpus=meta.resources.cpus, memory_mb=meta.resources.memory_mb,
        setup_commands=meta.setup_commands, start_commands=meta.start_commands, health_path=meta.health_path,
        with_wheels=True, config=VagrantConfig(acceleration="tcg"),
        console_log=Path("/var/lib/miaas/agent/d-0123abcd/console.log"),
        output_log=Path("/var/lib/miaas/agent/d-0123abcd/model-output.log"),
    )


def gpu_plan() -> VmPlan:
    """A GPU model on a KVM host: two GPUs passed through, another VM network, no requirements."""
    config = VagrantConfig(acceleration="kvm", nfs_server="10.10.0.1", nfs_options="vers=4.2,hard",
                           forward_host_ip="10.0.0.7", box="miaas/debian12-gpu", network_name="miaas-vms",
                           network="10.10.0.0/24")
    gpus = tuple(PciAddress.parse(pci_bus_id(bus)) for bus in ("00000000:3B:00.0", "00000000:AF:00.0"))
    return plan_vm(
        deployment_id="d-gpu", model_id="m-llm", version=12, ports={}, host_ports={}, primary_host_port=21000,
        cpus=GPU_META.resources.cpus, memory_mb=GPU_META.resources.memory_mb,
        setup_commands=GPU_META.setup_commands, start_commands=GPU_META.start_commands,
        health_path=GPU_META.health_path, with_wheels=False, config=config,
        console_log=Path("/srv/agent/d-gpu/console.log"), output_log=Path("/srv/agent/d-gpu/model-output.log"),
        extra_env={"HF_HUB_OFFLINE": "1"}, gpus=gpus,
    )


CASES = {"iris-tcg": iris_plan, "gpu-kvm": gpu_plan}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MIAAS_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"no golden file {path}: run with MIAAS_UPDATE_GOLDEN=1 once and review it"
    assert text == path.read_text(), f"{name} differs from its golden file (MIAAS_UPDATE_GOLDEN=1 rewrites it)"


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_vagrantfile_matches_its_golden_file(case: str) -> None:
    check_golden(f"{case}.Vagrantfile", render_vagrantfile(CASES[case]()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_provisioning_script_matches_its_golden_file(case: str) -> None:
    check_golden(f"{case}.provision.sh", render_provision(CASES[case]()))


def test_resources_ports_and_mounts_come_from_meta_json() -> None:
    plan = iris_plan()
    assert plan.domain == domain_name("d-0123abcd") == "miaas-d-0123abcd"
    assert (plan.cpus, plan.memory_mb) == (1, 512)  # 0.5 CPU rounds up; 256 MB is raised to the VM floor
    assert [(f.name, f.guest, f.host) for f in plan.forwards] == [("http", 5000, 20017)]
    assert plan.env["PORT"] == plan.env["MIAAS_PORT_HTTP"] == "5000"  # the model listens on its meta.json port
    # each mount is an export of this deployment alone (vmexports.py), never the store or the wheelhouse root
    assert plan.app.source == "192.168.121.1:/miaas/d-0123abcd/app"
    assert plan.wheels is not None and plan.wheels.source == "192.168.121.1:/miaas/d-0123abcd/wheels"
    assert plan.env["PIP_NO_INDEX"] == "1" and plan.env["PIP_FIND_LINKS"] == "/wheels"
    gpu = gpu_plan()
    assert (gpu.cpus, gpu.memory_mb) == (4, 8192)
    assert [(f.guest, f.host) for f in gpu.forwards] == [(8000, 21000)]  # no port named: 8000 in the VM
    assert gpu.gpus == (PciAddress(0, 0x3B, 0, 0), PciAddress(0, 0xAF, 0, 0))
    assert gpu.wheels is None and "PIP_FIND_LINKS" not in gpu.env
    assert gpu.env["HF_HUB_OFFLINE"] == "1"


def test_gpus_are_passed_through_by_pci_address() -> None:
    text = render_vagrantfile(gpu_plan())
    assert 'libvirt.pci :domain => "0x0000", :bus => "0x3b", :slot => "0x00", :function => "0x0"' in text
    assert 'libvirt.pci :domain => "0x0000", :bus => "0xaf", :slot => "0x00", :function => "0x0"' in text
    assert "libvirt.pci" not in render_vagrantfile(iris_plan())


def test_tcg_or_kvm_is_chosen_by_settings() -> None:
    tcg, kvm = render_vagrantfile(iris_plan()), render_vagrantfile(gpu_plan())
    assert 'libvirt.driver = "qemu"' in tcg and 'libvirt.cpu_model = "Nehalem"' in tcg
    assert 'libvirt.driver = "kvm"' in kvm and 'libvirt.cpu_mode = "host-passthrough"' in kvm


def test_ruby_strings_cannot_interpolate() -> None:
    assert rb('a"b#{`id`}\\') == '"a\\"b\\#{`id`}\\\\"'


@pytest.mark.parametrize("bad", ["../d-other", "d/../../etc", "d e"])
def test_a_deployment_id_never_names_another_export(bad: str) -> None:
    with pytest.raises(ValueError):
        plan_vm(deployment_id=bad, model_id="m", version=1, ports={}, host_ports={}, primary_host_port=20000, cpus=1,
                memory_mb=512, setup_commands=["true"], start_commands=["true"], health_path=None,
                with_wheels=False, config=VagrantConfig(), console_log=Path("/c"), output_log=Path("/o"))


def test_the_vms_network_is_the_agents_and_vagrant_keeps_it() -> None:
    text = render_vagrantfile(gpu_plan())
    assert 'libvirt.management_network_name = "miaas-vms"' in text
    assert 'libvirt.management_network_address = "10.10.0.0/24"' in text
    assert "libvirt.management_network_keep = true" in text


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_provisioning_script_is_valid_bash(case: str, tmp_path: Path) -> None:
    script = tmp_path / "provision.sh"
    script.write_text(render_provision(CASES[case]()))
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_vagrant_validates_the_generated_vagrantfile(case: str, tmp_path: Path) -> None:
    if shutil.which("vagrant") is None or not list(Path("/usr/share/rubygems-integration/all/gems").glob(
            "vagrant-libvirt-*")):
        pytest.skip(f"vagrant and vagrant-libvirt are not installed; install: {INSTALL}")
    plan = CASES[case]()
    (tmp_path / "Vagrantfile").write_text(render_vagrantfile(plan))
    (tmp_path / "provision.sh").write_text(render_provision(plan))
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "vagrant-home"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    result = subprocess.run(["vagrant", "validate"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_the_golden_files_are_the_only_ones() -> None:
    expected = {f"{case}.{kind}" for case in CASES for kind in ("Vagrantfile", "provision.sh")}
    assert {p.name for p in GOLDEN.iterdir()} == expected
