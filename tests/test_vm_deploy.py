"""A real VM per deployment: the iris example deployed through the controller onto an agent with the vagrant runtime.

Real everything: the box built from Debian packages (bootstrap/build-box.sh, cached by its hash), libvirt with
QEMU (TCG unless MIAAS_TEST_VM_ACCELERATION=kvm), Vagrant, the deployment's own NFS exports served by nfs-ganesha,
the VMs' nftables firewall, the cluster as processes (`miaas.cluster.LocalCluster`). About 3 minutes with the box
cached, 6 without. From inside the VM it checks the isolation: no port of the host but NFS (a listener standing for
the controller), no metadata address, no other model's version folder over NFS.
Needs root and the packages of agent.vmhost.INSTALL; anything missing is a skip, which CI counts as a failure.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from agent.nfsdev import DevNfsServer
from agent.runtimes.vagrant_driver import vagrant_env
from agent.vmhost import INSTALL, LibvirtDaemons, missing_packages
from miaas.client import Signer
from miaas.cluster import LocalCluster
from miaas.identity import fixed
from miaas.package import pack_model

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]
ROOT = Path(__file__).resolve().parents[1]
ACCELERATION = os.environ.get("MIAAS_TEST_VM_ACCELERATION", "tcg")
DEPLOY_DEADLINE_S = 900
SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]
HOST_ON_VM_NETWORK = "192.168.121.1"
OTHER_EXPORT = "/miaas/d-other/app"
"""Another model's version folder, exported (as the agent would) to another VM's address: 192.168.121.250."""


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def vm_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Root, the packages, the box (built or reused) and libvirt answering; daemons we started are stopped after."""
    if os.geteuid() != 0:
        pytest.skip("the VM test needs root (libvirt's system instance, loop devices for the box, NFS on port 2049)")
    if missing := missing_packages():
        pytest.skip(f"the VM test needs the packages {' '.join(missing)}; install them with: {INSTALL}")
    state = tmp_path_factory.mktemp("vm-host")
    with LibvirtDaemons(state / "libvirt"):  # first: a new box build drops the old one's copy from the pool
        started = time.monotonic()
        built = subprocess.run(["bash", str(ROOT / "bootstrap" / "build-box.sh")], capture_output=True, text=True,
                               timeout=1800)
        assert built.returncode == 0, f"bootstrap/build-box.sh failed:\n{built.stdout}\n{built.stderr}"
        print(f"box ready in {time.monotonic() - started:.0f} s: {built.stderr.strip().splitlines()[-1]}")
        yield state


@pytest.fixture(scope="module")
def cluster(broker: str, vm_host: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The cluster with one agent offering only the vagrant runtime, its store and wheelhouse served over NFS."""
    state = tmp_path_factory.mktemp("vm-cluster")
    state.chmod(0o755)
    store, wheels = state / "models", state / "wheelhouse"
    for folder in (store, wheels):
        folder.mkdir(mode=0o755)
    other = store / "m-other" / "v1"  # another model's version, exported to another VM only
    other.mkdir(parents=True)
    (other / "SECRET.txt").write_text("another model's weights\n")
    for path in (other.parent, other):
        path.chmod(0o755)
    (other / "SECRET.txt").chmod(0o644)
    nfs_state = state / "nfs"
    exports_file = nfs_state / "vm-exports.conf"
    agent = {
        "AGENT_RUNTIMES": '["vagrant"]',
        "AGENT_VAGRANT_ACCELERATION": ACCELERATION,
        "AGENT_WHEELHOUSE_DIR": str(wheels),
        "AGENT_VAGRANT_NFS_EXPORTS_FILE": str(exports_file),
        "AGENT_VAGRANT_NFS_PID_FILE": str(nfs_state / "ganesha.pid"),
        "AGENT_PROVISION_TIMEOUT_S": str(DEPLOY_DEADLINE_S - 60),
        "AGENT_STOP_GRACE_S": "10",
    }
    ports = {name: 0 for name in ("broker", "service-registry", "model-registry", "controller", "frontend")}
    # Stopping a VM takes seconds under emulation: the controller waits for the agent's answer that long.
    c = LocalCluster(state_dir=state, bootstrap=broker, ports=ports, agents=[agent],
                     extra_env={"CONTROLLER_AGENT_TIMEOUT_S": "120"})
    with DevNfsServer({OTHER_EXPORT: other}, nfs_state, clients="192.168.121.250", include=exports_file) as nfs:
        c.start(timeout=120)
        try:
            yield c
        finally:
            c.stop(grace=60)  # the agent destroys the VMs it still runs as it exits
            # and, with no VM left, removes their firewall
            assert subprocess.run(["nft", "list", "table", "inet", "miaas_vms"], capture_output=True).returncode != 0
            for line in virsh("list", "--all", "--name").stdout.split():
                if line.startswith("miaas-d-"):  # a VM of this test that outlived its agent: never leave one
                    virsh("destroy", line)
                    virsh("undefine", line, "--remove-all-storage")
            print(f"NFS server log (tail):\n{nfs.log_tail(10)}")


def auth(c: LocalCluster) -> Signer:
    """Sign a request as the cluster's admin."""
    return Signer(fixed(c.admin))


def diagnostics(c: LocalCluster, deployment_id: str | None) -> str:
    """Everything that says why a VM deployment did not work: the deployment's log, the VM console, service logs."""
    parts = []
    if deployment_id:
        try:
            parts.append(requests.get(f"{c.url('agent-1')}/deployments/{deployment_id}/logs", params={"tail": 200},
                                      auth=auth(c), timeout=30).text)
        except requests.RequestException as exc:
            parts.append(f"(no deployment log: {exc})")
        console = c.state_dir / "agent-1" / deployment_id / "console.log"
        if console.exists():
            parts.append("---- VM console ----\n" + "\n".join(console.read_text(errors="replace").splitlines()[-40:]))
    for name in ("agent-1", "controller"):
        log = c.state_dir / "logs" / f"{name}.log"
        if log.exists():
            parts.append(f"---- {name} ----\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
    return "\n".join(parts)


PROBE = r"""
import errno, json, os, socket, subprocess
def tcp(host, port):
    s = socket.socket()
    s.settimeout(8)
    try:
        s.connect((host, port))
        return "connected"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
def mount(source, target):
    os.makedirs(target, exist_ok=True)
    r = subprocess.run(["timeout", "40", "mount", "-t", "nfs", "-o", "ro,vers=4.1", source, target],
                       capture_output=True, text=True)
    return r.returncode
def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        return "error " + errno.errorcode.get(e.errno, str(e.errno))
host, canary = "%(host)s", %(canary)d
out = {
    "canary": tcp(host, canary), "nfs": tcp(host, 2049), "metadata": tcp("169.254.169.254", 80),
    "ssh_of_the_host": tcp(host, 22), "own_app": read("/app/meta.json")[:1],
    "other_export": mount(host + ":%(other)s", "/mnt/other"), "store_root": mount(host + ":/models", "/mnt/models"),
    "wheels_root": mount(host + ":/wheels", "/mnt/wheels"), "pseudo_root": mount(host + ":/", "/mnt/root"),
}
out["other_via_root"] = read("/mnt/root%(other)s/SECRET.txt")
out["exports_seen"] = sorted(os.listdir("/mnt/root/miaas")) if out["pseudo_root"] == 0 else None
print("MIAAS-PROBE " + json.dumps(out), flush=True)
"""


def listen_on_the_host() -> tuple[socket.socket, int]:
    """A TCP listener on every address of the host (the VM network's 192.168.121.1 too): a stand-in controller."""
    server = socket.create_server(("0.0.0.0", 0))

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


def probe_from_the_vm(folder: Path, canary: int) -> dict[str, object]:
    """Run PROBE as root inside the deployment's VM (vagrant ssh, as the agent's vagrant sees it)."""
    script = PROBE % {"host": HOST_ON_VM_NETWORK, "canary": canary, "other": OTHER_EXPORT}
    encoded = base64.b64encode(script.encode()).decode()
    result = subprocess.run(["vagrant", "ssh", "-c", f"echo {encoded} | base64 -d | sudo python3 -"], cwd=folder,
                            env=vagrant_env(None), capture_output=True, text=True, timeout=300)
    for line in result.stdout.splitlines():
        if line.startswith("MIAAS-PROBE "):
            found: dict[str, object] = json.loads(line.split(" ", 1)[1])
            return found
    raise AssertionError(f"no probe result from the VM (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")


def test_a_model_is_deployed_into_a_real_vm_answers_logs_and_is_destroyed(cluster: LocalCluster,
                                                                            tmp_path: Path) -> None:
    started = time.monotonic()
    deployment_id = None
    try:
        # given the iris example in the model registry and an agent that offers the vagrant runtime
        package = pack_model(ROOT / "examples" / "iris", tmp_path / "iris.zip")
        uploaded = requests.post(f"{cluster.url('model-registry')}/registry/upload-and-validate", auth=auth(cluster),
                                 data={"model_name": "iris-vm"},
                                 files={"file": ("iris.zip", package.read_bytes(), "application/zip")}, timeout=60)
        assert uploaded.status_code == 201, uploaded.text
        model = uploaded.json()["model"]
        for _ in range(300):
            agents = requests.get(f"{cluster.url('controller')}/controller/agents", auth=auth(cluster),
                                  timeout=10).json()["agents"]
            if any(a["state"] == "alive" and "vagrant" in a["runtimes"] for a in agents):
                break
            time.sleep(0.2)

        # when it is deployed through the controller with the vagrant runtime
        deployed = requests.post(f"{cluster.url('controller')}/controller/deploy", auth=auth(cluster),
                                 json={"model_id": model["model_id"], "runtime": "vagrant"}, timeout=60)
        assert deployed.status_code in (201, 202), deployed.text
        deployment_id = deployed.json()["deployment_id"]
        deadline = time.monotonic() + DEPLOY_DEADLINE_S
        while True:
            d = requests.get(f"{cluster.url('controller')}/controller/deployments/{deployment_id}",
                             auth=auth(cluster), timeout=10).json()
            if d["status"] in ("running", "failed") or time.monotonic() > deadline:
                break
            time.sleep(2)
        up_after = time.monotonic() - started

        # then it runs in its own VM and answers predictions through the forwarded port
        assert d["status"] == "running", f"{d}\n{diagnostics(cluster, deployment_id)}"
        assert d["runtime"] == "vagrant" and d["agent_id"] == "agent-1"
        domain = f"miaas-{deployment_id}"
        assert virsh("domstate", domain).stdout.strip() == "running"
        answer = requests.post(f"{d['url']}/predict", json={"features": [SETOSA, VIRGINICA]}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == ["setosa", "virginica"]

        # and the agent's logs show the provisioning and the model's own output (from inside the VM)
        logs_url = f"{cluster.url('agent-1')}/deployments/{deployment_id}/logs"
        logs = requests.get(logs_url, params={"tail": 300}, auth=auth(cluster), timeout=30).text
        assert "Running provisioner: miaas" in logs and "installing the wheels of requirements.txt" in logs
        assert "iris model: 3 classes, 4 features, starting on port 5000" in logs, logs
        assert "waitress Serving on http://0.0.0.0:5000" in logs, logs
        followed = requests.get(logs_url, params={"tail": 5, "follow": "true", "max_s": 3}, auth=auth(cluster),
                                timeout=30, stream=True)
        assert "waitress Serving on" in followed.text
        print(f"deployed and answering after {up_after:.0f} s")

        # and it is isolated: from inside its VM, no port of the host answers but NFS (a listener standing for the
        # controller does not), nor the metadata address, nor another model's version folder over NFS
        assert subprocess.run(["nft", "list", "table", "inet", "miaas_vms"], capture_output=True).returncode == 0
        canary, canary_port = listen_on_the_host()
        probed = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", canary_port), timeout=5):
                pass  # the listener answers on the host itself: the VM's failure below is the firewall's doing
            seen = probe_from_the_vm(cluster.state_dir / "agent-1" / deployment_id / "vm", canary_port)
        finally:
            with contextlib.suppress(OSError):  # wakes the accepting thread, so the port is really closed
                canary.shutdown(socket.SHUT_RDWR)
            canary.close()
        print(f"isolation probed from inside the VM in {time.monotonic() - probed:.0f} s: {seen}")
        assert seen["canary"] in ("EHOSTUNREACH", "timeout"), seen
        assert seen["ssh_of_the_host"] in ("EHOSTUNREACH", "timeout"), seen
        assert seen["metadata"] in ("EHOSTUNREACH", "timeout", "ENETUNREACH"), seen
        assert seen["nfs"] == "connected", seen  # what it needs still works
        assert seen["own_app"] == "{", seen  # its own version folder is mounted at /app
        assert seen["other_export"] != 0 and seen["store_root"] != 0 and seen["wheels_root"] != 0, seen
        assert str(seen["other_via_root"]).startswith("error"), seen
        assert deployment_id in seen["exports_seen"] and set(seen["exports_seen"]) <= {deployment_id, "d-other"}, seen  # type: ignore[operator, arg-type]
        exports = Path(cluster.state_dir / "nfs" / "vm-exports.conf").read_text()
        assert f'Pseudo = "/miaas/{deployment_id}/app";' in exports and "/24" not in exports
        again = requests.post(f"{d['url']}/predict", json={"features": [SETOSA]}, timeout=30)
        assert again.status_code == 200 and again.json()["predictions"] == ["setosa"]  # still served

        # when it is stopped through the controller
        stopped = requests.post(f"{cluster.url('controller')}/controller/stop", auth=auth(cluster),
                                json={"deployment_id": deployment_id}, timeout=120)

        # then the VM is gone: virsh no longer lists it, its URL no longer answers
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["status"] == "stopped", stopped.json()
        assert domain not in virsh("list", "--all", "--name").stdout.split()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{d['url']}/health", timeout=5)
        assert not (cluster.state_dir / "agent-1" / deployment_id / "vm").exists()
        # and its exports went with it
        assert deployment_id not in Path(cluster.state_dir / "nfs" / "vm-exports.conf").read_text()
        print(f"VM test done in {time.monotonic() - started:.0f} s")
    except BaseException:
        print(diagnostics(cluster, deployment_id))
        raise
