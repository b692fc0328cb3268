"""VM deployment speed: deploy → URL answers with the vagrant runtime, as a ratio to a bare boot of the same image.

Both are measured in the same run, on the same box image, with the same CPUs, memory and acceleration:
- bare: `qemu-system-x86_64` boots a throwaway overlay of the box image until the login prompt on its console;
- deploy: an agent (in process, vagrant runtime, real Vagrant/libvirt/NFS) gets `POST /create-vm` for the iris
  example, and the clock stops when the deployment's URL answers `GET /health` with 200 (through the forwarded
  port). It includes `vagrant up` (domain, boot, SSH), the NFS mounts, the install from the wheelhouse, the
  setup commands and the model's start.
One-time costs stay out of the timing: the box build (bootstrap/build-box.sh), the wheelhouse of the example's
requirements, and vagrant-libvirt's copy of the box into the storage pool (a warm-up deployment when missing).
The agent runs on an identity from a throwaway CA (`miaas.cluster.Pki`): its credential file holds a certificate
of role agent bound to its URL, loaded as the agent loads it at start, and the commands are signed as the
controller (the only role that commands agents).
Goal (issue 5): ratio <= 1.5. Prints the figures; never fails on them.

Run as root: .venv/bin/python bench/vm_deploy.py [--acceleration tcg|kvm] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from agent.app import create_app, parts
from agent.credential import obtain
from agent.fetch import ModelSource
from agent.nfsdev import DevNfsServer
from agent.runtimes.wheelhouse import Wheelhouse
from agent.settings import AgentSettings
from agent.vmhost import INSTALL, LibvirtDaemons, missing_packages
from miaas import identity
from miaas.bus import MemoryBus
from miaas.cluster import Pki
from miaas.schemas import PackageMeta
from miaas.testing import SigningClient

ROOT = Path(__file__).resolve().parents[1]
BOX = "miaas/debian12"


def build_box() -> Path:
    """The box image (bootstrap/build-box.sh builds it, or reuses its cached build)."""
    subprocess.run(["bash", str(ROOT / "bootstrap" / "build-box.sh")], check=True, stdout=subprocess.DEVNULL)
    home = Path.home() / ".vagrant.d"
    return home / "boxes" / BOX.replace("/", "-VAGRANTSLASH-") / "0" / "libvirt" / "box.img"


def model_store(root: Path) -> Path:
    """The iris example as the model registry stores a version: read-only files under <store>/<model>/v1."""
    version = root / "store" / "m-iris" / "v1"
    version.mkdir(parents=True)
    for name in ("app.py", "meta.json", "model.pth", "requirements.txt"):
        shutil.copy2(ROOT / "examples" / "iris" / name, version / name)
        (version / name).chmod(0o444)
    version.chmod(0o555)
    return version


def bare_boot(image: Path, work: Path, *, cpus: int, memory_mb: int, acceleration: str, timeout: float) -> float:
    """Seconds from starting qemu on an overlay of the image to the login prompt on its serial console."""
    overlay = work / "bare.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(overlay)],
                   check=True)
    cpu = ["-accel", "kvm", "-cpu", "host"] if acceleration == "kvm" else ["-accel", "tcg", "-cpu", "Nehalem"]
    argv = ["qemu-system-x86_64", *cpu, "-m", str(memory_mb), "-smp", str(cpus), "-display", "none", "-vga", "none",
            "-monitor", "none", "-serial", "stdio", "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-nic", "user,model=virtio-net-pci"]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = b""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        while b"login:" not in seen:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                raise RuntimeError(f"qemu ended before the login prompt:\n{seen[-2000:].decode(errors='replace')}")
            seen += chunk
        return time.monotonic() - started
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
        overlay.unlink(missing_ok=True)


def box_in_pool() -> bool:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "vol-list", "default"], capture_output=True, text=True)
    return BOX.replace("/", "-VAGRANTSLASH-") + "_vagrant_box_image_" in out.stdout


def deploy(client: SigningClient, deployment_id: str, timeout: float) -> tuple[float, dict]:  # type: ignore[type-arg]
    """Seconds from POST /create-vm to the deployment's URL answering GET /health with 200."""
    started = time.monotonic()
    created = client.post("/create-vm", json={"deployment_id": deployment_id, "model_id": "m-iris", "version": 1,
                                              "runtime": "vagrant"})
    assert created.status_code == 202, created.json
    url = created.json["url"]
    while time.monotonic() - started < timeout:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - started, created.json
        except requests.RequestException:
            pass
        state = client.get(f"/deployments/{deployment_id}").json
        if state["status"] == "failed":
            raise RuntimeError(f"the deployment failed: {state['reason']}")
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acceleration", choices=["tcg", "kvm"], default="tcg")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if missing := missing_packages():
        raise SystemExit(f"missing packages {missing}: {INSTALL}")

    image = build_box()
    work = Path(tempfile.mkdtemp(prefix="miaas-vm-bench-", dir=args.dir))
    work.chmod(0o755)
    version = model_store(work)
    meta = PackageMeta.model_validate_json((version / "meta.json").read_text())
    pki = Pki.ensure(work / "pki")
    agent_id, agent_url = "agent-bench", "http://127.0.0.1:8600"  # the URL it would serve at (it is not served)
    credential_file = work / "agent" / "credential.json"
    pki.ca().credential(agent_id, identity.AGENT, now=time.time(), url=agent_url).save(credential_file)
    settings = AgentSettings(
        ca_file=pki.ca_file, credential_file=credential_file, agent_id=agent_id, runtimes=["vagrant"],
        state_dir=work / "agent", model_store=work / "store", wheelhouse_dir=work / "wheels",
        vagrant_acceleration=args.acceleration, provision_timeout_s=args.timeout, port_range="24000-24099",
        stop_deployments_on_exit=True,
    )
    (work / "wheels").mkdir(mode=0o755)
    cpus, memory_mb = max(1, int(-(-meta.resources.cpus // 1))), max(meta.resources.memory_mb, 512)
    with LibvirtDaemons(work / "libvirt"), DevNfsServer({"/models": work / "store", "/wheels": work / "wheels"},
                                                       work / "nfs"):
        Wheelhouse(settings.wheelhouse_dir).ensure(
            version / "requirements.txt", deadline=time.monotonic() + 600, cancelled=threading.Event(),
            run=lambda argv, what: subprocess.run(argv, check=True, cwd=version, capture_output=True),
        )
        app = create_app(settings, MemoryBus(), fetch_model=lambda m, v: ModelSource(version, meta, None))
        # Its credential file, checked as at start (this cluster's, this agent's, bound to its URL); no metrics.
        parts(app).credential.set(obtain(settings, agent_url, controller_url=None, now=time.time()))
        app.test_client_class = SigningClient
        client = app.test_client()
        assert isinstance(client, SigningClient)
        client.credential = identity.Credential.load(pki.credentials["controller"])  # the cluster's controller
        try:
            if not box_in_pool():
                print("warm-up: vagrant-libvirt copies the box into the storage pool (once per box build)")
                warm, _ = deploy(client, "bench-warmup", args.timeout)
                client.post("/stop-vm", json={"deployment_id": "bench-warmup"})
                print(f"warm-up deployment: {warm:.1f} s")
            bare = bare_boot(image, work, cpus=cpus, memory_mb=memory_mb, acceleration=args.acceleration,
                             timeout=args.timeout)
            print(f"bare qemu boot to the login prompt ({args.acceleration}, {cpus} vCPU, {memory_mb} MB): "
                  f"{bare:.1f} s", flush=True)
            seconds, created = deploy(client, "bench-1", args.timeout)
            answer = requests.post(f"{created['url']}/predict", json={"features": [5.1, 3.5, 1.4, 0.2]}, timeout=10)
            print(f"deploy -> URL answers (vagrant runtime): {seconds:.1f} s; "
                  f"prediction {answer.json()['predictions']}")
            print(json.dumps({"bare_boot_s": round(bare, 1), "deploy_s": round(seconds, 1),
                              "ratio": round(seconds / bare, 2), "goal": 1.5}))
            steps = [line for line in client.get("/deployments/bench-1/logs?tail=400").text.splitlines()
                     if any(mark in line for mark in ("[agent", "==>", "[provision")) and " -- " not in line]
            print("timeline of the deployment:\n  " + "\n  ".join(steps[-50:]))
        finally:
            parts(app).shutdown()
    shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
