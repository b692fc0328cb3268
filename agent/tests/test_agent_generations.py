"""Generations: the controller numbers each placement of a deployment, and commands carry the number, so a
deployment that comes back to an agent starts anew and a stop meant for an old copy never stops a newer one."""

from __future__ import annotations

from typing import Any

from miaas.bus import DEPLOYMENT_EVENTS, MemoryBus
from miaas.schemas import DeploymentEvent


def create(client: Any, generation: int) -> dict[str, Any]:
    resp = client.post("/create-vm", json={"deployment_id": "dep-g", "model_id": "tiny", "version": 1,
                                           "generation": generation})
    assert resp.status_code == 202, resp.json
    return resp.json  # type: ignore[no-any-return]


def status_of(client: Any) -> tuple[str, int]:
    d = client.get("/deployments/dep-g").json
    return d["status"], d["generation"]


def test_a_deployment_placed_here_again_starts_anew_and_old_stops_spare_it(  # type: ignore[no-untyped-def]
    client, bus: MemoryBus, store, eventually
) -> None:
    # given a copy of generation 1 that ran here and was stopped (the deployment moved away)
    store.add("tiny")
    create(client, 1)
    eventually(lambda: status_of(client) == ("running", 1), 60, "generation 1 to run")
    assert client.post("/stop-vm", json={"deployment_id": "dep-g", "generation": 1}).json["status"] == "stopped"

    # when the same create is repeated, nothing starts again (idempotent)
    assert create(client, 1)["status"] == "stopped"

    # when the deployment comes back here as generation 3, a new copy starts
    assert create(client, 3)["generation"] == 3
    eventually(lambda: status_of(client) == ("running", 3), 60, "generation 3 to run")

    # and a late stop meant for the old copy leaves the new one running
    late = client.post("/stop-vm", json={"deployment_id": "dep-g", "generation": 1}).json
    assert (late["status"], late["generation"]) == ("running", 3)
    # while a repeated create of an older generation answers what is held
    assert (create(client, 2)["status"], status_of(client)) == ("running", ("running", 3))

    # and every event says which placement it belongs to
    events = [e for e in bus.on(DEPLOYMENT_EVENTS) if isinstance(e, DeploymentEvent)]
    assert [(e.status.value, e.generation) for e in events] == [
        ("provisioning", 1), ("running", 1), ("stopping", 1), ("stopped", 1), ("provisioning", 3), ("running", 3)]
    client.post("/stop-vm", json={"deployment_id": "dep-g"})


def test_a_newer_placement_adopts_a_copy_that_still_runs(client, store, eventually) -> None:  # type: ignore[no-untyped-def]
    # given a copy of generation 1 running (the deployment came back before this agent was told to stop it)
    store.add("tiny")
    create(client, 1)
    eventually(lambda: status_of(client) == ("running", 1), 60, "generation 1 to run")
    # when generation 2 is placed here, the running copy serves it: nothing restarts
    assert (create(client, 2)["status"], status_of(client)) == ("running", ("running", 2))
    metrics_report = client.application.extensions["agent"].manager.reports()
    assert [(r.deployment_id, r.generation) for r in metrics_report] == [("dep-g", 2)]
    client.post("/stop-vm", json={"deployment_id": "dep-g"})
