"""Deployments under failure, over real processes, real HTTP and the real broker (miaas.cluster.LocalCluster).

Short liveness settings, through the environment as a deployment would set them: agents send metrics every 0.5 s
(AGENT_METRICS_INTERVAL_S), so they are suspect after 1.5 s, and the controller calls an agent lost after 4 s of
silence (CONTROLLER_LOST_AFTER_S) and runs its reconcile loop every 0.5 s (CONTROLLER_RECONCILE_INTERVAL_S).
Deadlines below are generous bounds for a slow machine, never assertions on time; bench/failover.py measures.
"""

from __future__ import annotations

import signal
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
T = TypeVar("T")


@pytest.fixture(scope="module")
def cluster(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    state = tmp_path_factory.mktemp("failover")
    ports = {name: 0 for name in ("broker", "service-registry", "model-registry", "controller", "frontend")}
    c = LocalCluster(state_dir=state, bootstrap=broker, ports=ports, agents=[dict(FAST), dict(FAST)],
                     extra_env={"CONTROLLER_LOST_AFTER_S": "4", "CONTROLLER_RECONCILE_INTERVAL_S": "0.5"})
    c.start(timeout=120)
    try:
        yield c
    finally:
        for name in ("agent-1", "agent-2"):  # a test may leave one paused
            if c.proc(name).process.poll() is None:
                c.signal(name, signal.SIGCONT)
        c.stop()


@pytest.fixture(scope="module")
def model_id(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    package = pack_model(ROOT / "examples" / "iris", tmp_path_factory.mktemp("pkg") / "iris.zip")
    resp = requests.post(
        f"{cluster.url('model-registry')}/registry/upload-and-validate", auth=auth(cluster),
        data={"model_name": "iris-failover"}, files={"file": ("iris.zip", package.read_bytes(), "application/zip")},
        timeout=60,
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["model"]["model_id"])


def auth(c: LocalCluster) -> Signer:
    """Sign a request as the cluster's admin."""
    return Signer(fixed(c.admin))


def eventually(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except requests.RequestException:
            value = None  # a service restarting, a model not listening yet
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def deployment(c: LocalCluster, deployment_id: str) -> dict[str, Any]:
    resp = requests.get(f"{c.url('controller')}/controller/deployments/{deployment_id}", auth=auth(c), timeout=10)
    resp.raise_for_status()
    return resp.json()  # type: ignore[no-any-return]


def on_agent(c: LocalCluster, agent: str) -> dict[str, dict[str, Any]]:
    """What an agent itself says it holds."""
    resp = requests.get(f"{c.url(agent)}/deployments", auth=auth(c), timeout=10)
    resp.raise_for_status()
    return {d["deployment_id"]: d for d in resp.json()["deployments"]}


def live_copies(c: LocalCluster, deployment_id: str) -> list[str]:
    """The (living) agents that run, or are starting, a copy of the deployment."""
    return [agent for agent in ("agent-1", "agent-2") if c.proc(agent).process.poll() is None
            and on_agent(c, agent).get(deployment_id, {}).get("status") in ("provisioning", "running")]


def deploy(c: LocalCluster, model_id: str, wait: float = 300) -> dict[str, Any]:
    resp = requests.post(f"{c.url('controller')}/controller/deploy?wait={wait}", auth=auth(c),
                         json={"model_id": model_id}, timeout=wait + 30)
    assert resp.status_code in (201, 202), resp.text
    return resp.json()  # type: ignore[no-any-return]


def predicts(url: str) -> bool:
    answer = requests.post(f"{url}/predict", json={"features": SETOSA}, timeout=10)
    return answer.status_code == 200 and answer.json()["predictions"] == ["setosa"]


def stop(c: LocalCluster, deployment_id: str) -> None:
    resp = requests.post(f"{c.url('controller')}/controller/stop", auth=auth(c),
                         json={"deployment_id": deployment_id}, timeout=60)
    assert resp.status_code == 200, resp.text


def other(agent: str) -> str:
    return "agent-2" if agent == "agent-1" else "agent-1"


def test_a_killed_agent_s_deployment_runs_again_on_the_other_agent(cluster: LocalCluster, model_id: str) -> None:
    # given the example running on one of two agents
    d = deploy(cluster, model_id)
    assert d["status"] == "running", d
    home = d["agent_id"]
    assert predicts(d["url"])

    # when that agent's machine dies (SIGKILL to the agent and its models)
    cluster.crash(home)

    # then the deployment is running on the other agent, and answers there
    moved = eventually(lambda: (x := deployment(cluster, d["deployment_id"]))["status"] == "running"
                       and x["agent_id"] == other(home) and x, 180, "the deployment to run on the other agent")
    assert moved["generation"] == d["generation"] + 1
    assert eventually(lambda: predicts(moved["url"]), 60, "the moved model to answer")
    assert live_copies(cluster, d["deployment_id"]) == [other(home)]

    # the machine comes back empty; the deployment stays where it went
    cluster.restart(home)
    stop(cluster, d["deployment_id"])


def test_a_paused_agent_that_returns_is_told_to_stop_the_copy_that_moved(cluster: LocalCluster,
                                                                       model_id: str) -> None:
    # given the example running on one agent
    d = deploy(cluster, model_id)
    assert d["status"] == "running", d
    home = d["agent_id"]

    # when that agent is paused long enough to be lost (its model keeps running meanwhile)
    cluster.signal(home, signal.SIGSTOP)
    try:
        moved = eventually(lambda: (x := deployment(cluster, d["deployment_id"]))["status"] == "running"
                           and x["agent_id"] == other(home) and x, 180, "the deployment to run on the other agent")
    finally:
        # and then resumes
        cluster.signal(home, signal.SIGCONT)

    # then the controller tells it to stop its copy, and the moved one keeps running
    eventually(lambda: on_agent(cluster, home)[d["deployment_id"]]["status"] == "stopped", 60,
               "the returning agent to stop its old copy")
    assert live_copies(cluster, d["deployment_id"]) == [other(home)]
    assert deployment(cluster, d["deployment_id"])["status"] == "running"
    assert predicts(moved["url"])
    stop(cluster, d["deployment_id"])


def test_a_controller_killed_mid_deploy_converges_after_restart(cluster: LocalCluster, model_id: str) -> None:
    # given one deployment running, and a second one just asked for
    running = deploy(cluster, model_id)
    assert running["status"] == "running", running
    asked = deploy(cluster, model_id, wait=0)

    # when the controller is killed at once (kill -9) and started again
    cluster.signal("controller", signal.SIGKILL)
    cluster.proc("controller").process.wait()
    cluster.restart("controller")

    # then both deployments run, each on exactly one agent, the one the controller records
    for d in (running, asked):
        final = eventually(lambda d=d: (x := deployment(cluster, d["deployment_id"]))["status"] == "running" and x,
                           180, f"{d['deployment_id']} to run")
        assert eventually(lambda d=d, final=final: live_copies(cluster, d["deployment_id"]) == [final["agent_id"]],
                          60, f"{d['deployment_id']} to run on exactly one agent")
        assert predicts(final["url"])
    listed = requests.get(f"{cluster.url('controller')}/controller/deployments?active=true", auth=auth(cluster),
                          timeout=10).json()["deployments"]
    assert {x["deployment_id"] for x in listed} == {running["deployment_id"], asked["deployment_id"]}
    for d in (running, asked):
        stop(cluster, d["deployment_id"])
