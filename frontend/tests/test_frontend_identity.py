"""The portal as an identity of the cluster: its calls reach the real model registry signed as the portal for the
person logged in, a portal whose credential was revoked is told so on the page, and bus messages that are not
signed by who they speak for never reach a page."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g
from werkzeug.test import TestResponse

from conftest import ADMIN_PASSWORD, T0, Browser
from controller.app import create_app as create_controller
from controller.settings import ControllerSettings
from frontend.live import LiveFeed, LoadHistory
from frontend.store import Role, UserStore
from miaas import identity
from miaas.bus import DEPLOYMENT_EVENTS, SYSTEM_METRICS, KafkaBus, MemoryBus
from miaas.identity import CertificateAuthority, Credential, MessageSigner
from miaas.schemas import AgentCapacity, AgentLoad, AgentMetrics, DeploymentEvent, DeploymentStatus
from miaas.serve import Server
from miaas.testing import Pki
from model_registry.app import create_app as create_registry
from model_registry.settings import ModelRegistrySettings
from model_registry.testing import good, make_zip
from model_registry.testing import registry as registry_of

DANA_PASSWORD = "dana's long password"


def noting_callers(app: Flask) -> list[tuple[str, str, str]]:
    """Who signed each request a real service let in, and for whom: (role, subject, caller)."""
    seen: list[tuple[str, str, str]] = []

    @app.before_request
    def _note_caller() -> None:  # runs after the service's own check, which sets g.identity and g.caller
        if "identity" in g:
            seen.append((g.identity.role, g.identity.subject, g.caller))

    return seen


@pytest.fixture
def real_registry(pki: Pki, workdir: Path, serve: Callable[[Flask], Server]) -> Iterator[tuple[Flask, str]]:
    """The real model registry, served over HTTP; `app.extensions["test.seen"]`: who called it, for whom."""
    settings = ModelRegistrySettings(**pki.settings("model-registry"), model_store=workdir / "models",
                                     database_url=f"sqlite:///{workdir / 'registry.db'}")
    app = create_registry(settings)
    app.extensions["test.seen"] = noting_callers(app)
    yield app, serve(app).url
    registry_of(app).store.close()


@pytest.fixture
def real_controller(pki: Pki, workdir: Path, serve: Callable[[Flask], Server],
                    real_registry: tuple[Flask, str]) -> tuple[Flask, str]:
    """The real controller (its HTTP API; no agents), finding the real registry; served over HTTP."""
    settings = ControllerSettings(**pki.settings("controller"), database_url=f"sqlite:///{workdir / 'controller.db'}")
    app = create_controller(settings, locate={"model-registry": real_registry[1]}.__getitem__, bus=MemoryBus())
    app.extensions["test.seen"] = noting_callers(app)
    return app, serve(app).url


def json_of(answer: TestResponse) -> Any:
    return json.loads(answer.text)


def portal_credential(pki: Pki, workdir: Path) -> tuple[Path, Credential]:
    """Given: a credential of the portal's own, in a file."""
    credential = pki.credential("frontend", "frontend")
    path = workdir / "portal-credential.json"
    credential.save(path)
    return path, credential


def developer(app: Flask, name: str = "dana") -> Browser:
    """Given: a developer account, logged in."""
    store: UserStore = app.extensions["frontend.store"]
    store.create_user(name, DANA_PASSWORD, Role.DEVELOPER, T0)
    web = Browser(app.test_client(), ADMIN_PASSWORD)
    assert web.login(name, DANA_PASSWORD).status_code == 303
    return web


def test_the_registry_gets_the_portals_calls_signed_as_the_portal_for_the_person(
    make_portal: Callable[..., Flask], real_registry: tuple[Flask, str], pki: Pki, workdir: Path, dead_url: str
) -> None:
    # given the portal with a credential of its own, and a developer logged in to it
    registry_app, url = real_registry
    path, credential = portal_credential(pki, workdir)
    portal = make_portal({"model-registry": url, "controller": dead_url}.__getitem__, credential_file=path)
    dana = developer(portal)
    # when she uploads a model and opens the models page
    answer = dana.post("/upload", {"model_name": "iris", "file": (io.BytesIO(make_zip(good())), "iris.zip")},
                       page="/upload")
    assert answer.status_code == 303, answer.text
    page = dana.get(answer.headers["Location"])
    assert page.status_code == 200 and "Uploaded iris version 1." in page.text
    assert '<a href="/models/' in dana.get("/models").text
    # then every call reached the registry signed by the portal's certificate, for dana
    seen = registry_app.extensions["test.seen"]
    assert seen and set(seen) == {("frontend", "frontend", "dana")}
    assert credential.cert.role == identity.FRONTEND
    # and the registry records her as the uploader, as anyone asking it directly sees
    operator = pki.client(registry_app, role="admin")
    [model] = json_of(operator.get("/registry/models"))["models"]
    detail = json_of(operator.get(f"/registry/models/{model['model_id']}"))
    assert [v["created_by"] for v in detail["versions"]] == ["dana"]


def test_a_portal_whose_credential_was_revoked_gets_a_page_that_says_so(
    make_portal: Callable[..., Flask], real_registry: tuple[Flask, str], pki: Pki, workdir: Path, dead_url: str
) -> None:
    # given a working portal
    registry_app, url = real_registry
    path, credential = portal_credential(pki, workdir)
    portal = make_portal({"model-registry": url, "controller": dead_url}.__getitem__, credential_file=path)
    dana = developer(portal)
    assert dana.get("/models").status_code == 200
    # when the cluster revokes the portal's certificate (the registry learns it from the controller's list)
    registry_app.extensions["miaas_trust"].revocations.update([credential.cert.serial])
    # then its pages say the portal itself was refused, and why, with the layout and no traceback
    for page in (dana.get("/models"), dana.post("/upload", {"model_name": "iris",
                                                            "file": (io.BytesIO(make_zip(good())), "iris.zip")},
                                                page="/upload")):
        assert page.status_code == 502
        assert "The model registry refused the portal&#39;s credential (revoked)." in page.text
        assert "until an operator issues it a new credential" in page.text
        assert "cannot be reached" not in page.text
        assert "Traceback" not in page.text and "127.0.0.1" not in page.text
        assert 'href="/models"' in page.text
    # and the JSON API says it in the platform's error shape
    store: UserStore = portal.extensions["frontend.store"]
    user = next(u for u in store.users() if u.username == "dana")
    secret, _ = store.create_token(user.id, "ci", datetime.now(UTC), None)
    api = portal.test_client(use_cookies=False).get("/api/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert api.status_code == 502
    assert json_of(api)["error"]["code"] == "portal_refused"


def test_a_portal_given_another_services_credential_is_told_it_may_not(
    make_portal: Callable[..., Flask], real_registry: tuple[Flask, str], pki: Pki, workdir: Path, dead_url: str
) -> None:
    # given a portal started, by an operator's slip, with the controller's credential
    _, url = real_registry
    path = workdir / "controller-credential.json"
    pki.credential("controller", "controller").save(path)
    portal = make_portal({"model-registry": url, "controller": dead_url}.__getitem__, credential_file=path)
    # then the registry does not let it act for a person, and the page says so
    page = developer(portal).get("/models")
    assert page.status_code == 502
    assert "The model registry does not let the portal do this (forbidden_user_header)." in page.text


def test_a_portal_that_cannot_read_its_credential_says_so(
    make_portal: Callable[..., Flask], real_registry: tuple[Flask, str], pki: Pki, workdir: Path, dead_url: str
) -> None:
    _, url = real_registry
    path, _ = portal_credential(pki, workdir)
    portal = make_portal({"model-registry": url, "controller": dead_url}.__getitem__, credential_file=path)
    dana = developer(portal)
    path.write_text("not a credential")  # an operator's slip while rotating it
    time.sleep(2.1)  # the credential file is looked at again at most every 2 s
    page = dana.get("/models")
    assert page.status_code == 502
    assert "The portal cannot read its own credential (FRONTEND_CREDENTIAL_FILE)" in page.text


def test_the_controller_gets_a_deploy_signed_as_the_portal_for_the_person(
    make_portal: Callable[..., Flask], real_registry: tuple[Flask, str], real_controller: tuple[Flask, str], pki: Pki
) -> None:
    # given a model in the real registry, uploaded through the portal by dana
    portal = make_portal({"model-registry": real_registry[1], "controller": real_controller[1]}.__getitem__)
    dana = developer(portal)
    uploaded = dana.post("/upload", {"model_name": "iris", "file": (io.BytesIO(make_zip(good())), "iris.zip")},
                         page="/upload")
    model_page = uploaded.headers["Location"]
    # when she deploys it (no agent has joined: it waits for a placement)
    answer = dana.post(f"{model_page}/deploy", {"version": "1"}, page=model_page)
    assert answer.status_code == 303, answer.text
    page = dana.get("/deployments")
    # then the controller was asked by the portal, for dana, and by nobody else
    seen = real_controller[0].extensions["test.seen"]
    assert seen and set(seen) == {("frontend", "frontend", "dana")}
    # and it holds her deployment, which her page shows
    [made] = json_of(pki.client(real_controller[0], role="admin").get("/controller/deployments"))["deployments"]
    assert (made["model_name"], made["status"]) == ("iris", "pending")
    assert made["deployment_id"] in page.text


# ---------------------------------------------------------------------------------------------------- the bus


def metrics(agent_id: str, cpu: float) -> AgentMetrics:
    return AgentMetrics(agent_id=agent_id, url="http://x", capacity=AgentCapacity(cpus=4, memory_mb=8192),
                        load=AgentLoad(cpu_percent=cpu, memory_percent=10), sent_at=datetime.now(UTC))


def event(agent_id: str, status: DeploymentStatus, source: str = "agent") -> DeploymentEvent:
    return DeploymentEvent(deployment_id="d1", agent_id=agent_id, status=status, source=source, at=datetime.now(UTC))


@pytest.fixture
def following(make_portal: Callable[..., Flask], locate: Callable[[str], str], broker: str) -> Flask:
    """A portal following the real broker."""
    app = make_portal(locate, consume_bus=True, kafka_bootstrap=broker)
    assert app.extensions["frontend.follower"].ready.wait(30)
    return app


def test_only_messages_signed_by_who_they_speak_for_reach_the_pages(following: Flask, broker: str,
                                                                    pki: Pki) -> None:
    feed: LiveFeed = following.extensions["frontend.feed"]
    history: LoadHistory = following.extensions["frontend.history"]
    watching = feed.subscribe("d1")
    # given producers: agent-1 itself, and forgers (unsigned; another cluster's CA; agent-2 speaking for agent-1;
    # an agent posing as the controller)
    genuine = KafkaBus(broker, signer=MessageSigner(identity.fixed(pki.credential("agent-1", "agent"))))
    stranger = CertificateAuthority.generate().credential("agent-1", "agent", now=time.time())
    forgers = [KafkaBus(broker), KafkaBus(broker, signer=MessageSigner(identity.fixed(stranger))),
               KafkaBus(broker, signer=MessageSigner(identity.fixed(pki.credential("agent-2", "agent"))))]
    # when each forger says agent-1's deployment failed and its CPU is at 99%, and then agent-1 says it runs at 5%
    # (one key per topic: one partition, so the forged messages are read before the genuine ones)
    stop = threading.Event()

    def publish() -> None:
        while not stop.is_set():
            for bus in forgers:
                bus.publish(DEPLOYMENT_EVENTS, "d1", event("agent-1", DeploymentStatus.FAILED))
                bus.publish(SYSTEM_METRICS, "agent-1", metrics("agent-1", 99))
            forgers[2].publish(DEPLOYMENT_EVENTS, "d1", event("agent-2", DeploymentStatus.STOPPED, "controller"))
            for bus in forgers:
                bus.flush()
            genuine.publish(DEPLOYMENT_EVENTS, "d1", event("agent-1", DeploymentStatus.RUNNING))
            genuine.publish(SYSTEM_METRICS, "agent-1", metrics("agent-1", 5))
            genuine.flush()
            stop.wait(0.5)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        got = watching.get(timeout=60)
        deadline = time.monotonic() + 60
        while not history.series("agent-1", time.monotonic()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        publisher.join()
        for bus in (genuine, *forgers):
            bus.close()
    # then the live pages and the charts saw only agent-1's own word
    assert got is not None and got.status == DeploymentStatus.RUNNING
    assert {e.status for e in _drain(watching)} <= {DeploymentStatus.RUNNING}
    samples = history.series("agent-1", time.monotonic())
    assert samples and {s.cpu_percent for s in samples} == {5}
    # and the bus page counts the refusals per reason
    stats = following.extensions["frontend.follower"].stats()
    for reason in (identity.UNSIGNED, identity.BAD_CERTIFICATE, identity.IMPERSONATION):
        assert stats.skipped_by_reason.get(reason, 0) > 0, stats
    page = _admin(following).get("/bus").text
    assert "messages refused: they never reached a page." in page
    assert "refused: <code>unsigned</code> <small class=\"muted\">not signed</small>" in page
    assert "refused: <code>bad_certificate</code>" in page
    assert ("refused: <code>impersonation</code> <small class=\"muted\">signed by one identity, speaking for "
            "another</small>") in page


def _drain(sub: Any) -> list[DeploymentEvent]:
    out = []
    while (e := sub.get(timeout=0.2)) is not None:
        out.append(e)
    return out


def _admin(app: Flask) -> Browser:
    web = Browser(app.test_client(), ADMIN_PASSWORD)
    assert web.login().status_code == 303
    return web


def test_without_following_the_bus_the_page_says_so(make_portal: Callable[..., Flask], broker: str) -> None:
    page = _admin(make_portal(None, kafka_bootstrap=broker)).get("/bus")
    assert page.status_code == 200
    assert "This portal does not follow the bus (FRONTEND_CONSUME_BUS is off)." in page.text
