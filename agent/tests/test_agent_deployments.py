"""Deployments through the agent's HTTP API with the process runtime: up, answering, logged, stopped, failed."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import requests
from flask import Flask

from agent.app import parts
from agent.runtimes.process import answers
from agent.settings import AgentSettings
from miaas.bus import DEPLOYMENT_EVENTS, MemoryBus
from miaas.identity import CONTROLLER
from miaas.schemas import DeploymentEvent
from miaas.testing import Pki


def statuses(bus: MemoryBus, deployment_id: str) -> list[str]:
    events = [m for m in bus.on(DEPLOYMENT_EVENTS) if isinstance(m, DeploymentEvent)]
    return [e.status.value for e in events if e.deployment_id == deployment_id]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def status_of(client: Any, deployment_id: str) -> str:
    return str(client.get(f"/deployments/{deployment_id}").json["status"])


def settled(client: Any, deployment_id: str, eventually: Any) -> dict[str, Any]:
    """The deployment once provisioning is over (running or failed)."""
    return eventually(  # type: ignore[no-any-return]
        lambda: (d := client.get(f"/deployments/{deployment_id}").json)["status"] != "provisioning" and d,
        60, f"{deployment_id} to leave provisioning",
    )


def test_a_model_is_deployed_answers_logs_and_is_stopped_over_http(  # type: ignore[no-untyped-def]
    agent_app: Flask, bus: MemoryBus, store, serve, pki: Pki, signed_session, eventually, monkeypatch
) -> None:
    # given a model version on the store, an agent served over HTTP, and a join token in the agent's environment
    store.add("tiny", 1, ports={"backend": 5000, "frontend": 8501})
    monkeypatch.setenv("AGENT_JOIN_TOKEN", pki.join_token())
    agent = serve(agent_app)
    http = signed_session(CONTROLLER)

    # when the controller asks for a deployment
    created = http.post(f"{agent.url}/create-vm", json={"deployment_id": "dep-1", "model_id": "tiny", "version": 1},
                        timeout=10)

    # then it is accepted at once, provisioning, with its URL and one host port per named port
    assert created.status_code == 202
    body = created.json()
    assert body["status"] == "provisioning"
    assert body["url"] == f"http://127.0.0.1:{body['port']}"
    assert list(body["ports"]) == ["backend", "frontend"]
    assert body["ports"]["backend"] == body["port"] != body["ports"]["frontend"]

    # and it becomes running, and the model answers at its URL from its own venv, without the join token
    eventually(lambda: http.get(f"{agent.url}/deployments/dep-1", timeout=5).json()["status"] == "running", 60,
               "dep-1 running")
    model = requests.get(f"{body['url']}/predict", timeout=5).json()
    assert model["model"] == "tiny"
    assert model["deployment"] == "dep-1"
    assert model["named_port"] == str(body["port"])
    assert model["leaked_token"] is None
    assert model["prefix"].startswith(str(agent_app.extensions["agent"].settings.venv_cache_dir))

    # and the logs route shows the provisioning and the model's own output
    logs = http.get(f"{agent.url}/deployments/dep-1/logs", params={"tail": 50}, timeout=5)
    assert logs.headers["Content-Type"].startswith("text/plain")
    assert "setting up in" in logs.text
    assert f"tiny model listening on {body['port']}" in logs.text
    assert "tiny model served /predict" in logs.text
    assert len(http.get(f"{agent.url}/deployments/dep-1/logs?tail=2", timeout=5).text.splitlines()) == 2

    # when it is stopped (twice)
    stopped = http.post(f"{agent.url}/stop-vm", json={"deployment_id": "dep-1"}, timeout=30)
    again = http.post(f"{agent.url}/stop-vm", json={"deployment_id": "dep-1"}, timeout=30)

    # then it is stopped, its port no longer answers and is released, and every change was published in order
    assert (stopped.status_code, stopped.json()["status"]) == (200, "stopped")
    assert (again.status_code, again.json()["status"]) == (200, "stopped")
    assert not answers(body["port"], None)
    assert parts(agent_app).manager.ports.held() == {}
    assert statuses(bus, "dep-1") == ["provisioning", "running", "stopping", "stopped"]
    event = bus.on(DEPLOYMENT_EVENTS)[-1]
    assert isinstance(event, DeploymentEvent)
    assert (event.source, event.agent_id, event.url) == ("agent", "agent-test-1", body["url"])
    assert [k for t, k, _ in bus.messages if t == DEPLOYMENT_EVENTS] == ["dep-1"] * 4


def test_start_commands_that_exit_at_once_fail_with_the_log_tail(client, bus, store, eventually) -> None:  # type: ignore[no-untyped-def]
    crash = "python -c 'import sys; print(\"boom: no model here\"); sys.exit(3)'"
    store.add("broken", start=["echo about to start", crash])
    created = client.post("/create-vm", json={"deployment_id": "dep-2", "model_id": "broken", "version": 1}).json

    failed = settled(client, "dep-2", eventually)

    assert failed["status"] == "failed"
    assert "exited with code 3" in failed["reason"]
    assert "boom: no model here" in failed["reason"]
    assert parts(client.application).manager.ports.held() == {}
    assert not answers(created["port"], None)
    assert statuses(bus, "dep-2") == ["provisioning", "failed"]
    assert bus.on(DEPLOYMENT_EVENTS)[-1].reason == failed["reason"]  # type: ignore[attr-defined]


def test_a_failing_setup_command_fails_the_deployment(client, bus, store, eventually) -> None:  # type: ignore[no-untyped-def]
    store.add("unready", setup=["echo preparing", "ls /no/such/folder"])
    client.post("/create-vm", json={"deployment_id": "dep-3", "model_id": "unready", "version": 1})

    failed = settled(client, "dep-3", eventually)

    assert failed["status"] == "failed"
    assert "setup command 2 (ls /no/such/folder) failed with exit code 2" in failed["reason"]
    assert "No such file or directory" in failed["reason"]
    assert "tiny model listening" not in client.get("/deployments/dep-3/logs").text
    assert statuses(bus, "dep-3") == ["provisioning", "failed"]


def test_a_model_that_never_answers_fails_at_the_provisioning_timeout(  # type: ignore[no-untyped-def]
    make_agent, settings: AgentSettings, store, eventually, pki: Pki
) -> None:
    app = make_agent(settings.model_copy(update={"provision_timeout_s": 3.0}))
    client = pki.client(app, CONTROLLER)
    store.add("silent", start=["echo I will never listen", "sleep 600"])
    client.post("/create-vm", json={"deployment_id": "dep-4", "model_id": "silent", "version": 1})

    failed = settled(client, "dep-4", eventually)

    assert failed["status"] == "failed"
    assert "did not answer GET /health → 2xx within 3 s" in failed["reason"]
    assert "I will never listen" in failed["reason"]


def test_create_is_idempotent_by_deployment_id(client, bus, store, eventually) -> None:  # type: ignore[no-untyped-def]
    store.add("tiny")
    body = {"deployment_id": "dep-5", "model_id": "tiny", "version": 1}
    answers_: list[Any] = []
    twins = [threading.Thread(target=lambda: answers_.append(client.post("/create-vm", json=body))) for _ in range(3)]
    for t in twins:
        t.start()
    for t in twins:
        t.join()
    later = client.post("/create-vm", json=body)

    assert {r.status_code for r in [*answers_, later]} == {202}
    assert len({r.json["port"] for r in [*answers_, later]}) == 1
    assert [d["deployment_id"] for d in client.get("/deployments").json["deployments"]] == ["dep-5"]
    assert settled(client, "dep-5", eventually)["status"] == "running"
    assert statuses(bus, "dep-5") == ["provisioning", "running"]

    other = client.post("/create-vm", json={**body, "version": 2})
    assert other.status_code == 409


def test_stop_during_provisioning_cancels_it(client, bus, store, eventually) -> None:  # type: ignore[no-untyped-def]
    store.add("slow", setup=["echo slow setup begins", "sleep 600"])
    client.post("/create-vm", json={"deployment_id": "dep-6", "model_id": "slow", "version": 1})
    eventually(lambda: "slow setup begins" in client.get("/deployments/dep-6/logs").text, 60, "the slow setup")

    stopped = client.post("/stop-vm", json={"deployment_id": "dep-6"})

    assert stopped.json["status"] == "stopped"
    assert statuses(bus, "dep-6") == ["provisioning", "stopping", "stopped"]
    assert parts(client.application).manager.ports.held() == {}


def test_a_model_that_dies_after_running_is_reported_failed(  # type: ignore[no-untyped-def]
    make_agent, settings, pki, bus, store, eventually
) -> None:
    # with AGENT_RESTART_ATTEMPTS=0 (by default it is restarted in place: test_agent_health.py)
    client = pki.client(make_agent(settings.model_copy(update={"restart_attempts": 0}), bus), CONTROLLER)
    store.add("fragile")
    url = client.post("/create-vm", json={"deployment_id": "dep-7", "model_id": "fragile", "version": 1}).json["url"]
    assert settled(client, "dep-7", eventually)["status"] == "running"

    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/exit", timeout=5)

    failed = eventually(lambda: (d := client.get("/deployments/dep-7").json)["status"] == "failed" and d, 30,
                        "dep-7 failed")
    assert "exited with code 7" in failed["reason"]
    assert "tiny model exits on request" in failed["reason"]
    assert statuses(bus, "dep-7") == ["provisioning", "running", "failed"]
    assert parts(client.application).manager.ports.held() == {}
    stopped = client.post("/stop-vm", json={"deployment_id": "dep-7"}).json
    assert stopped["status"] == "stopped"


def test_agent_shutdown_stops_every_deployment(agent_app: Flask, client, bus, store, eventually) -> None:  # type: ignore[no-untyped-def]
    store.add("tiny")
    port = client.post("/create-vm", json={"deployment_id": "dep-8", "model_id": "tiny", "version": 1}).json["port"]
    assert settled(client, "dep-8", eventually)["status"] == "running"

    parts(agent_app).shutdown()

    assert not answers(port, None)
    assert statuses(bus, "dep-8") == ["provisioning", "running", "stopping", "stopped"]


def test_unknown_deployments_and_runtimes(client, store) -> None:  # type: ignore[no-untyped-def]
    store.add("tiny")
    assert client.post("/stop-vm", json={"deployment_id": "nope"}).status_code == 404
    assert client.get("/deployments/nope").status_code == 404
    assert client.get("/deployments/nope/logs").status_code == 404
    vagrant = client.post("/create-vm", json={"deployment_id": "d", "model_id": "tiny", "version": 1,
                                              "runtime": "vagrant"})
    assert (vagrant.status_code, vagrant.json["error"]["code"]) == (400, "unknown_runtime")
    missing = client.post("/create-vm", json={"deployment_id": "d", "model_id": "absent", "version": 1})
    assert missing.status_code == 404
    assert client.get("/deployments").json["deployments"] == []


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model_id": "tiny", "version": 1}, "deployment_id"),
        ({"deployment_id": "../etc", "model_id": "tiny", "version": 1}, "deployment_id"),
        ({"deployment_id": "d", "model_id": "tiny", "version": 0}, "version"),
        ({"deployment_id": "d", "model_id": "tiny", "version": 1, "colour": "red"}, "colour"),
    ],
)
def test_a_bad_create_body_is_a_400_naming_the_field(client, body, field) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/create-vm", json=body)
    assert resp.status_code == 400
    assert resp.json["error"]["code"] == "validation_error"
    assert field in resp.json["error"]["message"]
    assert client.post("/create-vm", data="not json", content_type="application/json").status_code == 400
    assert client.get("/deployments/x/logs?tail=0").status_code == 400


def test_openapi_documents_the_agent_routes(client) -> None:  # type: ignore[no-untyped-def]
    doc = client.get("/openapi.json").json
    assert {"/create-vm", "/stop-vm", "/deployments", "/deployments/{deployment_id}",
            "/deployments/{deployment_id}/logs"} <= set(doc["paths"])
    assert "CreateVmRequest" in doc["components"]["schemas"]
