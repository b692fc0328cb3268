"""The vagrant runtime: each deployment in its own VM, made by Vagrant (libvirt provider) from the model's meta.json.

Per deployment, under `<state dir>/<deployment id>/`:
    vm/Vagrantfile, vm/provision.sh   generated (vagrantfile.py), with vm/deployment.json: what the agent knows
                                      of it, so a restarted agent finds the VM again
    model.log                         the agent's notes and the output of `vagrant up` (provisioning)
    model-output.log                  the model's stdout and stderr (the VM's second serial port)
    console.log                       the VM's console (boot messages), for diagnosis

Provisioning (`start`, on the manager's background thread, bounded by the provisioning timeout): wheelhouse of
requirements.txt on the host (binary wheels only), the VMs' network and firewall (vmfirewall.py), the files above,
`vagrant up` (boot, NFS mounts, virtualenv, setup commands, the model's systemd service), then the forwarded port
must answer (GET health_path → 2xx when there is one). While `vagrant up` boots the VM, the agent learns its
address from libvirt's DHCP lease, binds it to the VM's bridge port and MAC in the firewall, and only then exports
the deployment's version folder and wheelhouse to that address alone (vmexports.py); the provisioner waits for them.
Any failure destroys the VM, drops its exports and binding and removes vm/; `stop` cancels a provisioning in flight
the same way.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent.errors import ProvisionCancelled, ProvisionFailed
from agent.gpus import GpuAllocator, GpuDevice
from agent.logtail import clean_line, tail_lines
from agent.runtimes.base import DeploymentSpec, RecoveredDeployment, RuntimeState
from agent.runtimes.process import answers
from agent.runtimes.vagrant_driver import VmDriver, VmError
from agent.runtimes.vagrantfile import (
    EXIT_MARKER,
    PciAddress,
    VagrantConfig,
    domain_name,
    plan_vm,
    render_provision,
    render_vagrantfile,
)
from agent.runtimes.vmexports import Export, ExportError, VmExports
from agent.runtimes.vmfirewall import FirewallError, NftFirewall, VmBinding, firewall_config
from agent.runtimes.wheelhouse import Wheelhouse
from miaas.schemas import DeploymentStatus, PackageMeta

log = logging.getLogger(__name__)

LOG_NAME = "model.log"
OUTPUT_NAME = "model-output.log"
CONSOLE_NAME = "console.log"
VM_FOLDER = "vm"
RECORD_NAME = "deployment.json"
REASON_LINES = 20
_POLL_S = 0.5
_ADDRESS_POLL_S = 1.0


@dataclass
class _Vm:
    """What the runtime keeps of one deployment's VM."""

    spec: DeploymentSpec
    gpus: list[GpuDevice] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    up_thread: threading.Thread | None = None
    binding: VmBinding | None = None
    """The VM's port, MAC and address on the VM network, once learnt: its exports go to that address only."""
    exports_folders: dict[str, Path] = field(default_factory=dict)
    running: bool = False
    stopped: bool = False
    torn_down: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    teardown_lock: threading.Lock = field(default_factory=threading.Lock)
    """Held for a whole teardown: a second caller (stop() racing a failed start) waits until the VM is gone."""

    @property
    def workdir(self) -> Path:
        return self.spec.workdir

    @property
    def folder(self) -> Path:
        return self.spec.workdir / VM_FOLDER

    @property
    def domain(self) -> str:
        return domain_name(self.spec.deployment_id)


class VmGuard:
    """The VMs' firewall on this host: the network of the VMs made if missing, nftables rules for its bridge."""

    def __init__(self, firewall: NftFirewall, *, nfs_servers: tuple[str, ...]) -> None:
        self.firewall = firewall
        self.nfs_servers = nfs_servers
        self.installed = False


class VagrantRuntime:
    """Runs each deployment in a VM of its own; see the module's docstring."""

    name = "vagrant"

    def __init__(
        self,
        config: VagrantConfig,
        *,
        driver: VmDriver,
        wheelhouse: Wheelhouse,
        model_store: Path,
        state_dir: Path,
        gpus: GpuAllocator | None = None,
        provision_timeout_s: float = 900.0,
        probe: Callable[[int, str | None], bool] = answers,
        exports: VmExports | None = None,
        guard: VmGuard | None = None,
        model_cache: Path | None = None,
    ) -> None:
        self.config = config
        self.driver = driver
        self.exports = exports or VmExports(state_dir / ".vm-exports.conf")
        """Without one, the exports are written to a file no NFS server reads (tests with a fake driver)."""
        self.guard = guard
        self._guard_lock = threading.Lock()
        if guard is not None:
            atexit.register(self.close)
        self.wheelhouse = wheelhouse
        self.model_store = model_store
        self.model_cache = model_cache
        """The agent's model cache (AGENT_MODEL_FILES http or auto): its verified folders are exported too."""
        self.state_dir = state_dir
        self.gpus = gpus or GpuAllocator(lambda: [])
        self.provision_timeout_s = provision_timeout_s
        self.probe = probe
        self._vms: dict[str, _Vm] = {}
        self._stopped_before_start: set[str] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the Runtime interface

    def start(self, spec: DeploymentSpec) -> None:
        vm = self._admit(spec)
        deadline = time.monotonic() + self.provision_timeout_s
        try:
            self._provision(vm, deadline)
        except ProvisionCancelled:
            self._teardown(vm)
            raise
        except ProvisionFailed as exc:
            self._note(vm, f"provisioning failed: {exc.message.splitlines()[0]}")
            self._teardown(vm)
            raise
        except Exception as exc:
            log.exception("provisioning %s failed unexpectedly", spec.deployment_id)
            self._note(vm, f"provisioning failed: agent error {exc.__class__.__name__}: {exc}")
            self._teardown(vm)
            raise ProvisionFailed(self._reason(vm, f"agent error while provisioning: {exc.__class__.__name__}: "
                                                   f"{exc}")) from exc

    def stop(self, deployment_id: str) -> None:
        with self._lock:
            vm = self._vms.get(deployment_id)
            if vm is None:
                # stop() may overtake a start() that has not begun yet: that start must not run.
                self._stopped_before_start.add(deployment_id)
                return
        vm.cancelled.set()
        self._teardown(vm)
        with vm.lock:
            if not vm.stopped:
                vm.stopped = True
                self._note(vm, "stopped: the VM is destroyed")

    def status(self, deployment_id: str) -> RuntimeState:
        with self._lock:
            vm = self._vms.get(deployment_id)
        if vm is None or vm.stopped or vm.cancelled.is_set() or vm.torn_down:
            return RuntimeState(DeploymentStatus.STOPPED)
        if not vm.running:
            return RuntimeState(DeploymentStatus.PROVISIONING)
        exited = self._model_exit(vm)
        if exited is not None:
            return RuntimeState(DeploymentStatus.FAILED, self._reason(vm, f"the model stopped by itself ({exited})"))
        try:
            state = self.driver.state(vm.domain)
        except VmError as exc:
            log.warning("cannot tell the state of %s: %s", vm.domain, exc)
            return RuntimeState(DeploymentStatus.RUNNING)  # libvirt is unreachable, not the VM gone
        if state != "running":
            what = "is gone" if state is None else f"is {state}"
            return RuntimeState(DeploymentStatus.FAILED, self._reason(vm, f"the VM {what}"))
        return RuntimeState(DeploymentStatus.RUNNING)

    def logs(self, deployment_id: str, tail: int) -> list[str]:
        provisioning, output = self.log_paths(deployment_id)
        lines = [clean_line(line) for line in tail_lines(provisioning, tail)]
        model = [clean_line(line) for line in tail_lines(output, tail)]
        if model:
            lines += ["[agent] ---- the model's output (stdout and stderr) ----", *model]
        return lines[-tail:] if tail > 0 else []

    def log_paths(self, deployment_id: str) -> list[Path]:
        workdir = self.state_dir / deployment_id
        return [workdir / LOG_NAME, workdir / OUTPUT_NAME]

    def recover(self) -> list[RecoveredDeployment]:
        """After an agent restart: adopt the VMs that run a model, destroy the ones caught mid-provisioning."""
        found: list[RecoveredDeployment] = []
        for record_path in sorted(self.state_dir.glob(f"*/{VM_FOLDER}/{RECORD_NAME}")):
            try:
                found.append(self._recover_one(record_path))
            except Exception:  # noqa: BLE001 - one unreadable folder must not keep the agent from starting
                log.exception("could not recover the deployment of %s", record_path)
        self._at_start()
        return found

    def _at_start(self) -> None:
        """Agent start: the firewall installed (with the adopted VMs' bindings), the exports file rewritten with
        the adopted VMs' exports only. A failure here is logged; each provisioning tries again and fails if so."""
        try:
            self._protect()
        except (FirewallError, VmError, ValueError) as exc:
            log.error("the VMs' firewall could not be installed at start (VMs will not start without it): %s", exc)
        try:
            self.exports.sync()
        except ExportError as exc:
            log.warning("the NFS server did not take the exports of the adopted VMs: %s", exc)

    def close(self) -> None:
        """At agent exit: remove the VMs' firewall, unless VMs still run (the next agent adopts them)."""
        if self.guard is None or not self.guard.installed:
            return
        with self._lock:
            live = [vm for vm in self._vms.values() if not (vm.stopped or vm.torn_down)]
        if live:
            log.info("%d VM(s) still run: their firewall stays", len(live))
            return
        try:
            self.guard.firewall.remove()
            self.guard.installed = False
        except FirewallError as exc:
            log.error("could not remove the VMs' firewall: %s", exc)

    # ------------------------------------------------------------------ the VMs' network, firewall and exports

    def _protect(self) -> None:
        """Make the VMs' network if missing and (re)install the firewall with the bindings of every live VM.
        Raises FirewallError or VmError."""
        if self.guard is None:
            return
        with self._guard_lock:
            bridge = self.driver.ensure_network(self.config.network_name, self.config.network)
            config = firewall_config(bridge, self.config.network, self.guard.nfs_servers)
            with self._lock:
                bindings = [vm.binding for vm in self._vms.values()
                            if vm.binding is not None and not (vm.stopped or vm.torn_down)]
            self.guard.firewall.apply(config, bindings)
            self.guard.installed = True

    def _learn_address(self, vm: _Vm) -> bool:
        """Once the VM has a DHCP lease: bind its address in the firewall, then export its folders to it."""
        if vm.binding is not None:
            return True
        try:
            binding = self.driver.address(vm.domain, self.config.network)
        except VmError as exc:
            log.warning("cannot ask libvirt the address of %s: %s", vm.domain, exc)
            return False
        if binding is None:
            return False
        with vm.lock:
            if vm.cancelled.is_set() or vm.torn_down:
                raise ProvisionCancelled("stopped during vagrant up")
            vm.binding = binding
        try:
            self._protect()
            exports = self.exports.add(vm.spec.deployment_id, str(binding.ip), vm.exports_folders)
        except (FirewallError, VmError, ExportError, ValueError) as exc:
            raise ProvisionFailed(self._reason(vm, f"could not export the model to its VM: {exc}")) from exc
        if vm.torn_down:  # a stop overtook us: what it dropped must stay dropped
            self.exports.remove(vm.spec.deployment_id)
            raise ProvisionCancelled("stopped during vagrant up")
        self._note(vm, f"the VM is {binding.ip} (port {binding.port}, MAC {binding.mac}), bound to it in the "
                       f"firewall; exported to it alone: " + ", ".join(f"{e.pseudo} ({e.path})"
                                                                 for e in exports.values()))
        with vm.lock:
            if vm.folder.is_dir():
                self._save_record(vm, "provisioning")
        return True

    # ------------------------------------------------------------------ provisioning

    def _admit(self, spec: DeploymentSpec) -> _Vm:
        with self._lock:
            if spec.deployment_id in self._stopped_before_start:
                self._stopped_before_start.discard(spec.deployment_id)
                raise ProvisionCancelled(f"deployment {spec.deployment_id} was stopped before it started")
            known = self._vms.get(spec.deployment_id)
            if known is not None and not (known.stopped or known.torn_down):
                raise ProvisionFailed(f"deployment {spec.deployment_id} is already started by this runtime")
            if (spec.workdir / VM_FOLDER / RECORD_NAME).exists():
                raise ProvisionFailed(f"deployment {spec.deployment_id} already has a VM folder here "
                                      f"({spec.workdir / VM_FOLDER}): refusing to launch it twice")
            spec.workdir.mkdir(parents=True, exist_ok=True)
            output = spec.workdir / OUTPUT_NAME
            if output.exists():  # a restart in place: the last VM's exit line must not end the new one
                output.replace(spec.workdir / f"{OUTPUT_NAME}.1")
            vm = _Vm(spec)
            self._vms[spec.deployment_id] = vm
            return vm

    def _provision(self, vm: _Vm, deadline: float) -> None:
        spec = vm.spec
        meta = spec.meta
        self._note(vm, f"deployment {spec.deployment_id}: model {spec.model_id} v{spec.version} in VM {vm.domain}, "
                       f"URL port {spec.port}")
        self._store_path(spec.model_path)
        with vm.lock:
            vm.gpus = self.gpus.reserve(spec.deployment_id, meta.resources.gpus)
        if vm.gpus:
            self._note(vm, "GPUs passed through: " + ", ".join(f"{g.index} ({g.pci_bus_id})" for g in vm.gpus))

        def run(argv: list[str], what: str) -> None:
            self._note(vm, f"{what}: {' '.join(argv)}")
            self._run_on_host(vm, argv, what, deadline)

        wheels = self.wheelhouse.ensure(spec.model_path / "requirements.txt", run=run, deadline=deadline,
                                        cancelled=vm.cancelled)
        if wheels is not None:
            self._note(vm, f"{'built' if wheels[1] else 'reusing'} wheelhouse {self.wheelhouse.root / wheels[0]}")
        vm.exports_folders = {"app": spec.model_path.resolve()}
        if wheels is not None:
            vm.exports_folders["wheels"] = (self.wheelhouse.root / wheels[0]).resolve()
        try:
            self._protect()
        except (FirewallError, VmError, ValueError) as exc:
            raise ProvisionFailed(f"the VMs' firewall could not be installed, so no VM is started: {exc}") from exc
        plan = plan_vm(
            deployment_id=spec.deployment_id, model_id=spec.model_id, version=spec.version, ports=meta.ports,
            host_ports=spec.ports, primary_host_port=spec.port, cpus=meta.resources.cpus,
            memory_mb=meta.resources.memory_mb, setup_commands=meta.setup_commands,
            start_commands=meta.start_commands, health_path=meta.health_path, with_wheels=wheels is not None,
            config=self.config,
            console_log=vm.workdir / CONSOLE_NAME, output_log=vm.workdir / OUTPUT_NAME, extra_env=spec.env,
            gpus=tuple(PciAddress.parse(g.pci_bus_id) for g in vm.gpus),
        )
        with vm.lock:
            if vm.cancelled.is_set():
                raise ProvisionCancelled("stopped before the VM was created")
            vm.folder.mkdir(parents=True, exist_ok=True)
            (vm.folder / "Vagrantfile").write_text(render_vagrantfile(plan))
            (vm.folder / "provision.sh").write_text(render_provision(plan))
            self._save_record(vm, "provisioning")
        self._note(vm, f"vagrant up (box {self.config.box}, {plan.cpus} CPU(s), {plan.memory_mb} MB, "
                       f"{self.config.acceleration.upper()}); the VM's console is in {CONSOLE_NAME}")
        self._vagrant_up(vm, deadline)
        self._note(vm, f"provisioned; waiting for port {spec.port} to answer")
        self._wait_until_answering(vm, deadline)
        with vm.lock:
            if vm.cancelled.is_set():
                raise ProvisionCancelled("stopped while the model was starting")
            vm.running = True
            self._save_record(vm, "running")
        self._note(vm, f"running: port {spec.port} answers")

    def _store_path(self, model_path: Path) -> PurePosixPath:
        """The version folder relative to the model store root (or to the model cache, for a version pulled over
        HTTP), whose folder this host's NFS server exports to the VM."""
        roots = [self.model_store.resolve()] + ([self.model_cache.resolve()] if self.model_cache else [])
        for root in roots:
            try:
                return PurePosixPath(model_path.resolve().relative_to(root).as_posix())
            except ValueError:
                continue
        raise ProvisionFailed(
            f"the version folder {model_path} is not under the model store {roots[0]} (MODEL_STORE)"
            + (f" nor the model cache {roots[1]}" if len(roots) > 1 else "")
            + ": only verified versions are exported to VMs"
        )

    def _vagrant_up(self, vm: _Vm, deadline: float) -> None:
        failure: list[BaseException] = []

        def up() -> None:
            try:
                self.driver.up(vm.folder, vm.workdir / LOG_NAME)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                failure.append(exc)

        thread = threading.Thread(target=up, name=f"vagrant-up-{vm.spec.deployment_id}", daemon=True)
        with vm.lock:
            if vm.cancelled.is_set():
                raise ProvisionCancelled("stopped before vagrant up")
            vm.up_thread = thread
            thread.start()
        asked = 0.0
        while thread.is_alive():
            thread.join(_POLL_S)
            if vm.cancelled.is_set():
                raise ProvisionCancelled("stopped during vagrant up")
            if vm.binding is None and time.monotonic() - asked > _ADDRESS_POLL_S:
                asked = time.monotonic()
                self._learn_address(vm)
            if time.monotonic() > deadline:
                self.driver.cancel(vm.folder)
                thread.join(30)
                raise ProvisionFailed(self._reason(vm, f"vagrant up did not finish within the provisioning "
                                                       f"timeout of {self.provision_timeout_s:g} s"))
        if vm.cancelled.is_set():
            raise ProvisionCancelled("stopped during vagrant up")
        if failure:
            exc = failure[0]
            what = str(exc) if isinstance(exc, VmError) else f"{exc.__class__.__name__}: {exc}"
            raise ProvisionFailed(self._reason(vm, what))
        if not self._learn_address(vm):
            raise ProvisionFailed(self._reason(vm, f"libvirt gave no address of VM {vm.domain} on "
                                                   f"{self.config.network}: nothing could be exported to it"))

    def _wait_until_answering(self, vm: _Vm, deadline: float) -> None:
        spec = vm.spec
        what = f"GET {spec.meta.health_path} → 2xx" if spec.meta.health_path else "a TCP connection"
        checked = 0.0
        while True:
            if vm.cancelled.is_set():
                raise ProvisionCancelled("stopped while the model was starting")
            if self.probe(spec.port, spec.meta.health_path):
                return
            exited = self._model_exit(vm)
            if exited is not None:
                raise ProvisionFailed(self._reason(vm, f"the start commands exited ({exited}) before port "
                                                       f"{spec.port} answered {what}"))
            if time.monotonic() - checked > 5:
                checked = time.monotonic()
                try:
                    state = self.driver.state(vm.domain)
                except VmError:
                    state = "running"  # cannot tell: keep waiting until the deadline
                if state != "running":
                    raise ProvisionFailed(self._reason(vm, f"the VM is {state or 'gone'} before port {spec.port} "
                                                           f"answered {what}"))
            if time.monotonic() > deadline:
                raise ProvisionFailed(self._reason(vm, f"port {spec.port} did not answer {what} within "
                                                       f"{self.provision_timeout_s:g} s"))
            vm.cancelled.wait(_POLL_S)

    def _run_on_host(self, vm: _Vm, argv: list[str], what: str, deadline: float) -> None:
        """One command on the host (the wheelhouse build), output to the log, bounded and cancellable."""
        with (vm.workdir / LOG_NAME).open("ab") as out:
            proc = subprocess.Popen(argv, cwd=vm.spec.model_path, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                try:
                    code = proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if vm.cancelled.is_set():
                    raise ProvisionCancelled(f"stopped during {what}")
                if time.monotonic() > deadline:
                    raise ProvisionFailed(self._reason(vm, f"{what} did not finish within the provisioning "
                                                           f"timeout of {self.provision_timeout_s:g} s"))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code != 0:
            raise ProvisionFailed(self._reason(vm, f"{what} failed with exit code {code}"))

    # ------------------------------------------------------------------ stopping

    def _teardown(self, vm: _Vm) -> None:
        """Destroy the VM and remove its folder, once; release its GPUs. Waits for a `vagrant up` to be killed."""
        with vm.teardown_lock:
            with vm.lock:
                if vm.torn_down:
                    return
                vm.torn_down = True
                up = vm.up_thread
            self._destroy(vm, up)

    def _destroy(self, vm: _Vm, up: threading.Thread | None) -> None:
        if up is not None and up.is_alive() and up is not threading.current_thread():
            self.driver.cancel(vm.folder)
            up.join(60)
        if vm.folder.exists() or self._exists(vm.domain):
            self._note(vm, f"destroying VM {vm.domain}")
            try:
                self.driver.destroy(vm.folder, vm.domain, vm.workdir / LOG_NAME)
            except VmError as exc:
                self._note(vm, f"could not destroy VM {vm.domain}: {exc}")
                log.error("could not destroy VM %s: %s", vm.domain, exc)
            shutil.rmtree(vm.folder, ignore_errors=True)
        self.gpus.release(vm.spec.deployment_id)
        try:
            self.exports.remove(vm.spec.deployment_id)
        except ExportError as exc:
            log.error("could not drop the exports of %s: %s", vm.spec.deployment_id, exc)
        if vm.binding is not None:
            with vm.lock:
                vm.binding = None
            try:
                self._protect()
            except (FirewallError, VmError, ValueError) as exc:
                log.error("could not drop the firewall binding of %s: %s", vm.domain, exc)

    def _exists(self, domain: str) -> bool:
        try:
            return self.driver.state(domain) is not None
        except VmError:
            return True  # cannot tell: try to destroy it

    # ------------------------------------------------------------------ recovery

    def _save_record(self, vm: _Vm, phase: str) -> None:
        spec = vm.spec
        record = {
            "phase": phase, "deployment_id": spec.deployment_id, "model_id": spec.model_id,
            "version": spec.version, "model_path": str(spec.model_path), "meta": spec.meta.model_dump(mode="json"),
            "port": spec.port, "ports": dict(spec.ports), "env": dict(spec.env), "gpus": [g.index for g in vm.gpus],
            "domain": vm.domain,
            "address": None if vm.binding is None else {"port": vm.binding.port, "mac": vm.binding.mac,
                                                        "ip": str(vm.binding.ip)},
            "exports": [e.to_json() for e in self.exports.held(spec.deployment_id)],
        }
        staged = vm.folder / f".{RECORD_NAME}.new"
        staged.write_text(json.dumps(record, indent=2) + "\n")
        staged.replace(vm.folder / RECORD_NAME)

    def _recover_one(self, record_path: Path) -> RecoveredDeployment:
        data: dict[str, Any] = json.loads(record_path.read_text())
        workdir = record_path.parent.parent
        spec = DeploymentSpec(
            deployment_id=data["deployment_id"], model_id=data["model_id"], version=int(data["version"]),
            model_path=Path(data["model_path"]), meta=PackageMeta.model_validate(data["meta"]),
            port=int(data["port"]), workdir=workdir, env=dict(data.get("env", {})),
            ports={k: int(v) for k, v in data.get("ports", {}).items()},
        )
        vm = _Vm(spec)
        try:
            state: str | None = self.driver.state(vm.domain)
        except VmError as exc:
            log.warning("recovering %s: libvirt cannot say (%s); adopting it as running", vm.domain, exc)
            state = "running"
        if data.get("phase") == "running" and state == "running":
            vm.running = True
            vm.gpus = self.gpus.reserve_indexes(spec.deployment_id, data.get("gpus", []))
            if data.get("address"):
                address = data["address"]
                vm.binding = VmBinding.of(address["port"], address["mac"], address["ip"])
            self.exports.restore(spec.deployment_id, [Export.from_json(e) for e in data.get("exports", [])])
            with self._lock:
                self._vms[spec.deployment_id] = vm
            self._note(vm, f"the agent restarted: found VM {vm.domain} running, adopted it")
            return RecoveredDeployment(spec.deployment_id, spec.model_id, spec.version, spec.port, dict(spec.ports),
                                       DeploymentStatus.RUNNING)
        why = ("it was still provisioning" if data.get("phase") != "running"
               else f"its VM {'is gone' if state is None else 'is ' + state}")
        self._note(vm, f"the agent restarted and {why}: destroying it")
        with self._lock:
            self._vms[spec.deployment_id] = vm
        self._teardown(vm)
        vm.stopped = True
        return RecoveredDeployment(spec.deployment_id, spec.model_id, spec.version, spec.port, dict(spec.ports),
                                   DeploymentStatus.FAILED, f"the agent restarted and {why}; the VM was destroyed")

    # ------------------------------------------------------------------ log helpers

    def _model_exit(self, vm: _Vm) -> str | None:
        """How the model's service ended, when the VM said so on the model's output; None while it runs."""
        for line in reversed(tail_lines(vm.workdir / OUTPUT_NAME, 5)):
            if EXIT_MARKER in line:
                return clean_line(line).split(EXIT_MARKER, 1)[1].strip()
        return None

    def _note(self, vm: _Vm, line: str) -> None:
        """An agent line in the deployment's log, marked so it stands apart from Vagrant's and the VM's output."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        vm.workdir.mkdir(parents=True, exist_ok=True)
        with (vm.workdir / LOG_NAME).open("a", encoding="utf-8") as out:
            out.write(f"[agent {stamp}Z] {line}\n")

    def _reason(self, vm: _Vm, what: str) -> str:
        lines = [clean_line(x) for x in tail_lines(vm.workdir / LOG_NAME, REASON_LINES)]
        model = [clean_line(x) for x in tail_lines(vm.workdir / OUTPUT_NAME, REASON_LINES // 2)]
        if model:
            lines = lines[-(REASON_LINES - len(model)):] + ["---- the model's output ----", *model]
        return what + ("; last log lines:\n" + "\n".join(lines) if lines else "; the log is empty")
