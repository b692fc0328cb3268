"""A broker that dies and comes back empty under a running cluster is a bus outage, not the death of every agent:
over real processes, real HTTP and the embedded broker (memory-only: a restart loses every topic and message),
started by the cluster itself so that it can be restarted.

Short liveness settings, as in test_e2e_failover.py: metrics every 0.5 s, an agent lost after 4 s of silence. The
broker stays down for 8 s, twice that. Deadlines are generous bounds for a slow machine, never assertions on time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from miaas.client import Signer
from miaas.cluster import LocalCluster
from miaas.identity import fixed
from miaas.package import pack_model

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
SETOSA = [5.1, 3.5, 1.4, 0.2]
FAST = {"AGENT_METRICS_INTERVAL_S": "0.5"}
LOST_AFTER_S = 4.0
OUTAGE_S = 8.0
T = TypeVar("T")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    state = tmp_path_factory.mktemp("bus-outage")
    ports = {name: 0 for name in ("broker", "service-registry", "model-registry", "controller", "frontend")}
    c = LocalCluster(state_dir=state, ports=ports, agents=[dict(FAST), dict(FAST)],
                     extra_env={"CONTROLLER_LOST_AFTER_S": str(LOST_AFTER_S), "CONTROLLER_RECONCILE_INTERVAL_S": "0.5"})
    c.start(timeout=120)
    try:
        yield c
    finally:
        c.stop()


def auth(c: LocalCluster) -> Signer:
    """Sign a request as the cluster's admin."""
    return Signer(fixed(c.admin))


def get(c: LocalCluster, path: str) -> Any:
    resp = requests.get(f"{c.url('controller')}{path}", auth=auth(c), timeout=10)
    resp.raise_for_status()
    return resp.json()


def eventually(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except requests.RequestException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def deploy(c: LocalCluster, model_id: str, wait: float = 300) -> dict[str, Any]:
    resp = requests.post(f"{c.url('controller')}/controller/deploy?wait={wait}", auth=auth(c),
                         json={"model_id": model_id}, timeout=wait + 30)
    assert resp.status_code in (201, 202), resp.text
    return resp.json()  # type: ignore[no-any-return]


def predicts(url: str) -> bool:
    answer = requests.post(f"{url}/predict", json={"features": SETOSA}, timeout=10)
    return answer.status_code == 200 and answer.json()["predictions"] == ["setosa"]


class Watch:
    """Polls the controller on a thread: every agent state and deployment record it shows, and its liveness."""

    def __init__(self, c: LocalCluster) -> None:
        self.c = c
        self.agent_states: set[str] = set()
        self.records: list[dict[str, Any]] = []
        self.suspended: list[dict[str, Any]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                listed = get(self.c, "/controller/agents")
                self.agent_states |= {a["state"] for a in listed["agents"]}
                if listed["liveness"]["suspended"]:
                    self.suspended.append(listed["liveness"])
                self.records += get(self.c, "/controller/deployments")["deployments"]
            except requests.RequestException:
                self.errors += 1
            self._stop.wait(0.2)


def test_a_broker_restarted_empty_loses_no_agent_and_moves_nothing(cluster: LocalCluster,
                                                                  tmp_path: Path) -> None:
    # given the example running on one of two agents
    package = pack_model(ROOT / "examples" / "iris", tmp_path / "iris.zip")
    resp = requests.post(
        f"{cluster.url('model-registry')}/registry/upload-and-validate", auth=auth(cluster),
        data={"model_name": "iris-outage"}, files={"file": ("iris.zip", package.read_bytes(), "application/zip")},
        timeout=60,
    )
    assert resp.status_code == 201, resp.text
    model_id = str(resp.json()["model"]["model_id"])
    d = deploy(cluster, model_id)
    assert d["status"] == "running", d
    assert predicts(d["url"])
    eventually(lambda: {a["state"] for a in get(cluster, "/controller/agents")["agents"]} == {"alive"}, 60,
               "both agents alive")

    with Watch(cluster) as watch:
        # when the broker dies, stays away for twice the agents' grace period, and comes back empty
        cluster.crash("broker")
        time.sleep(OUTAGE_S)
        assert watch.suspended, "loss decisions were never suspended while the broker was down"
        assert "bus" in {s["cause"] for s in watch.suspended}
        cluster.restart("broker")

        # then the view is rebuilt: both agents alive again, loss decisions no longer suspended
        eventually(lambda: (listed := get(cluster, "/controller/agents"))["agents"]
                   and {a["state"] for a in listed["agents"]} == {"alive"} and not listed["liveness"]["suspended"]
                   and len(listed["agents"]) == 2, 120, "both agents alive again")
        bus = get(cluster, "/controller/bus")
        assert bus["broker"]["answering"], bus
    # and no agent was ever lost, no record ever changed: the deployment kept its agent and generation
    assert "lost" not in watch.agent_states, watch.agent_states
    mine = [r for r in watch.records if r["deployment_id"] == d["deployment_id"]]
    assert mine and all((r["status"], r["agent_id"], r["generation"], r["updated_at"]) ==
                        ("running", d["agent_id"], d["generation"], d["updated_at"]) for r in mine), mine[-1]
    assert predicts(d["url"])

    # and a new deployment goes through the bus that came back: placed, reported running, answering
    fresh = deploy(cluster, model_id)
    assert fresh["status"] == "running", fresh
    assert predicts(fresh["url"])
    for x in (d, fresh):
        resp = requests.post(f"{cluster.url('controller')}/controller/stop", auth=auth(cluster),
                             json={"deployment_id": x["deployment_id"]}, timeout=60)
        assert resp.status_code == 200, resp.text
