"""Discovery after a takeover: a controller that does not answer (dead) or answers not_leader (a standby) is
forgotten and avoided, and the call goes to the leader, over a real service registry and real controllers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from controller.app import create_app as create_controller
from controller.service import Controller
from controller.settings import ControllerSettings
from miaas import identity
from miaas.client import ServiceClient
from miaas.discovery import Discovery
from miaas.errors import RemoteError, UpstreamError
from miaas.testing import Pki
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
        except UpstreamError as exc:  # a standby's 503, after a dead one was skipped
            reached.append("not_leader" if "503 not_leader" in exc.message else exc.message)
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
