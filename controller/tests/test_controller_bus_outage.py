"""A silent bus is not a mass death: the reconcile loop holds loss decisions while the bus does not answer or every
agent falls silent at once, then gives every agent a full grace period. Real agents over real HTTP, the in-process
bus of conftest.py (lost after 1 s, metrics every 0.1 s: an agent is quiet after 0.5 s)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from controller.liveness import BusHealth
from miaas.schemas import BrokerState, DeploymentEvent, DeploymentStatus


class FakeBus:
    """What the reconcile loop asks of `BusWatch`, with the answer a test sets."""

    def __init__(self) -> None:
        self.answering = True

    def health(self) -> BusHealth:
        return BusHealth(True) if self.answering else BusHealth(False, "no answer from the broker at test:9092")

    def state(self) -> BrokerState:
        return BrokerState(bootstrap="test:9092", answering=self.answering)


def agents(cluster: Any) -> dict[str, Any]:
    return cluster.client.get("/controller/agents").json  # type: ignore[no-any-return]


def hold(cluster: Any, seconds: float) -> list[str]:
    """Every agent state and deployment status seen while `seconds` pass (the lost ones are what matter)."""
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen += [a["state"] for a in agents(cluster)["agents"]]
        seen += [d.status.value for d in cluster.controller.store.all()]
        time.sleep(0.05)
    return seen


def test_every_agent_silent_at_once_is_a_disruption_nothing_moves_until_one_is_heard(
    make_cluster: Any, eventually: Any,
) -> None:
    # given two agents and a deployment on one of them
    cluster = make_cluster()
    a, b = cluster.add_agent("a"), cluster.add_agent("b")
    d = cluster.deploy("small", wait=10).json
    assert d["status"] == "running", d
    home, other = (a, b) if d["agent_id"] == "a" else (b, a)
    # when both fall silent at once (the path is cut, not the machines), for three grace periods
    cluster.silence("a")
    cluster.silence("b")
    eventually(lambda: agents(cluster)["liveness"]["suspended"], 10, "loss decisions to be suspended")
    assert "lost" not in hold(cluster, 3.0)
    # then nothing moved, and the view says why
    liveness = agents(cluster)["liveness"]
    assert liveness["cause"] == "disruption" and "fell silent together" in liveness["why"]
    assert {k: cluster.get(d["deployment_id"])[k] for k in ("status", "agent_id", "generation")} == {
        "status": "running", "agent_id": home.agent_id, "generation": d["generation"]}
    # when only the other agent is heard again, the deployment's agent is lost a grace period later, and moves
    cluster.resume(other.agent_id)
    eventually(lambda: not agents(cluster)["liveness"]["suspended"], 10, "loss decisions to resume")
    moved = cluster.until(d["deployment_id"], lambda x: x["status"] == "running" and x["agent_id"] == other.agent_id,
                          "moves to the agent heard again")
    assert moved["generation"] == d["generation"] + 1


def test_while_the_broker_does_not_answer_no_agent_is_lost_then_each_gets_a_full_grace_period(
    make_cluster: Any, eventually: Any,
) -> None:
    # given one agent (alone: its silence would be an ordinary loss) and its deployment, on a watched bus
    cluster = make_cluster()
    bus = cluster.controller.reconciler.bus = FakeBus()
    cluster.add_agent("a")
    d = cluster.deploy("small", wait=10).json
    assert d["status"] == "running", d
    # when the broker stops answering and the agent's metrics stop with it, for three grace periods
    bus.answering = False
    cluster.silence("a")
    eventually(lambda: agents(cluster)["liveness"]["cause"] == "bus", 10, "loss decisions to be suspended")
    assert "lost" not in hold(cluster, 3.0)
    assert agents(cluster)["agents"][0]["state"] == "suspect"  # held: never placed on, never lost
    assert "broker" in agents(cluster)["liveness"]["why"]
    # when the broker answers again, the agent gets a full grace period from that moment before it is lost
    bus.answering = True
    back = time.monotonic()
    eventually(lambda: not agents(cluster)["liveness"]["suspended"], 10, "loss decisions to resume")
    cluster.until(d["deployment_id"], lambda x: x["status"] == "lost", "is lost once its grace period ends")
    assert time.monotonic() - back >= 0.9  # lost_after_s is 1 s, counted from the bus's return
    grace = agents(cluster)["liveness"]
    assert grace["grace_until"] > grace["grace_from"]


def test_the_bus_route_says_whether_loss_decisions_are_suspended(make_cluster: Any) -> None:
    cluster = make_cluster()
    cluster.controller.reconciler.bus = bus = FakeBus()
    bus.answering = False
    client = cluster.client
    body = client.get("/controller/bus").json
    deadline = time.monotonic() + 10
    while not body["liveness"]["suspended"] and time.monotonic() < deadline:
        time.sleep(0.05)
        body = client.get("/controller/bus").json
    assert body["liveness"]["suspended"] and body["liveness"]["cause"] == "bus"
    assert body["broker"] == {"bootstrap": "test:9092", "answering": False, "problem": None, "answered_at": None,
                              "topics": {}, "topics_recreated": 0}


def test_an_agent_event_without_a_generation_changes_nothing(make_cluster: Any) -> None:
    # given a deployment running on its agent
    cluster = make_cluster()
    cluster.add_agent("a")
    d = cluster.deploy("small", wait=10).json
    assert d["status"] == "running", d
    # when events arrive that claim it failed: without a generation, or about another placement
    for generation in (None, d["generation"] + 1, d["generation"] - 1):
        cluster.controller.observe_event(DeploymentEvent(
            deployment_id=d["deployment_id"], agent_id="a", status=DeploymentStatus.FAILED, reason="forged",
            source="agent", at=datetime.now(UTC), generation=generation,
        ))
    # then the record is as it was
    after = cluster.get(d["deployment_id"])
    assert (after["status"], after["generation"], after["updated_at"]) == ("running", d["generation"],
                                                                           d["updated_at"])
