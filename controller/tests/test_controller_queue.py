"""The pending queue, priorities and preemption, with the controller's reconcile loop and real agents over HTTP."""

from __future__ import annotations

from typing import Any


def running(d: dict[str, Any]) -> bool:
    return d["status"] == "running"


def test_nothing_fits_so_it_waits_pending_with_the_reason_and_runs_when_an_agent_joins(make_cluster: Any) -> None:
    # given a controller that knows no agent
    cluster = make_cluster()
    # when a model is deployed
    resp = cluster.deploy("small")
    # then it is accepted and waits, saying why
    assert resp.status_code == 202, resp.json
    d = resp.json
    assert d["status"] == "pending"
    assert d["reason"].startswith("no live agent")
    assert d["priority"] == "normal"
    # when an agent joins, it is placed there and runs
    cluster.add_agent("a")
    placed = cluster.until(d["deployment_id"], running, "runs")
    assert placed["agent_id"] == "a" and placed["generation"] == 1
    assert cluster.agents["a"].deployments()[d["deployment_id"]]["status"] == "running"


def test_a_freed_place_goes_to_the_highest_priority_then_the_oldest(make_cluster: Any) -> None:
    # given one agent with room for one small model, taken, and preemption off
    cluster = make_cluster(preemption=False)
    cluster.add_agent("a", cpus=1)
    first = cluster.deploy("small", wait=10).json
    assert first["status"] == "running"
    # and three waiting: low (oldest), high, then high again (newest); priorities by name or by number
    low = cluster.deploy("small", priority="low").json
    high = cluster.deploy("small", priority=2).json
    high_later = cluster.deploy("small", priority="HIGH").json
    assert [low["status"], high["status"], high_later["status"]] == ["pending"] * 3
    assert (low["priority"], high["priority"], high_later["priority"]) == ("low", "high", "high")
    assert "1 CPUs" in low["reason"]
    # when the running one stops, the oldest high-priority deployment takes its place
    cluster.stop(first["deployment_id"])
    cluster.until(high["deployment_id"], running, "runs")
    assert cluster.get(low["deployment_id"])["status"] == "pending"
    assert cluster.get(high_later["deployment_id"])["status"] == "pending"
    # and then the other high one, the low one last
    cluster.stop(high["deployment_id"])
    cluster.until(high_later["deployment_id"], running, "runs")
    cluster.stop(high_later["deployment_id"])
    cluster.until(low["deployment_id"], running, "runs")


def test_a_higher_priority_preempts_the_fewest_lowest_which_go_back_to_the_queue(make_cluster: Any) -> None:
    # given an agent with 2 CPUs running a low and a normal deployment
    cluster = make_cluster()
    agent = cluster.add_agent("a", cpus=2)
    low = cluster.deploy("small", priority="low", wait=10).json
    normal = cluster.deploy("small", priority="normal", wait=10).json
    assert low["status"] == normal["status"] == "running"
    # when a critical one needs 1 CPU
    critical = cluster.deploy("small", priority=3).json
    # then the low one (only) is stopped on its agent and waits in the queue again, never dropped
    cluster.until(critical["deployment_id"], running, "runs", timeout=30)
    cluster.until(low["deployment_id"], lambda d: d["status"] == "pending", "is queued again")
    said = [(e.status.value, e.reason or "") for e in cluster.events(low["deployment_id"])]
    assert ("stopping", f"preempted by {critical['deployment_id']} (critical priority); back to the queue once "
                        "stopped") in said
    assert agent.deployments()[low["deployment_id"]]["status"] == "stopped"
    assert cluster.get(normal["deployment_id"])["status"] == "running"
    # when room appears again, the victim runs again on the same agent, as a new placement
    cluster.stop(critical["deployment_id"])
    back = cluster.until(low["deployment_id"], running, "runs again")
    assert back["generation"] == 2
    copy = agent.deployments()[low["deployment_id"]]
    assert (copy["status"], copy["generation"]) == ("running", 2)


def test_equal_priority_is_never_preempted(make_cluster: Any) -> None:
    cluster = make_cluster()
    cluster.add_agent("a", cpus=1)
    first = cluster.deploy("small", priority="high", wait=10).json
    second = cluster.deploy("small", priority="high").json
    assert second["status"] == "pending"
    cluster.controller.reconciler.tick()  # a few passes later, nothing changed
    cluster.controller.reconciler.tick()
    assert cluster.get(first["deployment_id"])["status"] == "running"
    assert cluster.get(second["deployment_id"])["status"] == "pending"


def test_an_unknown_priority_is_a_400(make_cluster: Any) -> None:
    cluster = make_cluster()
    for bad in ("urgent", 4, -1, 1.5):
        assert cluster.deploy("small", priority=bad).status_code == 400


def test_a_lost_agent_s_deployment_moves_and_the_copy_is_stopped_when_it_returns(
    make_cluster: Any, eventually: Any,
) -> None:
    # given two agents and a deployment on one of them
    cluster = make_cluster()
    a, b = cluster.add_agent("a"), cluster.add_agent("b")
    d = cluster.deploy("small", wait=10).json
    home, other = (a, b) if d["agent_id"] == "a" else (b, a)
    # when its agent falls silent long enough to be lost
    cluster.silence(home.agent_id)
    # then the deployment is re-placed on the other agent and runs there
    moved = cluster.until(d["deployment_id"], lambda x: running(x) and x["agent_id"] == other.agent_id, "moves")
    assert moved["generation"] == 2
    assert other.deployments()[d["deployment_id"]]["status"] == "running"
    assert home.deployments()[d["deployment_id"]]["status"] == "running"  # it never knew
    # when the agent comes back, it is told to stop the copy that was moved away, and only that one
    cluster.resume(home.agent_id)
    eventually(lambda: home.deployments()[d["deployment_id"]]["status"] == "stopped", 30, "the old copy stops")
    assert other.deployments()[d["deployment_id"]]["status"] == "running"
    assert cluster.get(d["deployment_id"])["status"] == "running"
