"""The files of one VM deployment, generated from meta.json: its Vagrantfile and its provisioning script.

Pure: no I/O, no clock. `plan_vm` decides (ports, CPUs, memory, mounts, environment) and the two renderers
write it down, so golden files pin every byte the agent hands to Vagrant.

Inside the VM:
    /app            the version folder, read-only over NFS: <nfs server>:/miaas/<deployment id>/app, an export of
                    this deployment's folder alone, to this VM's address alone (vmexports.py)
    /wheels         the wheelhouse of requirements.txt, the same way: <nfs server>:/miaas/<deployment id>/wheels
    /opt/miaas/venv the model's virtualenv, installed from /wheels with no package index
    ttyS0           the console, logged by libvirt to console.log on the host
    ttyS1           the model's stdout and stderr, logged by libvirt to model-output.log on the host
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.runtimes.process import port_env_name
from agent.runtimes.vmexports import pseudo_path

Acceleration = Literal["kvm", "tcg"]

DEFAULT_GUEST_PORT = 8000
"""The port a model listens on in its VM when meta.json names none."""
GUEST_VENV = "/opt/miaas/venv"
GUEST_WORKDIR = "/var/lib/miaas/work"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MODEL_UNIT = "miaas-model.service"
EXIT_MARKER = "[miaas] the model stopped:"
"""Written to the model's output when its service stops: the agent reads it as "the model died"."""
PROVISIONED_MARKER = "[miaas] provisioned:"
MOUNT_WAIT_S = 300
"""How long the provisioner retries a mount: the agent adds the VM's exports once it learns the VM's address."""


@dataclass(frozen=True)
class VagrantConfig:
    """How this agent's VMs are made (from AgentSettings)."""

    box: str = "miaas/debian12"
    acceleration: Acceleration = "kvm"
    tcg_cpu_model: str = "Nehalem"
    """The CPU emulated under TCG: x86-64-v2 (SSE4.2, POPCNT), which today's numpy wheels require."""
    libvirt_uri: str = "qemu:///system"
    boot_timeout_s: int = 600
    min_memory_mb: int = 512
    forward_host_ip: str = "0.0.0.0"
    nfs_server: str = "192.168.121.1"
    """This host as the VMs reach it: its nfs-ganesha serves each deployment its own exports."""
    nfs_options: str = "vers=4.1"
    network_name: str = "vagrant-libvirt"
    """The libvirt network of the VMs (vagrant-libvirt's management network); the agent makes it, and keeps it."""
    network: str = "192.168.121.0/24"
    insert_key: bool = False
    """The box carries a key of its own (bootstrap/build-box.sh): no need for Vagrant to replace it."""


@dataclass(frozen=True)
class PciAddress:
    """A host PCI device (a GPU) handed to the VM."""

    domain: int
    bus: int
    slot: int
    function: int

    @classmethod
    def parse(cls, bus_id: str) -> PciAddress:
        """'0000:3b:00.0' or NVML's '00000000:3B:00.0' → PciAddress."""
        found = re.fullmatch(r"([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])", bus_id.strip())
        if found is None:
            raise ValueError(f"not a PCI bus id: {bus_id!r}")
        return cls(*(int(part, 16) for part in found.groups()))


@dataclass(frozen=True)
class Forward:
    name: str
    guest: int
    host: int


@dataclass(frozen=True)
class NfsMount:
    server: str
    path: str
    target: str
    options: str

    @property
    def source(self) -> str:
        return f"{self.server}:{self.path}"


@dataclass(frozen=True)
class VmPlan:
    """Everything the Vagrantfile and the provisioning script say about one deployment's VM."""

    deployment_id: str
    model_id: str
    version: int
    domain: str
    config: VagrantConfig
    cpus: int
    memory_mb: int
    forwards: tuple[Forward, ...]
    console_log: Path
    output_log: Path
    app: NfsMount
    wheels: NfsMount | None
    env: Mapping[str, str]
    setup_commands: tuple[str, ...]
    start_commands: tuple[str, ...]
    health_path: str | None = None
    gpus: tuple[PciAddress, ...] = field(default_factory=tuple)

    @property
    def primary(self) -> Forward:
        return self.forwards[0]


def domain_name(deployment_id: str) -> str:
    """The libvirt domain (and Vagrant machine) of a deployment: `miaas-<deployment id>`."""
    return f"miaas-{deployment_id}"


def plan_vm(
    *,
    deployment_id: str,
    model_id: str,
    version: int,
    ports: Mapping[str, int],
    host_ports: Mapping[str, int],
    primary_host_port: int,
    cpus: float,
    memory_mb: int,
    setup_commands: list[str],
    start_commands: list[str],
    health_path: str | None,
    with_wheels: bool,
    config: VagrantConfig,
    console_log: Path,
    output_log: Path,
    extra_env: Mapping[str, str] | None = None,
    gpus: tuple[PciAddress, ...] = (),
) -> VmPlan:
    """Decide the VM of one deployment from its meta.json (ports, resources, commands) and the agent's choices."""
    if ports:
        forwards = tuple(Forward(name, guest, host_ports[name]) for name, guest in ports.items())
    else:
        forwards = (Forward("http", DEFAULT_GUEST_PORT, primary_host_port),)
    if forwards[0].host != primary_host_port:
        raise ValueError("the first meta.json port must be forwarded from the deployment's primary host port")
    app = NfsMount(config.nfs_server, pseudo_path(deployment_id, "app"), "/app", config.nfs_options)
    wheels = None
    if with_wheels:
        wheels = NfsMount(config.nfs_server, pseudo_path(deployment_id, "wheels"), "/wheels", config.nfs_options)
    env = dict(extra_env or {})
    env.update({
        "PORT": str(forwards[0].guest),
        "MIAAS_DEPLOYMENT_ID": deployment_id,
        "MIAAS_MODEL_ID": model_id,
        "MIAAS_MODEL_VERSION": str(version),
        "MIAAS_MODEL_DIR": "/app",
        "MIAAS_WORKDIR": GUEST_WORKDIR,
        "HOME": GUEST_WORKDIR,
        "LANG": "C.UTF-8",
        "PATH": f"{GUEST_VENV}/bin:{GUEST_PATH}",
        "VIRTUAL_ENV": GUEST_VENV,
        "PYTHONUNBUFFERED": "1",
        # No PYTHONPYCACHEPREFIX (unlike the process runtime): with it, Python would ignore the bytecode of the
        # standard library and the venv and compile them again at each start, a slow thing under emulation.
        # The modules of /app (read-only) are compiled in memory instead.
        # The VM reaches no package index: pip finds what requirements.txt needs in the wheelhouse.
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    })
    if wheels is not None:
        env["PIP_FIND_LINKS"] = wheels.target
    for forward in forwards:
        if ports:
            env[port_env_name(forward.name)] = str(forward.guest)
    return VmPlan(
        deployment_id=deployment_id, model_id=model_id, version=version, domain=domain_name(deployment_id),
        config=config, cpus=max(1, math.ceil(cpus)), memory_mb=max(memory_mb, config.min_memory_mb),
        forwards=forwards, console_log=console_log, output_log=output_log, app=app, wheels=wheels, env=env,
        setup_commands=tuple(setup_commands), start_commands=tuple(start_commands), health_path=health_path,
        gpus=tuple(gpus),
    )


# ---------------------------------------------------------------------------------------------- rendering


INSTALL_EOF = "MIAAS_INSTALL_WHEELS"
INSTALL_WHEELS = """\
import glob, sys, sysconfig
from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile
paths = sysconfig.get_paths()
scheme = {"purelib": paths["purelib"], "platlib": paths["platlib"], "headers": paths["include"],
          "scripts": paths["scripts"], "data": paths["data"]}
destination = SchemeDictionaryDestination(scheme, interpreter=sys.executable, script_kind="posix")
for wheel in sorted(glob.glob(sys.argv[1] + "/*.whl")):
    with WheelFile.open(wheel) as source:
        install(source, destination, {"INSTALLER": b"miaas\\n"})
"""
"""Installs every wheel of the wheelhouse into the running interpreter's environment (the model's venv)."""


def rb(value: str) -> str:
    """A Ruby double-quoted string literal of value (no interpolation can sneak in)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("#", "\\#").replace("\n", "\\n")
    return f'"{escaped}"'


def render_vagrantfile(plan: VmPlan) -> str:
    """The Vagrantfile of the deployment's folder."""
    c = plan.config
    lines = [
        "# Generated by the MIaaS agent from the model's meta.json; rewritten at every start, do not edit.",
        f"# Deployment {plan.deployment_id}: model {plan.model_id} v{plan.version}.",
        'Vagrant.configure("2") do |config|',
        f"  config.vm.define {rb(plan.domain)}",
        f"  config.vm.box = {rb(c.box)}",
        "  config.vm.guest = :debian  # the box's system: Vagrant skips guesswork over SSH",
        "  config.vm.box_check_update = false",
        f"  config.vm.boot_timeout = {c.boot_timeout_s}",
        '  config.vm.synced_folder ".", "/vagrant", disabled: true',
        f"  config.ssh.insert_key = {'true' if c.insert_key else 'false'}",
    ]
    for fw in plan.forwards:
        lines.append(
            f"  config.vm.network :forwarded_port, id: {rb('port-' + fw.name)}, guest: {fw.guest}, "
            f'guest_ip: "127.0.0.1", host: {fw.host}, host_ip: {rb(c.forward_host_ip)}'
        )
    lines += [
        "  config.vm.provider :libvirt do |libvirt|",
        f"    libvirt.uri = {rb(c.libvirt_uri)}",
        '    libvirt.default_prefix = ""',
        "    # The agent makes this network and firewalls its bridge (vmfirewall.py): Vagrant must not remove it.",
        f"    libvirt.management_network_name = {rb(c.network_name)}",
        f"    libvirt.management_network_address = {rb(c.network)}",
        "    libvirt.management_network_keep = true",
        f"    libvirt.cpus = {plan.cpus}",
        f"    libvirt.memory = {plan.memory_mb}",
        '    libvirt.graphics_type = "none"',
    ]
    if c.acceleration == "kvm":
        lines += [
            '    libvirt.driver = "kvm"',
            '    libvirt.cpu_mode = "host-passthrough"',
            "    # Some hosts advertise arch-capabilities that KVM cannot give a guest (cpu_feature is refused with",
            "    # host-passthrough, so the CPU is set again on QEMU's command line, which keeps the last -cpu).",
            '    libvirt.qemuargs :value => "-cpu"',
            '    libvirt.qemuargs :value => "host,arch-capabilities=off"',
        ]
    else:
        lines += [
            "    # Software emulation (TCG): for hosts without usable KVM, e.g. VMs without nested virtualisation.",
            '    libvirt.driver = "qemu"',
            '    libvirt.cpu_mode = "custom"',
            f"    libvirt.cpu_model = {rb(c.tcg_cpu_model)}",
        ]
    lines += [
        f"    libvirt.serial :type => \"file\", :source => {{:path => {rb(str(plan.console_log))}}}",
        f"    libvirt.serial :type => \"file\", :source => {{:path => {rb(str(plan.output_log))}}}",
    ]
    for gpu in plan.gpus:
        lines.append(
            f'    libvirt.pci :domain => "0x{gpu.domain:04x}", :bus => "0x{gpu.bus:02x}", '
            f':slot => "0x{gpu.slot:02x}", :function => "0x{gpu.function:x}"'
        )
    lines += [
        "  end",
        '  config.vm.provision "miaas", type: "shell", path: "provision.sh", privileged: true',
        "end",
    ]
    return "\n".join(lines) + "\n"


def _env_file(env: Mapping[str, str]) -> str:
    """KEY='value' lines, read both by systemd (EnvironmentFile) and by bash."""
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in sorted(env.items()))


def _heredoc(path: str, lines: list[str]) -> list[str]:
    """Shell lines writing `lines` to path verbatim; the delimiter names the content's hash, so no line ends it."""
    body = "\n".join(lines)
    end = "MIAAS_EOF_" + hashlib.sha256(body.encode()).hexdigest()[:12]
    return [f"cat > {path} <<'{end}'", body, end]


def render_provision(plan: VmPlan) -> str:
    """The shell provisioner: mounts, virtualenv from the wheelhouse, setup commands, the model's service."""
    q = shlex.quote
    out: list[str] = [
        "#!/bin/bash",
        "# Generated by the MIaaS agent: provisions the VM of one deployment (runs as root, once, at `vagrant up`).",
        f"# Deployment {plan.deployment_id}: model {plan.model_id} v{plan.version}.",
        "set -euo pipefail",
        'say() { echo "[provision $(date -u +%H:%M:%S)] $*"; }',
        "fail() { say \"error: $*\"; exit 1; }",
        "",
        "say 'model output goes to the second serial port (ttyS1)'",
        "stty -F /dev/ttyS1 115200 raw -echo",
        "",
    ]
    out += [
        "# The agent exports this deployment's folders to this VM's address once it learns it: wait for them.",
        'mount_ro() {  # source target options',
        '  mkdir -p "$2"',
        f"  local deadline=$((SECONDS + {MOUNT_WAIT_S}))",
        '  until mountpoint -q "$2" || mount -t nfs -o "ro,$3" "$1" "$2" 2>/dev/null; do',
        '    [ "$SECONDS" -lt "$deadline" ] || { mount -t nfs -o "ro,$3" "$1" "$2" '
        '|| fail "cannot mount $1 (is the NFS server up and exporting it to this VM?)"; return; }',
        "    sleep 1",
        "  done",
        "}",
    ]
    mounts = [m for m in (plan.app, plan.wheels) if m is not None]
    out.append("say " + q("mounting read-only: " + ", ".join(f"{m.source} at {m.target}" for m in mounts)))
    for number, mount in enumerate(mounts):
        out.append(f"mount_ro {q(mount.source)} {mount.target} {q(mount.options)} & mount{number}=$!")
    out.append(" && ".join(f"wait $mount{number}" for number in range(len(mounts))) + " || exit 1")
    out += [
        "",
        f"install -d -m 0755 /etc/miaas /opt/miaas {GUEST_WORKDIR}",
        *_heredoc("/etc/miaas/model.env", _env_file(plan.env).rstrip("\n").split("\n")),
        "set -a; . /etc/miaas/model.env; set +a",
        "",
        "# The box comes with an empty virtualenv (made at its build, at native speed).",
        f"[ -x {GUEST_VENV}/bin/python ] || "
        f"{{ say 'creating the virtualenv {GUEST_VENV}'; python3 -m venv {GUEST_VENV}; }}",
    ]
    if plan.wheels is not None:
        out += [
            "if [ -f /wheels/.miaas/installer.zip ]; then",
            "  say 'installing the wheels of requirements.txt from the wheelhouse (pypa/installer, no package index)'",
            f"  PYTHONPATH=/wheels/.miaas/installer.zip {GUEST_VENV}/bin/python - /wheels <<'{INSTALL_EOF}' "
            "|| fail 'installing the wheelhouse failed'",
            *INSTALL_WHEELS.splitlines(),
            INSTALL_EOF,
            "else",
            "  say 'installing requirements.txt from the wheelhouse (pip, no package index)'",
            f"  {GUEST_VENV}/bin/pip install --no-index --find-links /wheels --no-compile --disable-pip-version-check "
            "--no-input --quiet -r /app/requirements.txt || fail 'installing requirements.txt failed'",
            "fi",
            "# Bytecode the agent compiled on the host for these very files (checked against their hashes).",
            "site=$(" + GUEST_VENV + "/bin/python -c 'import sysconfig; print(sysconfig.get_path(\"purelib\"))')",
            '[ ! -d /wheels/.miaas/pycache ] || cp -r /wheels/.miaas/pycache/. "$site/"',
        ]
    for number, command in enumerate(plan.setup_commands, 1):
        what = f"setup command {number} ({command})"
        out += [
            f"say {q(f'setup command {number}: {command}')}",
            f"(cd /app && bash -c {q(command)}) || fail {q(what)}\" failed with exit code $?\"",
        ]
    unit = [
        "[Unit]",
        f"Description=MIaaS model of deployment {plan.deployment_id}",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "WorkingDirectory=/app",
        "EnvironmentFile=/etc/miaas/model.env",
        "ExecStart=/bin/bash /opt/miaas/start.sh",
        "StandardOutput=file:/dev/ttyS1",
        "StandardError=inherit",
        "Restart=no",
        f"ExecStopPost=/bin/sh -c 'echo \"{EXIT_MARKER} $SERVICE_RESULT, $EXIT_CODE $EXIT_STATUS\" > /dev/ttyS1'",
    ]
    out += [
        "",
        *_heredoc("/opt/miaas/start.sh", list(plan.start_commands)),
        *_heredoc(f"/etc/systemd/system/{MODEL_UNIT}", unit),
        "say 'starting the model: ' " + q(" ; ".join(plan.start_commands)),
        f"systemctl start {MODEL_UNIT}  # a unit file systemd never loaded needs no daemon-reload",
        f"echo {q(PROVISIONED_MARKER + ' ' + json.dumps(plan.deployment_id))}",
        "",
    ]
    return "\n".join(out)
