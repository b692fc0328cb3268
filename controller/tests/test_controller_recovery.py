"""Recovery: records left mid-way (a controller killed between a decision and its command), commands that time
out, and agents that vanish; the reconcile loop brings each to a converged state."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from controller.store import DeploymentRow
from miaas.identity import CONTROLLER
from miaas.schemas import DeploymentStatus


def row(deployment_id: str, status: str, agent_id: str | None, **kw: Any) -> DeploymentRow:
    now = datetime.now(UTC)
    values: dict[str, Any] = dict(
        id=deployment_id, model_id="small", model_name="small", version=1, status=status, agent_id=agent_id,
        url=None, reason=None, runtime="process", cpus=1, memory_mb=256, gpus=0, placement=[], created_by=None,
        created_at=now, updated_at=now, priority=1, generation=1, attempts=0, requeue=False,
    )
    values.update(kw)
    return DeploymentRow(**values)


def create_on(cluster: Any, agent_id: str, deployment_id: str, generation: int = 1) -> None:
    """Start a copy on an agent directly, as a command sent before the controller died would have."""
    with cluster.session(CONTROLLER) as session:
        resp = session.post(f"{cluster.agents[agent_id].url}/create-vm", timeout=10,
                            json={"deployment_id": deployment_id, "model_id": "small", "version": 1,
                                  "generation": generation})
    assert resp.status_code == 202, resp.text


def test_a_placement_recorded_but_never_sent_is_sent_by_the_loop(make_cluster: Any) -> None:
    # given a deployment scheduled on an agent that never got the command (the controller died in between)
    cluster = make_cluster()
    agent = cluster.add_agent("a")
    cluster.controller.store.add(row("d-unsent", "scheduled", "a"))
    # then the reconcile loop sends it, and it runs there once
    cluster.until("d-unsent", lambda d: d["status"] == "running", "runs")
    assert agent.runtime.started == ["d-unsent"]


def test_a_preemption_cut_short_finishes_and_the_victim_is_queued_again(make_cluster: Any) -> None:
    # given a victim recorded as being stopped (preempted) whose agent still runs it
    cluster = make_cluster()
    agent = cluster.add_agent("a", cpus=1)
    create_on(cluster, "a", "d-victim")
    cluster.controller.store.add(row("d-victim", "stopping", "a", requeue=True, priority=0))
    # then the loop stops it there, queues it again, and (with the room back) places it anew
    back = cluster.until("d-victim", lambda d: d["status"] == "running" and d["generation"] == 2, "runs again")
    assert back["agent_id"] == "a"
    assert agent.runtime.started == ["d-victim", "d-victim"]


def test_a_deployment_on_an_agent_never_heard_from_again_is_lost_then_placed(make_cluster: Any) -> None:
    # given a deployment recorded as running on an agent this controller never hears from
    cluster = make_cluster()
    cluster.add_agent("b")
    cluster.controller.store.add(row("d-orphaned", "running", "ghost"))
    # then once the grace period is over it is lost, and placed on a live agent
    moved = cluster.until("d-orphaned", lambda d: d["status"] == "running" and d["agent_id"] == "b", "moves")
    assert moved["generation"] == 2
    assert [e.status for e in cluster.events("d-orphaned")][:2] == [DeploymentStatus.LOST, DeploymentStatus.SCHEDULED]


def test_a_create_that_times_out_does_not_fail_the_deployment_the_agent_s_report_decides(make_cluster: Any) -> None:
    # given an agent that answers create-vm only after the controller's timeout (2 s), yet does start the model
    cluster = make_cluster(command_retries=0)
    agent = cluster.add_agent("slow", create_delay_s=3)
    # when a deployment is placed there
    d = cluster.deploy("small").json
    # then it is not failed: it stays scheduled while the command is uncertain...
    assert d["status"] == "scheduled", d
    assert "the agent's reports decide" in d["reason"]
    # ...and runs once the agent reports it, with a single copy despite the retried (idempotent) command
    cluster.until(d["deployment_id"], lambda x: x["status"] == "running", "runs")
    assert agent.runtime.started == [d["deployment_id"]]
    assert DeploymentStatus.FAILED not in [e.status for e in cluster.events(d["deployment_id"])]


def test_stopping_a_deployment_whose_agent_is_lost_stops_it_and_the_agent_is_told_if_it_returns(
    make_cluster: Any, eventually: Any,
) -> None:
    cluster = make_cluster()
    agent = cluster.add_agent("a")
    d = cluster.deploy("small", wait=10).json
    cluster.silence("a")
    cluster.until(d["deployment_id"], lambda x: x["status"] == "lost", "is lost")  # nowhere else to go
    assert cluster.stop(d["deployment_id"]).json["status"] == "stopped"
    cluster.resume("a")
    eventually(lambda: agent.deployments()[d["deployment_id"]]["status"] == "stopped", 30, "the copy to stop")
