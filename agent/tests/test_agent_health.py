"""The health watch of running deployments, with the real agent app and real model processes: a model that dies
or stops answering its health_path is restarted in place (same id, port, generation) with a growing backoff, is
failed after too many restarts, and a stop (in a backoff too) ends it for good."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from pydantic import ValidationError

from agent.app import parts
from agent.health import HealthPolicy, probe
from agent.manager import DeploymentManager
from agent.ports import PortAllocator
from agent.runtimes.base import DeploymentSpec, RecoveredDeployment
from agent.runtimes.process import ProcessRuntime
from agent.runtimes.sandbox import NoSandbox
from agent.runtimes.venvs import VenvCache
from agent.settings import AgentSettings
from miaas.bus import DEPLOYMENT_EVENTS, SYSTEM_METRICS, MemoryBus
from miaas.identity import CONTROLLER
from miaas.schemas import AgentMetrics, DeploymentEvent, DeploymentStatus, PackageMeta
from miaas.testing import Pki

# A model that can be made to fail its health check without exiting: GET /sick makes this copy answer 500 on
# /health until it is restarted; a file `sick` in its folder makes every copy answer 500 after its first health
# check (so that each copy starts, then fails its health checks); a file `crash` makes
# every new copy exit at once, a file `slow` makes every new copy wait 600 s before it listens. GET / names the
# copy (a token made at its start).
SICK_APP = '''
import os
import secrets
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

COPY = secrets.token_hex(8)
SICK = []
ANSWERED = []
if os.path.exists("slow"):
    print("sick model takes its time to start", flush=True)
    time.sleep(600)
if os.path.exists("crash"):
    print("sick model crashes at start", flush=True)
    raise SystemExit(3)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/exit":
            print("sick model exits on request", flush=True)
            os._exit(7)
        if self.path == "/sick":
            SICK.append(1)
        if self.path == "/health" and (SICK or (ANSWERED and os.path.exists("sick"))):
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/health":
            ANSWERED.append(1)
        body = COPY.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


port = int(os.environ["PORT"])
print(f"sick model {COPY} listening on {port}", flush=True)
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''

FAST = {"health_interval_s": 0.1, "health_timeout_s": 2.0, "health_failures": 2, "restart_delay_s": 0.1,
        "restart_max_delay_s": 5.0, "restart_attempts": 5, "restart_window_s": 300.0}


def with_settings(**update: Any) -> pytest.MarkDecorator:
    """The test's agent with these settings on top of FAST."""
    return pytest.mark.parametrize("agent", [update], indirect=True, ids=[""])


def add_sick(store: Any, model_id: str, **meta: Any) -> Path:
    folder: Path = store.add(model_id, **meta)
    (folder / "app.py").write_text(SICK_APP)
    return folder


def statuses(bus: MemoryBus, deployment_id: str) -> list[str]:
    events = [m for m in bus.on(DEPLOYMENT_EVENTS) if isinstance(m, DeploymentEvent)]
    return [e.status.value for e in events if e.deployment_id == deployment_id]


def copy_at(url: str) -> str | None:
    """The token of the copy answering at url, None while nothing answers."""
    try:
        return requests.get(url, timeout=5).text
    except requests.ConnectionError:
        return None


@pytest.fixture
def agent(make_agent: Callable[..., Flask], settings: AgentSettings, bus: MemoryBus,
          request: pytest.FixtureRequest) -> Flask:
    """An agent with short health intervals and backoffs; a test changes some with with_settings(...)."""
    update = {**FAST, **getattr(request, "param", {})}
    return make_agent(settings.model_copy(update=update), bus)


@pytest.fixture
def client(agent: Flask, pki: Pki) -> Any:
    return pki.client(agent, CONTROLLER)


def deploy(client: Any, deployment_id: str, model_id: str, eventually: Any) -> dict[str, Any]:
    created = client.post("/create-vm", json={"deployment_id": deployment_id, "model_id": model_id, "version": 1,
                                              "generation": 3})
    assert created.status_code == 202, created.json
    return eventually(lambda: (d := client.get(f"/deployments/{deployment_id}").json)["status"] == "running"  # type: ignore[no-any-return]
                      and d["health"] == "passing" and d, 60, f"{deployment_id} running and passing")


def detail(client: Any, deployment_id: str) -> dict[str, Any]:
    return client.get(f"/deployments/{deployment_id}").json  # type: ignore[no-any-return]


def test_a_killed_model_is_restarted_in_place_and_answers_again(client, bus, store, eventually) -> None:  # type: ignore[no-untyped-def]
    add_sick(store, "mortal")
    first = deploy(client, "dep-h1", "mortal", eventually)
    assert (first["restarts"], first["last_restart_reason"]) == (0, None)
    before = copy_at(first["url"])
    assert before

    with pytest.raises(requests.ConnectionError):
        requests.get(f"{first['url']}/exit", timeout=5)

    again = eventually(lambda: (c := copy_at(first["url"])) and c != before and c, 60, "a new copy on the same port")
    assert again != before
    after = eventually(lambda: (d := detail(client, "dep-h1"))["health"] == "passing" and d, 30, "passing again")
    assert (after["status"], after["port"], after["url"], after["generation"]) == \
        ("running", first["port"], first["url"], 3)
    assert after["restarts"] == 1
    assert "exited with code 7" in after["last_restart_reason"]
    assert "sick model exits on request" in after["last_restart_reason"]
    assert statuses(bus, "dep-h1") == ["provisioning", "running"]  # in place: no state change to publish
    assert parts(client.application).manager.ports.held() == {first["port"]: "dep-h1"}
    listed = client.get("/deployments").json["deployments"]
    assert [(d["deployment_id"], d["restarts"]) for d in listed] == [("dep-h1", 1)]


def test_a_model_failing_its_health_check_k_times_is_restarted_and_reported(  # type: ignore[no-untyped-def]
    client, bus, store, eventually, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    add_sick(store, "moody")
    first = deploy(client, "dep-h2", "moody", eventually)
    before = copy_at(first["url"])

    requests.get(f"{first['url']}/sick", timeout=5)  # this copy answers 500 on /health from now on

    after = eventually(lambda: (d := detail(client, "dep-h2"))["restarts"] == 1 and d["health"] == "passing" and d,
                       60, "restarted and passing")
    assert copy_at(first["url"]) not in (None, before)
    assert "2 health checks failed in a row" in after["last_restart_reason"]
    assert "GET /health on port" in after["last_restart_reason"] and "answered 500" in after["last_restart_reason"]
    streak = [r.getMessage() for r in caplog.records if "health check failed" in r.getMessage()]
    assert streak[:2] == [f"deployment dep-h2: health check failed ({n} of 2 in a row): GET /health on port "
                          f"{first['port']} answered 500" for n in (1, 2)]
    assert any("dep-h2: restart 1 in place" in r.getMessage() for r in caplog.records)
    assert statuses(bus, "dep-h2") == ["provisioning", "running"]
    # the metrics carry it too, with the controller's schema
    reports = {r.deployment_id: r for r in parts(client.application).manager.reports()}
    assert (reports["dep-h2"].restarts, reports["dep-h2"].health) == (1, "passing")
    assert "answered 500" in (reports["dep-h2"].last_restart_reason or "")


@with_settings(restart_attempts=3, restart_delay_s=0.2, restart_max_delay_s=0.6)
def test_the_backoff_grows_and_after_the_attempts_the_deployment_fails_naming_the_last_failure(  # type: ignore[no-untyped-def]
    client, bus, store, eventually, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    folder = add_sick(store, "doomed")
    first = deploy(client, "dep-h3", "doomed", eventually)

    (folder / "sick").write_text("every copy fails its health check")

    failed = eventually(lambda: (d := detail(client, "dep-h3"))["status"] == "failed" and d, 60, "dep-h3 failed")
    assert failed["restarts"] == 3
    assert failed["reason"].startswith("2 health checks failed in a row; the last: GET /health on port "
                                       f"{first['port']} answered 500")
    assert "gave up: 3 restart(s) within 300 s, AGENT_RESTART_ATTEMPTS=3" in failed["reason"]
    assert statuses(bus, "dep-h3") == ["provisioning", "running", "failed"]
    assert parts(client.application).manager.ports.held() == {}
    assert copy_at(first["url"]) is None
    # the waits doubled up to the maximum, and each restart came no earlier than its wait
    scheduled = [(r.created, float(m[1])) for r in caplog.records
                 if (m := re.search(r"dep-h3: restarting in place in ([0-9.]+) s", r.getMessage()))]
    begun = [r.created for r in caplog.records if re.search(r"dep-h3: restart \d in place", r.getMessage())]
    assert [delay for _, delay in scheduled] == [0.2, 0.4, 0.6]
    assert len(begun) == 3
    for (at, delay), started in zip(scheduled, begun, strict=True):
        assert started - at >= delay - 0.01


@with_settings(restart_delay_s=600, restart_max_delay_s=600)
def test_a_stop_during_the_backoff_cancels_the_restart(client, bus, store, eventually, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="agent")
    add_sick(store, "sleepy")
    first = deploy(client, "dep-h4", "sleepy", eventually)
    requests.get(f"{first['url']}/sick", timeout=5)
    eventually(lambda: any("dep-h4: restarting in place in 600 s" in r.getMessage() for r in caplog.records), 30,
               "a restart scheduled")

    stopped = client.post("/stop-vm", json={"deployment_id": "dep-h4"}).json

    assert (stopped["status"], stopped["restarts"]) == ("stopped", 0)
    record = parts(client.application).manager._records["dep-h4"]
    assert record.watch is not None and not record.watch.thread.is_alive()  # nothing left to restart it
    assert copy_at(first["url"]) is None
    assert detail(client, "dep-h4")["status"] == "stopped"
    assert statuses(bus, "dep-h4") == ["provisioning", "running", "stopping", "stopped"]
    assert parts(client.application).manager.ports.held() == {}


@with_settings(restart_delay_s=0)
def test_a_stop_during_a_restart_stops_the_new_copy_too(client, bus, store, eventually) -> None:  # type: ignore[no-untyped-def]
    folder = add_sick(store, "slowpoke")
    first = deploy(client, "dep-h10", "slowpoke", eventually)
    (folder / "slow").write_text("new copies take 600 s to listen")
    requests.get(f"{first['url']}/sick", timeout=5)
    logs = "/deployments/dep-h10/logs?tail=1000"
    eventually(lambda: detail(client, "dep-h10")["restarts"] == 1
               and client.get(logs).text.count("sick model takes its time to start") == 1, 60, "a restart under way")

    stopped = client.post("/stop-vm", json={"deployment_id": "dep-h10"}).json

    assert (stopped["status"], stopped["restarts"]) == ("stopped", 1)
    record = parts(client.application).manager._records["dep-h10"]
    assert record.watch is not None and not record.watch.thread.is_alive()
    runtime = parts(client.application).manager.runtimes["process"]
    assert runtime.status("dep-h10").status is DeploymentStatus.STOPPED
    assert copy_at(first["url"]) is None
    assert statuses(bus, "dep-h10") == ["provisioning", "running", "stopping", "stopped"]
    assert parts(client.application).manager.ports.held() == {}


@with_settings(restart_delay_s=0)
def test_a_restart_that_fails_is_tried_again_until_the_attempts_are_spent(  # type: ignore[no-untyped-def]
    client, bus, store, eventually
) -> None:
    folder = add_sick(store, "brittle")
    first = deploy(client, "dep-h5", "brittle", eventually)
    (folder / "crash").write_text("every new copy exits at start")

    with pytest.raises(requests.ConnectionError):
        requests.get(f"{first['url']}/exit", timeout=5)

    failed = eventually(lambda: (d := detail(client, "dep-h5"))["status"] == "failed" and d, 90, "dep-h5 failed")
    assert failed["restarts"] == 5
    assert failed["reason"].startswith("the restart failed: the start commands exited with code 3")
    assert "sick model crashes at start" in failed["reason"]
    assert failed["last_restart_reason"].startswith("the restart failed: the start commands exited with code 3")
    assert statuses(bus, "dep-h5") == ["provisioning", "running", "failed"]
    assert parts(client.application).manager.ports.held() == {}


@with_settings(restart_attempts=0)
def test_with_no_restart_attempts_a_dead_model_is_failed_at_once(client, bus, store, eventually) -> None:  # type: ignore[no-untyped-def]
    add_sick(store, "once")
    first = deploy(client, "dep-h6", "once", eventually)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{first['url']}/exit", timeout=5)

    failed = eventually(lambda: (d := detail(client, "dep-h6"))["status"] == "failed" and d, 30, "dep-h6 failed")
    assert failed["restarts"] == 0
    assert "exited with code 7" in failed["reason"] and "gave up" not in failed["reason"]
    assert statuses(bus, "dep-h6") == ["provisioning", "running", "failed"]


def test_without_a_health_path_only_liveness_is_watched(client, store, eventually) -> None:  # type: ignore[no-untyped-def]
    folder = add_sick(store, "quiet", health_path=None)
    first = deploy(client, "dep-h7", "quiet", eventually)
    (folder / "sick").write_text("its /health answers 500, which nobody asks")
    before = copy_at(first["url"])

    with pytest.raises(requests.ConnectionError):
        requests.get(f"{first['url']}/exit", timeout=5)

    eventually(lambda: (c := copy_at(first["url"])) and c != before, 60, "a new copy")
    after = eventually(lambda: (d := detail(client, "dep-h7"))["health"] == "passing" and d, 30, "passing")
    assert after["restarts"] == 1


def test_the_metrics_message_carries_health_and_restarts(client, bus, store, eventually) -> None:  # type: ignore[no-untyped-def]
    add_sick(store, "counted")
    first = deploy(client, "dep-h8", "counted", eventually)
    requests.get(f"{first['url']}/sick", timeout=5)
    eventually(lambda: detail(client, "dep-h8")["restarts"] == 1, 60, "a restart")
    parts(client.application).start_metrics("http://127.0.0.1:8600")  # as run_service does once it is bound

    def reported() -> Any:
        for message in reversed(bus.on(SYSTEM_METRICS)):
            if isinstance(message, AgentMetrics):
                found = [d for d in message.deployments if d.deployment_id == "dep-h8"]
                if found and found[0].restarts == 1 and found[0].health == "passing":
                    return found[0]
        return None

    report = eventually(reported, 30, "a metrics message with the restart")
    assert "answered 500" in (report.last_restart_reason or "")


def test_an_adopted_deployment_is_watched_too(tmp_path: Path, venv_cache: Path, store, models, eventually) -> None:  # type: ignore[no-untyped-def]
    """After an agent restart the manager adopts what a runtime found: its watch rebuilds the spec from the model
    version and its ports, and restarts it in place like any other."""
    folder = add_sick(store, "adopted")
    runtime = ProcessRuntime(VenvCache(venv_cache), sandbox=NoSandbox(), provision_timeout_s=60, stop_grace_s=5)
    ports = PortAllocator(20000, 29999)
    port = ports.allocate("dep-h9", 1)[0]
    ports.release("dep-h9")
    meta = PackageMeta.model_validate_json((folder / "meta.json").read_text())
    runtime.start(DeploymentSpec(deployment_id="dep-h9", model_id="adopted", version=1, model_path=folder, meta=meta,
                                 port=port, workdir=tmp_path / "state" / "dep-h9"))
    bus = MemoryBus()
    manager = DeploymentManager(agent_id="agent-h", runtimes={"process": runtime}, fetch_model=models, bus=bus,
                                ports=PortAllocator(20000, 29999), state_dir=tmp_path / "state",
                                advertise_host="127.0.0.1", health=HealthPolicy(**{
                                    "interval_s": 0.1, "failures": 2, "delay_s": 0.1}))
    try:
        manager.adopt("process", [RecoveredDeployment("dep-h9", "adopted", 1, port, {}, DeploymentStatus.RUNNING)])
        url = f"http://127.0.0.1:{port}"
        before = copy_at(url)
        requests.get(f"{url}/sick", timeout=5)

        eventually(lambda: (c := copy_at(url)) and c != before, 60, "the adopted copy restarted in place")
        after = eventually(lambda: (d := manager.get("dep-h9")).health == "passing" and d, 30, "passing")
        assert (after.restarts, after.port, after.status.value) == (1, port, "running")
    finally:
        manager.shutdown()
    assert copy_at(f"http://127.0.0.1:{port}") is None


# ---------------------------------------------------------------------- pure parts


def test_the_backoff_doubles_up_to_its_maximum() -> None:
    policy = HealthPolicy(delay_s=1, max_delay_s=60)
    assert [policy.delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert HealthPolicy(delay_s=0).delay(5) == 0
    assert HealthPolicy(delay_s=1, max_delay_s=60).delay(10_000) == 60  # no overflow after very many


def test_a_probe_says_what_went_wrong() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    assert "GET /health on port" in (probe(closed, "/health", 1.0) or "")
    assert "refused" in (probe(closed, "/health", 1.0) or "").lower()
    # a server that accepts and never answers: the timeout is named
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        hung = probe(silent.getsockname()[1], "/health", 0.2)
    assert hung is not None and "did not answer within 0.2 s" in hung


def test_settings_refuse_a_maximum_delay_below_the_first(settings: AgentSettings) -> None:
    with pytest.raises(ValidationError, match="AGENT_RESTART_MAX_DELAY_S .* must be at least AGENT_RESTART_DELAY_S"):
        AgentSettings(**{**settings.model_dump(), "restart_delay_s": 10, "restart_max_delay_s": 5})
    with pytest.raises(ValidationError):
        AgentSettings(**{**settings.model_dump(), "health_failures": 0})
    policy = settings.model_copy(update=FAST).health_policy
    assert (policy.interval_s, policy.failures, policy.attempts) == (0.1, 2, 5)

