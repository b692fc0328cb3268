"""The vagrant runtime through the agent's HTTP API, with a fake VM driver (the real one is tests/test_vm_deploy.py).

The fake's `vagrant up` reads the generated Vagrantfile and does what a VM would: the model answers on each
forwarded host port and writes to the model's output log. Its VMs outlive an agent, as real ones do.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from agent.app import create_app, parts
from agent.gpus import GpuAllocator, GpuDevice
from agent.runtimes.process import answers
from agent.runtimes.vagrant import OUTPUT_NAME, RECORD_NAME, VagrantRuntime, VmGuard
from agent.runtimes.vagrant_driver import VmError
from agent.runtimes.vagrantfile import EXIT_MARKER, VagrantConfig
from agent.runtimes.vmfirewall import FirewallError, VmBinding
from agent.runtimes.wheelhouse import Wheelhouse
from agent.settings import AgentSettings
from miaas.bus import DEPLOYMENT_EVENTS, MemoryBus
from miaas.identity import AGENT, CONTROLLER
from miaas.schemas import DeploymentEvent
from miaas.testing import Pki


@dataclass
class FakeVm:
    servers: list[ThreadingHTTPServer]
    output: Path


@dataclass
class FakeDriver:
    """VMs as HTTP servers on the forwarded ports; `mode` makes `up` fail or hang."""

    mode: str = "ok"
    vms: dict[str, FakeVm] = field(default_factory=dict)
    ups: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    cancelled: list[Path] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def up(self, folder: Path, log_path: Path) -> None:
        vagrantfile = (folder / "Vagrantfile").read_text()
        domain = re.search(r'config\.vm\.define "([^"]+)"', vagrantfile)[1]  # type: ignore[index]
        self.ups.append(domain)
        with log_path.open("a") as log:
            log.write(f"==> {domain}: Starting domain.\n==> {domain}: Running provisioner: miaas (shell)...\n")
        if self.mode == "fail":
            with log_path.open("a") as log:
                log.write(f"    {domain}: [provision] error: cannot mount 192.168.121.1:/models (fake)\n")
            raise VmError("vagrant up failed with exit code 1")
        if self.mode == "hang":
            self.release.wait(30)
            raise VmError("vagrant up was killed")
        output = Path(re.findall(r':path => "([^"]+)"', vagrantfile)[1])
        ports = [int(p) for p in re.findall(r"host: (\d+), host_ip", vagrantfile)]
        self.vms[domain] = FakeVm([serve_model(port, output) for port in ports], output)
        with output.open("a") as out:
            out.write(f"fake model of {domain} listening\n")

    def cancel(self, folder: Path) -> None:
        self.cancelled.append(folder)
        self.release.set()

    def destroy(self, folder: Path, domain: str, log_path: Path) -> None:
        vm = self.vms.pop(domain, None)
        if vm is not None:
            for server in vm.servers:
                server.shutdown()
                server.server_close()
            self.destroyed.append(domain)

    def state(self, domain: str) -> str | None:
        return "running" if domain in self.vms else None

    def address(self, domain: str, network: str) -> VmBinding | None:
        if domain not in self.vms:
            return None
        number = sorted(self.vms).index(domain) + 2
        return VmBinding.of(f"vnet{number}", f"52:54:00:00:00:{number:02x}", f"192.168.121.{number}")

    def ensure_network(self, name: str, network: str) -> str:
        return "virbr1"

    def close(self) -> None:
        for domain in list(self.vms):
            self.destroy(Path("."), domain, Path("/dev/null"))


def serve_model(port: int, output: Path) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = b'{"model": "in a fake VM"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            with output.open("a") as out:
                out.write(f"served {self.path}\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def driver() -> Iterator[FakeDriver]:
    fake = FakeDriver()
    yield fake
    fake.release.set()
    fake.close()


@pytest.fixture
def vm_settings(settings: AgentSettings, workdir: Path) -> AgentSettings:
    return settings.model_copy(update={
        "runtimes": ["vagrant"], "model_store": workdir / "store", "wheelhouse_dir": workdir / "wheels",
        "provision_timeout_s": 20.0, "port_range": "27000-27099",
    })


@pytest.fixture
def vm_agent(models: Any, bus: MemoryBus, driver: FakeDriver, pki: Pki) -> Iterator[Callable[..., Flask]]:
    """Agent apps whose vagrant runtime drives the fake, each with a credential of its own; each is shut down after
    the test."""
    apps: list[Flask] = []

    def make(settings: AgentSettings, gpus: GpuAllocator | None = None, guard: VmGuard | None = None) -> Flask:
        runtime = VagrantRuntime(
            VagrantConfig(acceleration="tcg"), driver=driver, wheelhouse=Wheelhouse(settings.wheelhouse_dir),
            model_store=settings.model_store, state_dir=settings.state_dir.absolute(), gpus=gpus,
            provision_timeout_s=settings.provision_timeout_s, guard=guard,
        )
        cred = pki.credential(settings.agent_id, AGENT)
        app = create_app(settings, bus, credential=lambda: cred, fetch_model=models, runtimes={"vagrant": runtime})
        apps.append(app)
        return app

    yield make
    for app in apps:
        parts(app).shutdown()


def http(app: Flask, pki: Pki) -> Any:
    """A test client of the agent signing as the controller."""
    return pki.client(app, CONTROLLER)


def statuses(bus: MemoryBus, deployment_id: str) -> list[str]:
    return [m.status.value for m in bus.on(DEPLOYMENT_EVENTS)
            if isinstance(m, DeploymentEvent) and m.deployment_id == deployment_id]


def create(client: Any, deployment_id: str, model_id: str) -> dict[str, Any]:
    created = client.post("/create-vm", json={"deployment_id": deployment_id, "model_id": model_id, "version": 1,
                                              "runtime": "vagrant"})
    assert created.status_code == 202, created.json
    return created.json  # type: ignore[no-any-return]


def settled(client: Any, deployment_id: str, eventually: Any) -> dict[str, Any]:
    return eventually(  # type: ignore[no-any-return]
        lambda: (d := client.get(f"/deployments/{deployment_id}").json)["status"] != "provisioning" and d,
        30, f"{deployment_id} to leave provisioning",
    )


def test_a_model_runs_in_its_vm_answers_on_forwarded_ports_logs_and_is_destroyed(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, bus, pki, eventually
) -> None:
    # given a model with two named ports on the store
    store.add("tiny", ports={"api": 5000, "ui": 8501})
    agent = vm_agent(vm_settings)
    client = http(agent, pki)

    # when it is deployed with the vagrant runtime
    body = create(client, "dep-v1", "tiny")

    # then its VM is made from a generated Vagrantfile, one forwarded port per meta.json port on allocated ports
    running = settled(client, "dep-v1", eventually)
    assert running["status"] == "running", running
    folder = vm_settings.state_dir / "dep-v1" / "vm"
    vagrantfile = (folder / "Vagrantfile").read_text()
    assert f"guest: 5000, guest_ip: \"127.0.0.1\", host: {body['ports']['api']}" in vagrantfile
    assert f"guest: 8501, guest_ip: \"127.0.0.1\", host: {body['ports']['ui']}" in vagrantfile
    assert body["port"] == body["ports"]["api"] != body["ports"]["ui"]
    assert set(parts(agent).manager.ports.held()) == {body["ports"]["api"], body["ports"]["ui"]}
    assert (folder / "provision.sh").is_file() and (folder / RECORD_NAME).is_file()
    assert answers(body["port"], "/health")
    assert driver.ups == ["miaas-dep-v1"]

    # and the logs route shows provisioning and the model's own output, and follows new lines as a stream
    logs = client.get("/deployments/dep-v1/logs?tail=50").text
    assert "vagrant up (box miaas/debian12" in logs and "Running provisioner: miaas" in logs
    assert "fake model of miaas-dep-v1 listening" in logs and "served /health" in logs
    followed = client.get("/deployments/dep-v1/logs?tail=1&follow=true&max_s=3", buffered=False)
    assert followed.headers["Content-Type"].startswith("text/plain")
    chunks = iter(followed.response)
    assert b"served /health" in next(chunks)  # the tail comes first
    answers(body["ports"]["ui"], "/from-the-follow-test")
    streamed = b"".join(chunks)  # then what is written until max_s
    followed.close()
    assert b"served /from-the-follow-test" in streamed

    # when it is stopped
    stopped = client.post("/stop-vm", json={"deployment_id": "dep-v1"})

    # then the VM is destroyed, its folder removed, its ports freed, and the events went out in order
    assert (stopped.status_code, stopped.json["status"]) == (200, "stopped")
    assert driver.destroyed == ["miaas-dep-v1"]
    assert not folder.exists()
    assert not answers(body["port"], None)
    assert parts(agent).manager.ports.held() == {}
    assert statuses(bus, "dep-v1") == ["provisioning", "running", "stopping", "stopped"]
    assert "served /health" in client.get("/deployments/dep-v1/logs").text  # logs outlive the VM


def test_a_failed_vagrant_up_fails_with_the_log_tail_and_cleans_up(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, bus, pki, eventually
) -> None:
    store.add("tiny")
    driver.mode = "fail"
    client = http(vm_agent(vm_settings), pki)
    body = create(client, "dep-v2", "tiny")

    failed = settled(client, "dep-v2", eventually)

    assert failed["status"] == "failed"
    assert failed["reason"].startswith("vagrant up failed with exit code 1; last log lines:")
    assert "cannot mount 192.168.121.1:/models (fake)" in failed["reason"]
    assert not (vm_settings.state_dir / "dep-v2" / "vm").exists()
    assert parts(client.application).manager.ports.held() == {}
    assert not answers(body["port"], None)
    assert statuses(bus, "dep-v2") == ["provisioning", "failed"]


def test_provisioning_past_its_timeout_is_killed_and_fails(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, pki, eventually
) -> None:
    store.add("tiny")
    driver.mode = "hang"
    client = http(vm_agent(vm_settings.model_copy(update={"provision_timeout_s": 1.0})), pki)
    create(client, "dep-v3", "tiny")

    failed = settled(client, "dep-v3", eventually)

    assert failed["status"] == "failed"
    assert "vagrant up did not finish within the provisioning timeout of 1 s" in failed["reason"]
    assert driver.cancelled, "the hanging vagrant up was not killed"
    assert not (vm_settings.state_dir / "dep-v3" / "vm").exists()
    assert parts(client.application).manager.ports.held() == {}


def test_a_stop_during_provisioning_kills_vagrant_up_and_stops(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, bus, pki, eventually
) -> None:
    store.add("tiny")
    driver.mode = "hang"
    client = http(vm_agent(vm_settings), pki)
    create(client, "dep-v4", "tiny")
    eventually(lambda: driver.ups, 10, "vagrant up to start")

    stopped = client.post("/stop-vm", json={"deployment_id": "dep-v4"})

    assert stopped.json["status"] == "stopped"
    assert driver.cancelled
    assert not (vm_settings.state_dir / "dep-v4" / "vm").exists()
    assert statuses(bus, "dep-v4") == ["provisioning", "stopping", "stopped"]


def test_a_model_that_dies_in_its_vm_is_restarted_in_place_in_a_new_vm(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, pki, bus, eventually
) -> None:
    store.add("tiny")
    client = http(vm_agent(vm_settings.model_copy(update={"health_interval_s": 0.1, "restart_delay_s": 0})), pki)
    first = create(client, "dep-v9", "tiny")
    assert settled(client, "dep-v9", eventually)["status"] == "running"

    output = vm_settings.state_dir / "dep-v9" / OUTPUT_NAME
    with output.open("a") as out:
        out.write("Traceback: out of memory\n" + EXIT_MARKER + " exit-code, exited 1\n")

    again = eventually(lambda: (d := client.get("/deployments/dep-v9").json)["restarts"] == 1
                       and d["health"] == "passing" and d, 30, "dep-v9 restarted")
    assert (again["status"], again["port"], again["url"]) == ("running", first["port"], first["url"])
    assert "the model stopped by itself (exit-code, exited 1)" in again["last_restart_reason"]
    assert (driver.ups, driver.destroyed) == (["miaas-dep-v9", "miaas-dep-v9"], ["miaas-dep-v9"])
    assert EXIT_MARKER in (vm_settings.state_dir / "dep-v9" / f"{OUTPUT_NAME}.1").read_text()  # the last VM's
    assert statuses(bus, "dep-v9") == ["provisioning", "running"]


def test_a_model_that_dies_in_its_vm_fails_and_the_vm_is_destroyed(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, pki, eventually
) -> None:
    store.add("tiny")
    # with AGENT_RESTART_ATTEMPTS=0: by default it is restarted in place (above)
    client = http(vm_agent(vm_settings.model_copy(update={"restart_attempts": 0})), pki)
    create(client, "dep-v5", "tiny")
    assert settled(client, "dep-v5", eventually)["status"] == "running"

    # the VM's systemd writes this line on the model's output when the model's service ends
    output = vm_settings.state_dir / "dep-v5" / OUTPUT_NAME
    with output.open("a") as out:
        out.write("Traceback: out of memory\n" + EXIT_MARKER + " exit-code, exited 1\n")

    failed = client.get("/deployments/dep-v5").json
    assert failed["status"] == "failed"
    assert "the model stopped by itself (exit-code, exited 1)" in failed["reason"]
    assert "Traceback: out of memory" in failed["reason"]
    assert driver.destroyed == ["miaas-dep-v5"]


def test_a_version_that_does_not_match_its_manifest_never_reaches_vagrant(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, pki, eventually
) -> None:
    folder = store.add("tampered", manifest=True)
    (folder / "app.py").write_text("print('not what was uploaded')\n")
    client = http(vm_agent(vm_settings), pki)
    create(client, "dep-v6", "tampered")

    failed = settled(client, "dep-v6", eventually)

    assert failed["status"] == "failed"
    assert "app.py does not match its MANIFEST.json entry" in failed["reason"]
    assert driver.ups == []


def test_a_version_outside_the_model_store_is_refused(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, pki, eventually, workdir
) -> None:
    store.add("tiny")
    client = http(vm_agent(vm_settings.model_copy(update={"model_store": workdir / "elsewhere"})), pki)
    create(client, "dep-v7", "tiny")

    failed = settled(client, "dep-v7", eventually)

    assert failed["status"] == "failed"
    assert "is not under the model store" in failed["reason"] and "MODEL_STORE" in failed["reason"]
    assert driver.ups == []


def test_a_restarted_agent_adopts_its_running_vms_without_launching_them_again(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, bus, pki, eventually
) -> None:
    # given an agent that runs a VM and exits without stopping its deployments
    store.add("tiny", ports={"api": 5000})
    keep = vm_settings.model_copy(update={"stop_deployments_on_exit": False})
    first = http(vm_agent(keep), pki)
    body = create(first, "dep-r1", "tiny")
    assert settled(first, "dep-r1", eventually)["status"] == "running"
    parts(first.application).shutdown()

    # when a new agent starts on the same state folder
    second = http(vm_agent(keep), pki)

    # then it holds the deployment again: running, same URL and port, port held, the VM not launched twice
    found = second.get("/deployments/dep-r1").json
    assert (found["status"], found["url"], found["port"]) == ("running", body["url"], body["port"])
    assert parts(second.application).manager.ports.held() == {body["port"]: "dep-r1"}
    again = second.post("/create-vm", json={"deployment_id": "dep-r1", "model_id": "tiny", "version": 1,
                                            "runtime": "vagrant"})
    assert again.status_code == 202 and again.json["status"] == "running"
    assert driver.ups == ["miaas-dep-r1"]
    assert "found VM miaas-dep-r1 running, adopted it" in second.get("/deployments/dep-r1/logs").text
    assert answers(body["port"], "/health")

    # and it can stop it: the VM is destroyed
    assert second.post("/stop-vm", json={"deployment_id": "dep-r1"}).json["status"] == "stopped"
    assert driver.destroyed == ["miaas-dep-r1"]
    assert not (vm_settings.state_dir / "dep-r1" / "vm").exists()


def test_a_restarted_agent_destroys_a_vm_caught_mid_provisioning(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, bus, pki, eventually
) -> None:
    # given a VM folder left in the provisioning phase (its agent died during vagrant up) and its VM up
    store.add("tiny")
    keep = vm_settings.model_copy(update={"stop_deployments_on_exit": False})
    first = http(vm_agent(keep), pki)
    create(first, "dep-r2", "tiny")
    assert settled(first, "dep-r2", eventually)["status"] == "running"
    parts(first.application).shutdown()
    record = vm_settings.state_dir / "dep-r2" / "vm" / RECORD_NAME
    record.write_text(record.read_text().replace('"phase": "running"', '"phase": "provisioning"'))

    # when a new agent starts
    second = http(vm_agent(keep), pki)

    # then that VM is destroyed (no orphan) and the deployment reported failed, with why
    found = second.get("/deployments/dep-r2").json
    assert found["status"] == "failed"
    assert "the agent restarted and it was still provisioning" in found["reason"]
    assert driver.destroyed == ["miaas-dep-r2"]
    assert not record.parent.exists()
    assert parts(second.application).manager.ports.held() == {}
    assert statuses(bus, "dep-r2")[-1] == "failed"


def test_gpus_are_reserved_passed_through_and_released(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, pki, eventually
) -> None:
    gpus = GpuAllocator(lambda: [GpuDevice(0, "0000:3b:00.0", "H100"), GpuDevice(1, "0000:af:00.0", "H100")])
    store.add("big", resources={"cpus": 2, "memory_mb": 1024, "gpus": 1})
    store.add("bigger", resources={"cpus": 2, "memory_mb": 1024, "gpus": 2})
    client = http(vm_agent(vm_settings, gpus), pki)

    create(client, "dep-g1", "big")
    assert settled(client, "dep-g1", eventually)["status"] == "running"
    vagrantfile = (vm_settings.state_dir / "dep-g1" / "vm" / "Vagrantfile").read_text()
    assert 'libvirt.pci :domain => "0x0000", :bus => "0x3b", :slot => "0x00", :function => "0x0"' in vagrantfile
    assert gpus.held() == {0: "dep-g1"}

    create(client, "dep-g2", "bigger")  # needs 2, only 1 left
    failed = settled(client, "dep-g2", eventually)
    assert failed["status"] == "failed" and "needs 2 GPU(s); this agent has 2, 1 of them held" in failed["reason"]

    client.post("/stop-vm", json={"deployment_id": "dep-g1"})
    assert gpus.held() == {}


@dataclass
class FakeFirewall:
    """Records what the runtime installs (the real rules: test_agent_vmfirewall*.py); `broken` makes nft fail."""

    applied: list[tuple[str, list[str]]] = field(default_factory=list)
    removed: int = 0
    broken: bool = False

    def apply(self, config: Any, bindings: Any) -> None:
        if self.broken:
            raise FirewallError("nft refused the VMs' firewall: Operation not permitted (fake)")
        self.applied.append((config.bridge, sorted(str(b.ip) for b in bindings)))

    def remove(self, table: str = "miaas_vms") -> None:
        self.removed += 1


def test_a_vm_gets_its_own_exports_bound_to_its_address_in_the_firewall_and_loses_them_at_stop(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, pki, eventually
) -> None:
    # given an agent with the VMs' firewall, and a model with requirements (a wheel file next to it)
    from test_agent_wheelhouse import make_wheel  # noqa: PLC0415 - a helper of the wheelhouse tests

    folder = store.add("tiny")
    wheel = make_wheel(folder)
    (folder / "requirements.txt").write_text(f"{wheel}\n")
    firewall = FakeFirewall()
    agent = vm_agent(vm_settings, guard=VmGuard(firewall, nfs_servers=("192.168.121.1",)))  # type: ignore[arg-type]
    client = http(agent, pki)
    assert firewall.applied == [("virbr1", [])]  # installed at agent start, before any VM

    # when it is deployed
    create(client, "dep-x1", "tiny")
    assert settled(client, "dep-x1", eventually)["status"] == "running"

    # then its VM's address is bound in the firewall, and only its own folders are exported, to that address only
    assert firewall.applied[-1] == ("virbr1", ["192.168.121.2"])
    exports = (vm_settings.state_dir.absolute() / ".vm-exports.conf").read_text()
    assert exports.count("EXPORT {") == 2
    assert f'Path = "{folder.resolve()}";' in exports and 'Pseudo = "/miaas/dep-x1/app";' in exports
    assert 'Pseudo = "/miaas/dep-x1/wheels";' in exports and str(vm_settings.wheelhouse_dir) in exports
    assert exports.count("Clients = 192.168.121.2;") == 2
    provision = (vm_settings.state_dir / "dep-x1" / "vm" / "provision.sh").read_text()
    assert "mount_ro 192.168.121.1:/miaas/dep-x1/app /app" in provision
    assert "mount_ro 192.168.121.1:/miaas/dep-x1/wheels /wheels" in provision
    assert "the VM is 192.168.121.2 (port vnet2" in client.get("/deployments/dep-x1/logs").text

    # when it is stopped, its exports and its binding go with its VM
    client.post("/stop-vm", json={"deployment_id": "dep-x1"})
    assert "EXPORT {" not in (vm_settings.state_dir.absolute() / ".vm-exports.conf").read_text()
    assert firewall.applied[-1] == ("virbr1", [])
    # and at agent exit, with no VM left, the firewall is removed
    parts(agent).shutdown()
    agent.extensions["agent"].manager.runtimes["vagrant"].close()
    assert firewall.removed == 1


def test_without_its_firewall_no_vm_is_started(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, pki, eventually
) -> None:
    store.add("tiny")
    client = http(vm_agent(vm_settings, guard=VmGuard(FakeFirewall(broken=True), nfs_servers=("192.168.121.1",))),
                  pki)
    create(client, "dep-x2", "tiny")
    failed = settled(client, "dep-x2", eventually)
    assert failed["status"] == "failed"
    assert failed["reason"].startswith("the VMs' firewall could not be installed, so no VM is started: nft refused")
    assert driver.ups == []


def test_a_requirement_with_no_wheel_refuses_the_deployment_by_name_and_runs_no_build_code(  # type: ignore[no-untyped-def]
    vm_agent, vm_settings, store, driver, pki, eventually, monkeypatch, tmp_path
) -> None:
    # given a package index (a folder) where the model's requirement exists only as an sdist whose setup.py
    # would write a marker file
    from test_agent_wheels_only import make_sdist  # noqa: PLC0415 - the trap of the wheelhouse tests

    index, marker = tmp_path / "index", tmp_path / "MARKER-setup-py-ran"
    index.mkdir()
    make_sdist(index, marker)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    store.add("tiny", requirements="trapped==1.0\n")
    client = http(vm_agent(vm_settings), pki)

    # when it is deployed
    create(client, "dep-x3", "tiny")
    failed = settled(client, "dep-x3", eventually)

    # then it fails naming the requirement, before any VM, and no package code ran on the host
    assert failed["status"] == "failed"
    assert failed["reason"].startswith("trapped==1.0 has no binary wheel for cp311/manylinux_2_36_x86_64"), failed
    assert "ship a wheel or pin a version that has one" in failed["reason"]
    assert not marker.exists()
    assert driver.ups == []
