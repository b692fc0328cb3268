"""One deployment's page (state, placement explanation, URL, logs, Stop) and the live streams of deployment
states, fed from the real broker's `deployment-events`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from flask import Flask

from conftest import ADMIN_PASSWORD
from frontend.live import LiveFeed
from miaas import identity
from miaas.bus import DEPLOYMENT_EVENTS, KafkaBus
from miaas.identity import MessageSigner
from miaas.schemas import CandidateExplanation, DeploymentEvent, DeploymentStatus, PlacementExplanation
from miaas.serve import Server
from miaas.testing import Pki


def explanation() -> dict[str, Any]:
    candidates = [CandidateExplanation(agent_id="agent-2", score=12.5),
                  CandidateExplanation(agent_id="agent-1", score=81.0),
                  CandidateExplanation(agent_id="agent-3", rejected="lost")]
    return {"placement": candidates, "placement_explanation": PlacementExplanation(
        strategy="spread", agents=3, eligible=2, chosen="agent-2", candidates=candidates, complete=True)}


def test_the_deployment_page_explains_the_placement(admin: Any, controller: Any) -> None:
    controller.add_deployment("d1", "running", agent_id="agent-2", url="http://agent-2:7001", **explanation())
    page = admin.get("/deployments/d1")
    assert page.status_code == 200
    html = page.text
    assert "<h2 id=\"why\">Why agent-2</h2>" in html
    assert "3 agents known,\n    2 alive with the runtime; chose <strong>agent-2</strong>" in html
    assert '<tr class="chosen">' in html and "<strong>chosen</strong>" in html
    assert '<span class="reason">lost</span>' in html
    assert '<a href="http://agent-2:7001" rel="noopener noreferrer">http://agent-2:7001</a>' in html
    assert 'action="/deployments/d1/stop"' in html


def test_the_deployment_page_shows_the_log_tail_from_the_agent(admin: Any, controller: Any,
                                                              agent: tuple[Any, str]) -> None:
    fake, url = agent
    fake.logs["d1"] = [f"line {i}" for i in range(500)]
    controller.add_agent("agent-2", cpu=10, mem=10, url=url)
    controller.add_deployment("d1", "running", agent_id="agent-2", url="http://agent-2:7001")
    html = admin.get("/deployments/d1").text
    assert "line 499" in html and "line 300" in html and "line 299" not in html  # the last 200 lines
    assert fake.received[-1].path == "/deployments/d1/logs" and fake.received[-1].user == "admin"
    raw = admin.get("/deployments/d1/logs?tail=3")
    assert raw.mimetype == "text/plain" and raw.text == "line 497\nline 498\nline 499\n"


def test_an_agent_that_cannot_give_logs_leaves_the_page_working(admin: Any, controller: Any,
                                                                 dead_url: str) -> None:
    controller.add_agent("agent-2", cpu=10, mem=10, url=dead_url)
    controller.add_deployment("d1", "running", agent_id="agent-2", url="http://agent-2:7001")
    page = admin.get("/deployments/d1")
    assert page.status_code == 200
    assert "The agent cannot be reached right now." in page.text


def test_stop_from_the_deployment_page_comes_back_to_it(admin: Any, controller: Any) -> None:
    controller.add_deployment("d1", "running", agent_id="agent-2")
    answer = admin.post("/deployments/d1/stop", {"back": "deployment"}, page="/deployments/d1")
    assert answer.headers["Location"] == "/deployments/d1"


def test_an_unknown_deployment_is_a_404_page(admin: Any) -> None:
    page = admin.get("/deployments/d-nothing")
    assert page.status_code == 404 and "no deployment d-nothing" in page.text


def test_without_the_bus_pages_refresh_and_there_is_no_stream(admin: Any, controller: Any) -> None:
    controller.add_deployment("d1", "running")
    assert '<meta http-equiv="refresh" content="5">' in admin.get("/deployments").text
    assert admin.get("/deployments/d1/events").status_code == 404


def test_the_feed_hands_each_subscriber_what_it_asked_for() -> None:
    feed = LiveFeed()
    everything, only_d1 = feed.subscribe(), feed.subscribe("d1")
    for deployment_id in ("d1", "d2"):
        feed.publish(event(deployment_id, DeploymentStatus.RUNNING))
    assert [e.deployment_id for e in drain(everything)] == ["d1", "d2"]
    assert [e.deployment_id for e in drain(only_d1)] == ["d1"]
    feed.unsubscribe(everything)
    assert feed.subscribers == 1


def test_a_subscriber_that_falls_behind_is_told_to_resync() -> None:
    feed = LiveFeed()
    slow = feed.subscribe()
    for _ in range(1001):
        feed.publish(event("d1", DeploymentStatus.RUNNING))
    assert slow.overflowed


def event(deployment_id: str, status: DeploymentStatus, url: str | None = None) -> DeploymentEvent:
    return DeploymentEvent(deployment_id=deployment_id, agent_id="agent-1", status=status, url=url, source="agent",
                           at=datetime.now(UTC))


def drain(sub: Any) -> list[DeploymentEvent]:
    out = []
    while (e := sub.get(timeout=0.01)) is not None:
        out.append(e)
    return out


# ---------------------------------------------------------------------------------------------------- live, real bus


@pytest.fixture
def live_portal(make_portal: Callable[..., Flask], locate: Callable[[str], str], broker: str,
                serve: Callable[[Flask], Server], request: pytest.FixtureRequest) -> Iterator[str]:
    """A portal following the real broker, served over HTTP; its URL. Indirect parameters add settings."""
    extra: dict[str, Any] = getattr(request, "param", {})
    app = make_portal(locate, consume_bus=True, kafka_bootstrap=broker, max_event_streams=2, threads=10, **extra)
    assert app.extensions["frontend.follower"].ready.wait(30)
    yield serve(app).url
    app.extensions["frontend.feed"].close()  # open streams end, so the server stops at once


def logged_in(url: str) -> requests.Session:
    web = requests.Session()
    token = web.get(f"{url}/login", timeout=10).text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    web.post(f"{url}/login", data={"username": "admin", "password": ADMIN_PASSWORD, "csrf_token": token}, timeout=30)
    return web


def events_of(response: requests.Response) -> Iterator[tuple[str, Any]]:
    """(event, data) of a Server-Sent Events stream."""
    name, data = "message", ""
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data:
            yield name, json.loads(data)
            name, data = "message", ""


def test_a_deployment_state_change_reaches_the_browser_live(live_portal: str, controller: Any, broker: str,
                                                            pki: Pki) -> None:
    # given a provisioning deployment, and a browser following it
    controller.add_deployment("d1", "provisioning", agent_id="agent-1")
    with logged_in(live_portal) as web, web.get(f"{live_portal}/deployments/d1/events", stream=True,
                                                timeout=30) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        received = events_of(stream)
        assert next(received) == ("deployment", {
            "deployment_id": "d1", "status": "provisioning", "agent_id": "agent-1", "url": None, "url_text": None,
            "reason": None, "stoppable": True})
        # when the agent reports it running on deployment-events (another deployment's news too)
        stop = threading.Event()
        agent_1 = MessageSigner(identity.fixed(pki.credential("agent-1", "agent")))
        publisher = threading.Thread(target=publish_until, args=(broker, agent_1, stop), daemon=True)
        publisher.start()
        try:
            name, state = next(received)
        finally:
            stop.set()
            publisher.join()
    # then the browser gets it, and only for its deployment
    assert name == "deployment"
    assert (state["deployment_id"], state["status"], state["url"]) == ("d1", "running", "http://127.0.0.1:20001")


def publish_until(bootstrap: str, signer: MessageSigner, stop: threading.Event) -> None:
    """Publish (signed, as agent-1) until the stream has its event: the portal reads from the end, from the moment
    it is assigned."""
    bus = KafkaBus(bootstrap, signer=signer)
    while not stop.is_set():
        bus.publish(DEPLOYMENT_EVENTS, "d2", event("d2", DeploymentStatus.FAILED))
        bus.publish(DEPLOYMENT_EVENTS, "d1", event("d1", DeploymentStatus.RUNNING, "http://127.0.0.1:20001"))
        bus.flush()
        stop.wait(0.5)


def test_a_javascript_url_from_the_bus_never_becomes_a_link(live_portal: str, controller: Any) -> None:
    controller.add_deployment("d1", "running", agent_id="agent-1", url="javascript:alert(1)")
    with logged_in(live_portal) as web, web.get(f"{live_portal}/deployments/d1/events", stream=True,
                                                timeout=30) as stream:
        _, state = next(events_of(stream))
    assert state["url"] is None and state["url_text"] == "javascript:alert(1)"


def test_live_streams_are_limited(live_portal: str, controller: Any) -> None:
    controller.add_deployment("d1", "running")
    with logged_in(live_portal) as web:
        first = web.get(f"{live_portal}/deployments/events", stream=True, timeout=30)
        second = web.get(f"{live_portal}/deployments/events", stream=True, timeout=30)
        third = web.get(f"{live_portal}/deployments/events", stream=True, timeout=30)
        try:
            assert (first.status_code, second.status_code, third.status_code) == (200, 200, 503)
            assert third.headers["Retry-After"] == "30"
        finally:
            for r in (first, second, third):
                r.close()


@pytest.mark.parametrize("live_portal", [{"stream_max_s": 1.5}], indirect=True, ids=["stream_max_s=1.5"])
def test_a_live_stream_and_its_log_follow_end_after_the_longest_time(live_portal: str, controller: Any,
                                                                     agent: Any) -> None:
    fake, agent_url = agent
    fake.logs["d1"] = ["starting", "serving"]
    controller.add_agent("agent-1", 10, 20, url=agent_url)
    controller.add_deployment("d1", "running", agent_id="agent-1")
    with logged_in(live_portal) as web:
        started = time.monotonic()
        with web.get(f"{live_portal}/deployments/d1/events?logs=1", stream=True, timeout=30) as stream:
            raw = stream.text  # the whole stream: it ends by itself
        took = time.monotonic() - started
        assert 1.5 <= took < 10
        assert raw.startswith("retry: ") and "event: deployment" in raw and "event: logs" in raw
        # the slots are free again: the browser's EventSource reconnects (after `retry`) and is served
        for _ in range(2):
            with web.get(f"{live_portal}/deployments/events", stream=True, timeout=30) as again:
                assert again.status_code == 200
                assert again.text.startswith("retry: ")  # and it ends by itself too


def test_a_live_stream_ends_with_its_session(live_portal: str, controller: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("frontend.deployments.SESSION_CHECK_S", 0.2)
    controller.add_deployment("d1", "running")
    with logged_in(live_portal) as web, web.get(f"{live_portal}/deployments/d1/events", stream=True,
                                                timeout=30) as stream:
        received = events_of(stream)
        assert next(received)[0] == "deployment"
        csrf = web.get(f"{live_portal}/models", timeout=10).text.split('name="csrf_token" value="', 1)[1]
        web.post(f"{live_portal}/logout", data={"csrf_token": csrf.split('"', 1)[0]}, timeout=10)
        started = time.monotonic()
        assert list(received) == []  # the stream ends, long before its 10 minutes
        assert time.monotonic() - started < 5


def test_a_stream_needs_a_login(live_portal: str) -> None:
    answer = requests.get(f"{live_portal}/deployments/events", timeout=10, allow_redirects=False)
    assert answer.status_code == 302 and "/login" in answer.headers["Location"]
