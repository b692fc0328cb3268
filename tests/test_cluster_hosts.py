"""A real cluster on six hosts: `bootstrap/bootstrap.sh` installs it over SSH into network namespaces (each its own
IP, sshd and /etc/miaas, /opt/miaas, /var/lib/miaas), then the faults of a real network are played on it.

    h1 broker, service registry     h2 PostgreSQL            h3 model registry, portal
    h4 controller                   h5 controller, agent     h6 agent

The tests run in file order and share the cluster (module scope): each fault starts from what the previous one
left, and each says so. Needs root and openssh-server (tests/install-packages.sh installs it).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from miaas import identity
from miaas.client import SignedSession
from miaas.testhosts import NetnsHosts, missing_tools
from miaas.testing import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
ROLES = {"h1": "broker,service-registry", "h2": "database", "h3": "model-registry,portal", "h4": "controller",
         "h5": "controller,agent", "h6": "agent"}
LOST_AFTER_S = 10
SETTINGS = {"AGENT_METRICS_INTERVAL_S": "1", "MIAAS_HEARTBEAT_INTERVAL_S": "2", "CONTROLLER_LEADER_LEASE_S": "4",
            "CONTROLLER_LOST_AFTER_S": str(LOST_AFTER_S), "MIAAS_REVOCATION_INTERVAL_S": "3"}

APP = '''
"""A model of the standard library only: the hosts reach no package index."""
import json
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self._answer({"ok": True, "host": socket.gethostname()})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self._answer({"predictions": [sum(body.get("features", []))],
                      "deployment": os.environ.get("MIAAS_DEPLOYMENT_ID")})

    def _answer(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
'''


def package() -> bytes:
    meta = {"description": "sums its features", "setup_commands": ["python -c 'print(1)'"],
            "start_commands": ["python app.py"],
            "health_path": "/health", "artifacts": ["model.pth"],
            "resources": {"cpus": 0.1, "memory_mb": 64, "gpus": 0}}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("meta.json", json.dumps(meta))
        z.writestr("app.py", APP)
        z.writestr("requirements.txt", "# nothing: the standard library only\n")
        z.writestr("model.pth", b"weights")
    return buf.getvalue()


class Cluster:
    def __init__(self, hosts: NetnsHosts, cluster_file: Path) -> None:
        self.hosts = hosts
        self.file = cluster_file
        self.state = cluster_file.with_name(cluster_file.name + ".state")

    def bootstrap(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(ROOT / "bootstrap" / "bootstrap.sh"), str(self.file), *args],
                              capture_output=True, text=True, timeout=600)

    def url(self, host: str, role: str) -> str:
        ports = {"controller": 8520, "portal": 8080, "model-registry": 8510, "agent": 8600}
        return f"http://{self.hosts.hosts[host].address}:{ports[role]}"

    @property
    def admin(self) -> requests.Session:
        return SignedSession(identity.Credential.load(self.state / "pki" / "admin.json"))

    def controller_get(self, path: str) -> Any:
        """A read from whichever controller answers (reads work on the standby too)."""
        last: Exception | None = None
        for host in ("h4", "h5"):
            try:
                resp = self.admin.get(self.url(host, "controller") + path, timeout=5)
                if resp.status_code == 200:
                    return resp.json()
            except requests.RequestException as exc:
                last = exc
        raise AssertionError(f"no controller answered {path}: {last}")

    def leader(self) -> str | None:
        for host in ("h4", "h5"):
            try:
                s = self.admin.get(self.url(host, "controller") + "/controller/leader", timeout=3).json()
                if s.get("role") == "leader":
                    return host
            except (requests.RequestException, ValueError):
                continue
        return None

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        d: dict[str, Any] = self.controller_get(f"/controller/deployments/{deployment_id}")
        return d

    def deploy(self, model_id: str, version: int = 1) -> dict[str, Any]:
        """Deploy on the leader (a standby answers 503 not_leader naming it)."""
        for _ in range(60):
            leader = self.leader()
            if leader is not None:
                resp = self.admin.post(self.url(leader, "controller") + "/controller/deploy", timeout=30,
                                       json={"model_id": model_id, "version": version})
                if resp.status_code != 503:
                    assert resp.status_code in (200, 201, 202), resp.text
                    d: dict[str, Any] = resp.json()
                    return d
            time.sleep(0.5)
        raise AssertionError("no controller took the deploy")

    def running(self, deployment_id: str, timeout: float = 180) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            d = self.deployment(deployment_id)
            assert d["status"] != "failed", d
            return d if d["status"] == "running" else None
        return wait_for(check, timeout, f"{deployment_id} running", interval=0.5)

    def agent_copies(self, deployment_id: str) -> dict[str, str]:
        """Which agents hold a live copy of the deployment, by their own word (asked directly, as the operator)."""
        found = {}
        for host in ("h5", "h6"):
            try:
                resp = self.admin.get(self.url(host, "agent") + "/deployments", timeout=3)
            except requests.RequestException:
                continue
            for d in resp.json().get("deployments", []):
                if d["deployment_id"] == deployment_id and d["status"] in ("provisioning", "running"):
                    found[host] = d["status"]
        return found

    def unit_pids(self) -> dict[str, int | None]:
        pids = {}
        for name, h in self.hosts.hosts.items():
            status = h.root / "var-lib-miaas" / "supervise" / "status.json"
            for unit, s in json.loads(status.read_text())["units"].items():
                pids[f"{name}/{unit}"] = s.get("pid")
        return pids


def predict(url: str) -> Any:
    return requests.post(f"{url}/predict", json={"features": [1, 2, 3.5]}, timeout=5).json()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = missing_tools()
    if missing:
        pytest.skip("cannot make test hosts here: missing " + ", ".join(missing))
    hosts = NetnsHosts(count=6).setup()
    try:
        path = hosts.cluster_file(tmp_path_factory.mktemp("cluster") / "cluster.env", ROLES, SETTINGS)
        yield Cluster(hosts, path)
    finally:
        hosts.teardown()


@pytest.fixture(scope="module")
def model(cluster: Cluster) -> dict[str, Any]:
    """The model, uploaded through the portal host's portal as the admin, like a person would."""
    install = cluster.bootstrap()
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert "agents alive: agent-h5, agent-h6" in install.stdout, install.stdout
    portal = cluster.url("h3", "portal")
    password = re.search(r"^FRONTEND_ADMIN_PASSWORD=(.+)$", (cluster.state / "secrets.env").read_text(), re.M)
    assert password is not None
    web = requests.Session()

    def csrf(html: str) -> str:
        found = re.search(r'name="csrf_token" value="([^"]+)"', html)
        assert found, html[:300]
        return found.group(1)

    login = web.get(f"{portal}/login", timeout=10)
    logged = web.post(f"{portal}/login", timeout=10, data={"csrf_token": csrf(login.text), "username": "admin",
                                                           "password": password.group(1).strip()})
    assert logged.status_code == 200 and "Log out" in logged.text, logged.text[:500]
    form = web.get(f"{portal}/upload", timeout=10)
    uploaded = web.post(f"{portal}/upload", timeout=60, data={"csrf_token": csrf(form.text), "model_name": "summer"},
                        files={"file": ("summer.zip", package(), "application/zip")})
    notice = re.findall(r'role="alert"[^>]*>(.*?)</', uploaded.text, re.S)
    assert uploaded.status_code == 200 and "Uploaded summer version 1" in uploaded.text, notice or uploaded.text
    models = cluster.admin.get(cluster.url("h3", "model-registry") + "/registry/models", timeout=10).json()
    found = next(m for m in models["models"] if m["name"] == "summer")
    return {"model_id": found["model_id"], "install_output": install.stdout}


def test_install_then_deploy_and_predict_across_hosts(cluster: Cluster, model: dict[str, Any]) -> None:
    # given the cluster bootstrap.sh installed and the model uploaded through the portal (fixtures)
    # when it is deployed
    d = cluster.running(cluster.deploy(model["model_id"])["deployment_id"])
    # then a model on an agent host answers, at that host's address
    agent_host = next(n for n in ("h5", "h6") if cluster.hosts.hosts[n].address in d["url"])
    assert predict(d["url"])["predictions"] == [6.5]
    # and its files reached that agent by the pull path: its own cache, read-only, on its own disk
    cached = cluster.hosts.hosts[agent_host].root / "var-lib-miaas" / "agent" / "model-cache" / model["model_id"]
    assert (cached / "1" / "model" / "meta.json").is_file(), sorted(p.name for p in cached.parent.glob("*"))
    assert (cached / "1" / "model" / "app.py").stat().st_mode & 0o222 == 0
    model["first"] = d


def test_a_second_run_changes_nothing_and_restarts_nothing(cluster: Cluster, model: dict[str, Any]) -> None:
    before = cluster.unit_pids()
    again = cluster.bootstrap()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing changed, nothing restarted" in again.stdout, again.stdout
    assert cluster.unit_pids() == before
    check = cluster.bootstrap("--check")
    assert check.returncode == 0 and "nothing changed" in check.stdout, check.stdout


def test_a_short_partition_moves_nothing(cluster: Cluster, model: dict[str, Any]) -> None:
    d = model["first"]
    agent_host = next(n for n in ("h5", "h6") if cluster.hosts.hosts[n].address in d["url"])
    cluster.hosts.cut(agent_host)
    try:
        time.sleep(LOST_AFTER_S / 3)  # the fault itself: shorter than the grace period
    finally:
        cluster.hosts.heal(agent_host)
    healed = time.monotonic()
    # the agent's metrics come back (it is alive again), and for a whole grace period after the heal nothing
    # moves: the deployment stays where it ran and answers
    wait_for(lambda: any(a["agent_id"] == f"agent-{agent_host}" and a["state"] == "alive"
                         for a in cluster.controller_get("/controller/agents")["agents"]), 60,
             f"agent-{agent_host} alive again after the heal")
    print(f"short partition of {agent_host}: alive again {time.monotonic() - healed:.1f}s after the heal")
    while time.monotonic() < healed + LOST_AFTER_S + 2:
        after = cluster.deployment(d["deployment_id"])
        assert after["status"] == "running" and after["agent_id"] == d["agent_id"], after
        time.sleep(1)
    assert predict(d["url"])["predictions"] == [6.5]


def test_a_long_partition_moves_the_deployment_and_one_copy_remains(cluster: Cluster,
                                                                    model: dict[str, Any]) -> None:
    d = model["first"]
    agent_host = next(n for n in ("h5", "h6") if cluster.hosts.hosts[n].address in d["url"])
    other = "h6" if agent_host == "h5" else "h5"
    cut_at = time.monotonic()
    cluster.hosts.cut(agent_host)
    try:
        def moved() -> dict[str, Any] | None:
            x = cluster.deployment(d["deployment_id"])
            return x if x["status"] == "running" and x["agent_id"] == f"agent-{other}" else None
        now = wait_for(moved, 120, "the deployment running on the other agent", interval=0.5)
        took = time.monotonic() - cut_at
        print(f"partition of {agent_host}: running on {other} {took:.1f}s after the cut")
        assert predict(now["url"])["predictions"] == [6.5]
    finally:
        cluster.hosts.heal(agent_host)
    # after the heal, the cut-off agent's copy is stopped: exactly one copy remains, on the other agent
    wait_for(lambda: cluster.agent_copies(d["deployment_id"]) == {other: "running"}, 90,
             "exactly one copy after the heal", interval=0.5)
    model["first"] = now
    wait_for(lambda: all(a["state"] == "alive" for a in cluster.controller_get("/controller/agents")["agents"]),
             60, "the healed agent alive again")


def test_a_broker_restart_loses_no_agent_and_new_deploys_work(cluster: Cluster, model: dict[str, Any]) -> None:
    d = model["first"]
    h1 = cluster.hosts.hosts["h1"]
    done = subprocess.run(["ssh", *ssh_options(cluster), f"root@{h1.address}", "python3",
                           "/opt/miaas/bin/miaas-supervise.py", "ctl", "--state", "/var/lib/miaas/supervise",
                           "restart", "broker"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # for longer than the grace period, no agent is declared lost and nothing moves
    deadline = time.monotonic() + LOST_AFTER_S + 5
    while time.monotonic() < deadline:
        agents = cluster.controller_get("/controller/agents")["agents"]
        assert all(a["state"] != "lost" for a in agents), agents
        now = cluster.deployment(d["deployment_id"])
        assert now["status"] == "running" and now["agent_id"] == d["agent_id"], now
        time.sleep(1)
    wait_for(lambda: all(a["state"] == "alive" for a in cluster.controller_get("/controller/agents")["agents"]),
             60, "every agent alive on the rebuilt view")
    second = cluster.running(cluster.deploy(model["model_id"])["deployment_id"])
    assert predict(second["url"])["predictions"] == [6.5]
    model["second"] = second


def test_the_standby_takes_over_when_the_leader_host_stops(cluster: Cluster, model: dict[str, Any]) -> None:
    leader = wait_for(cluster.leader, 30, "a leader")
    standby = "h5" if leader == "h4" else "h4"
    stopped_at = time.monotonic()
    cluster.hosts.stop(leader)
    try:
        wait_for(lambda: cluster.leader() == standby, 60, f"{standby} leading")
        print(f"controller host {leader} stopped: {standby} leads {time.monotonic() - stopped_at:.1f}s later")
        # deploys keep working on the new leader
        d = cluster.running(cluster.deploy(model["model_id"])["deployment_id"])
        assert predict(d["url"])["predictions"] == [6.5]
    finally:
        cluster.hosts.restart(leader)
        again = cluster.bootstrap("--host", leader)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    # the restarted controller stands by (the lease stays with the new leader)
    assert cluster.leader() == standby
    wait_for(lambda: all(a["state"] == "alive" for a in cluster.controller_get("/controller/agents")["agents"]),
             90, "every agent alive after the controller host came back")


def test_models_keep_serving_while_the_model_registry_host_is_down(cluster: Cluster, model: dict[str, Any]) -> None:
    running = [d for d in cluster.controller_get("/controller/deployments")["deployments"] if d["status"] == "running"]
    assert running
    cluster.hosts.stop("h3")
    try:
        for d in running:
            assert predict(d["url"])["predictions"] == [6.5]
        # a deploy of a version the cluster has already resolved either runs from an agent's cache or says why not
        leader = wait_for(cluster.leader, 30, "a leader")
        resp = cluster.admin.post(cluster.url(leader, "controller") + "/controller/deploy", timeout=60,
                                  json={"model_id": model["model_id"], "version": 1})
        if resp.status_code in (200, 201, 202):
            d = cluster.running(resp.json()["deployment_id"])
            assert predict(d["url"])["predictions"] == [6.5]
            print(f"registry host down: a deploy of the cached version runs on {d['agent_id']}")
        else:
            print(f"registry host down: a deploy is refused: {resp.status_code} {resp.text[:300]}")
            error = resp.json()["error"]
            assert resp.status_code in (502, 503) and "registry" in error["message"].lower(), resp.text
    finally:
        cluster.hosts.restart("h3")
        again = cluster.bootstrap("--host", "h3")
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]


def ssh_options(cluster: Cluster) -> list[str]:
    return ["-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={cluster.state / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-i", str(cluster.hosts.key)]


def test_uninstall_removes_what_it_installed_and_keeps_the_data(cluster: Cluster, model: dict[str, Any]) -> None:
    done = cluster.bootstrap("uninstall")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name, h in cluster.hosts.hosts.items():
        # nothing of MIaaS runs any more: only the host's own sshd is left in it
        left = [p for p in h.pids() if "sshd" not in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        assert left == [], (name, [Path(f"/proc/{p}/cmdline").read_bytes() for p in left])
        assert not any((h.root / "etc-miaas").iterdir()) and not any((h.root / "opt-miaas").iterdir()), name
    # the data stays unless --purge: the database and the model store are still on their hosts' disks
    assert (cluster.hosts.hosts["h2"].root / "var-lib-miaas" / "postgresql" / "data" / "PG_VERSION").is_file()
    again = cluster.bootstrap("uninstall")
    assert again.returncode == 0 and "nothing to remove" in again.stdout, again.stdout
