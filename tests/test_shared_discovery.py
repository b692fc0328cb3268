"""Discovery after a takeover: a controller that does not answer (dead) or answers not_leader (a standby) is
forgotten and avoided, and the call goes to the leader, over a real service registry and real controllers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from controller.app import create_app as create_controller
from controller.service import Controller
from controller.settings import ControllerSettings
from frontend.backends import Backends, Discovered
from miaas import identity
from miaas.client import ServiceClient, UpstreamAnswer
from miaas.discovery import Discovery
from miaas.errors import RemoteError, UpstreamError
from miaas.serve import Server
from miaas.testing import Pki
from miaas.trust import revoked_through
from service_registry.app import create_app as create_registry
from service_registry.settings import ServiceRegistrySettings

DEAD = "http://127.0.0.1:9"  # nothing listens there


def stop_on(pki: Pki) -> Callable[[str], Any]:
    """A write only the leader takes: the stop of an unknown deployment (the leader answers 404)."""
    def stop(url: str) -> Any:
        client = ServiceClient(url, pki.credential(identity.ADMIN), timeout=5)
        try:
            return client.post("/controller/stop", json={"deployment_id": "d-unknown"})
        finally:
            client.close()
    return stop


def test_a_dead_or_standby_controller_is_forgotten_and_the_leader_found(
    pki: Pki, tmp_path: Path, serve: Callable[[Flask], Any]
) -> None:
    # given a leader and a standby on one database, and a registry that still lists a dead controller too
    urls = []
    for name in ("a", "b"):
        settings = ControllerSettings(**pki.settings(identity.CONTROLLER), controller_id=f"controller-{name}",
                                      database_url=f"sqlite:///{tmp_path / 'shared.db'}", leader_lease_s=30)
        app = create_controller(settings, locate=lambda _name: DEAD)
        controller: Controller = app.extensions["controller"]
        assert controller.leader.claim() is (name == "a")
        urls.append(serve(app).url)
    leader, standby = urls
    registry = serve(create_registry(ServiceRegistrySettings(**pki.settings("service-registry"), ttl_s=60)))
    admin = ServiceClient(registry.url, pki.credential(identity.ADMIN))
    for i, url in enumerate((DEAD, standby, leader)):
        admin.post("/register", json={"name": "controller", "url": url, "instance_id": f"c-{i}"})
    discovery = Discovery(registry.url, pki.credential(identity.FRONTEND), cache_s=60)
    # when a write is sent through discovery until it reaches a controller that takes it
    reached = []
    for _ in range(3):
        try:
            discovery.call("controller", stop_on(pki))
        except RemoteError as exc:  # the leader's answer: no such deployment
            reached.append(exc.code)
            break
        except UpstreamAnswer as exc:  # a standby's 503, after a dead one was skipped
            reached.append(exc.answered_code or exc.message)
    # then the leader took it (404: no such deployment), after at most one refusal, and from then on the
    # dead and the standby controllers are avoided although the registry still lists them
    assert reached[-1] == "not_found" and set(reached) <= {"not_leader", "not_found"}, reached
    discovery.forget("controller")
    assert {discovery.lookup("controller") for _ in range(6)} == {leader}
    admin.close()


def test_an_error_of_the_instance_itself_is_not_retried(pki: Pki, serve: Callable[[Flask], Any]) -> None:
    registry = serve(create_registry(ServiceRegistrySettings(**pki.settings("service-registry"), ttl_s=60)))
    admin = ServiceClient(registry.url, pki.credential(identity.ADMIN))
    admin.post("/register", json={"name": "controller", "url": "http://c:1"})
    discovery = Discovery(registry.url, pki.credential(identity.FRONTEND))
    calls: list[str] = []

    def refuse(url: str) -> None:
        calls.append(url)
        raise RemoteError(409, "conflict", "no")

    with pytest.raises(RemoteError, match="no"):
        discovery.call("controller", refuse)
    assert calls == ["http://c:1"]
    admin.close()


@pytest.mark.parametrize(("resend", "sent"), [(True, 2), (False, 1)])
def test_a_write_whose_connection_broke_once_sent_is_sent_again_only_when_allowed(
    pki: Pki, serve: Callable[[Flask], Server], resend: bool, sent: int
) -> None:
    # given a controller that reads each request and hangs up without answering (it died while handling it)
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def hang_up() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                received.append(conn.recv(65536))

    threading.Thread(target=hang_up, daemon=True).start()
    registry = serve(create_registry(ServiceRegistrySettings(**pki.settings("service-registry"), ttl_s=60)))
    admin = ServiceClient(registry.url, pki.credential(identity.ADMIN))
    admin.post("/register", json={"name": "controller", "url": f"http://127.0.0.1:{listener.getsockname()[1]}"})
    discovery = Discovery(registry.url, pki.credential(identity.FRONTEND))
    # when a write is sent through discovery: then it fails as the connection broke, and was sent again only
    # when that is allowed (a deploy the dead controller may have made is not made twice)
    with pytest.raises(UpstreamError, match="failed: ConnectionError"):
        discovery.call("controller", stop_on(pki), resend=resend)
    assert len(received) == sent and all(r.startswith(b"POST /controller/stop") for r in received)
    listener.close()
    admin.close()


def test_a_connection_refused_is_tried_elsewhere_even_for_a_write(pki: Pki, serve: Callable[[Flask], Server],
                                                                  tmp_path: Path) -> None:
    settings = ControllerSettings(**pki.settings(identity.CONTROLLER), database_url=f"sqlite:///{tmp_path / 'c.db'}")
    app = create_controller(settings, locate=lambda _name: DEAD)
    live = serve(app).url
    registry = serve(create_registry(ServiceRegistrySettings(**pki.settings("service-registry"), ttl_s=60)))
    admin = ServiceClient(registry.url, pki.credential(identity.ADMIN))
    admin.post("/register", json={"name": "controller", "url": DEAD, "instance_id": "c-dead"})
    discovery = Discovery(registry.url, pki.credential(identity.FRONTEND), cache_s=60)
    assert discovery.lookup("controller") == DEAD  # cached: the dead one is asked first
    admin.post("/register", json={"name": "controller", "url": live, "instance_id": "c-live"})
    with pytest.raises(RemoteError) as answer:  # nothing was sent to the dead one: the live one answers
        discovery.call("controller", stop_on(pki), resend=False)
    assert answer.value.status == 404
    admin.close()


def test_revocations_are_fetched_from_the_controller_that_answers(pki: Pki, serve: Callable[[Flask], Server],
                                                                  tmp_path: Path) -> None:
    # given a controller that revoked a serial, and discovery that still holds a dead controller's URL
    settings = ControllerSettings(**pki.settings(identity.CONTROLLER), database_url=f"sqlite:///{tmp_path / 'c.db'}")
    app = create_controller(settings, locate=lambda _name: DEAD)
    serial = pki.credential("agent-x", identity.AGENT).cert.serial
    operator = ServiceClient(serve(app).url, pki.credential(identity.ADMIN))
    operator.post("/controller/identities/revoke", json={"serial": serial, "reason": "a test"})
    operator.close()
    registry = serve(create_registry(ServiceRegistrySettings(**pki.settings("service-registry"), ttl_s=60)))
    admin = ServiceClient(registry.url, pki.credential(identity.ADMIN))
    admin.post("/register", json={"name": "controller", "url": DEAD, "instance_id": "c-dead"})
    credential = identity.fixed(pki.credential(identity.MODEL_REGISTRY))
    discovery = Discovery(registry.url, credential, cache_s=60)
    assert discovery.lookup("controller") == DEAD
    admin.post("/register", json={"name": "controller", "url": serve(app).url, "instance_id": "c-live"})
    # when a service fetches the revocation list through discovery: then the live controller's list comes back
    assert serial in set(revoked_through(discovery, credential)())
    admin.close()


@pytest.mark.parametrize("old_leader", ["stops answering", "stands by"])
def test_the_portal_reaches_the_new_leader_right_after_a_takeover(
    pki: Pki, tmp_path: Path, serve: Callable[[Flask], Server], old_leader: str
) -> None:
    # given a leader (a) and a standby (b) on one database, the registry listing the leader, and the portal having
    # reached it through discovery (cached for a minute)
    servers, controllers = [], []
    for name in ("a", "b"):
        settings = ControllerSettings(**pki.settings(identity.CONTROLLER), controller_id=f"controller-{name}",
                                      database_url=f"sqlite:///{tmp_path / 'shared.db'}", leader_lease_s=30)
        app = create_controller(settings, locate=lambda _name: DEAD)
        controllers.append(app.extensions["controller"])
        servers.append(serve(app))
    a, b = controllers
    assert a.leader.claim() and not b.leader.claim()
    registry = serve(create_registry(ServiceRegistrySettings(**pki.settings("service-registry"), ttl_s=60)))
    admin = ServiceClient(registry.url, pki.credential(identity.ADMIN))
    admin.post("/register", json={"name": "controller", "url": servers[0].url, "instance_id": "c-a"})
    credential = identity.fixed(pki.credential(identity.FRONTEND))
    portal = Backends(Discovered(Discovery(registry.url, credential, cache_s=60)), credential)
    with pytest.raises(RemoteError) as first:  # the leader's answer to a stop: no such deployment
        portal.stop("admin", "d-unknown")
    assert first.value.status == 404
    # when b takes over, a having stopped answering or standing by (the registry still lists it until it expires)
    a.leader.stop()
    if old_leader == "stops answering":
        servers[0].close()
    assert b.leader.claim()
    admin.post("/register", json={"name": "controller", "url": servers[1].url, "instance_id": "c-b"})
    # then the portal's next write reaches b at once, its cached answer notwithstanding: b answers as the leader
    # (no such deployment; a standby would have answered 503, the portal's "cannot be reached")
    with pytest.raises(RemoteError) as then:
        portal.stop("admin", "d-unknown")
    assert then.value.status == 404 and then.value.code == "not_found"
    # and so does a read, which either would serve, as a is avoided
    assert portal.list_deployments("admin") == []
    admin.close()
