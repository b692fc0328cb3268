"""AGENT_CONTROLLER_URL with several controllers: the agent goes to the leader among them (asked of each one's
/health), else to any that answers, else to the first; a takeover is followed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from pydantic import ValidationError

from agent.controllers import ControllerUrls
from agent.settings import AgentSettings
from controller.app import create_app as create_controller
from controller.service import Controller
from controller.settings import ControllerSettings
from miaas import identity
from miaas.testing import Pki

DEAD = "http://127.0.0.1:9"  # nothing listens there


def controllers(pki: Pki, tmp_path: Path, serve: Callable[[Flask], Any]) -> list[tuple[Controller, str]]:
    """Two real controllers on one database, served over HTTP: the first leads, the second stands by."""
    out = []
    for name in ("a", "b"):
        settings = ControllerSettings(**pki.settings(identity.CONTROLLER), controller_id=f"controller-{name}",
                                      database_url=f"sqlite:///{tmp_path / 'shared.db'}", leader_lease_s=30)
        app = create_controller(settings, locate=lambda _name: DEAD)
        controller: Controller = app.extensions["controller"]
        assert controller.leader.claim() is (name == "a")
        out.append((controller, serve(app).url))
    return out


def test_the_agent_goes_to_the_leader_and_follows_a_takeover(
    pki: Pki, tmp_path: Path, serve: Callable[[Flask], Any]
) -> None:
    (a, a_url), (b, b_url) = controllers(pki, tmp_path, serve)
    # given the agent told of a dead controller, the standby and the leader, in that order
    settings = AgentSettings(ca_file=pki.ca_file, state_dir=tmp_path / "state",
                             controller_url=f"{DEAD}, {b_url}/,{a_url}")
    assert settings.controller_urls == [DEAD, b_url, a_url]
    locate = ControllerUrls(settings.controller_urls, cache_s=0)
    # then it goes to the leader
    assert locate() == a_url
    # when the leader stops and the standby takes over, it goes to the new leader
    a.leader.stop(release=True)
    assert b.leader.claim()
    assert locate() == b_url
    # and when none leads, to one that answers; when none answers, to the first (whose error names it)
    b.leader.stop(release=True)
    assert locate() == b_url  # the first that answers
    assert ControllerUrls([DEAD, "http://127.0.0.1:10"], cache_s=0)() == DEAD


def test_the_choice_is_kept_a_while(pki: Pki, tmp_path: Path, serve: Callable[[Flask], Any]) -> None:
    (a, a_url), (b, b_url) = controllers(pki, tmp_path, serve)
    now = [0.0]
    locate = ControllerUrls([b_url, a_url], cache_s=5, monotonic=lambda: now[0])
    assert locate() == a_url
    a.leader.stop(release=True)
    assert b.leader.claim()
    assert locate() == a_url  # within the period: not asked again
    now[0] += 5
    assert locate() == b_url
    a.leader.stop(release=True)
    locate.forget()
    assert locate() == b_url


@pytest.mark.parametrize("bad", ["", " , ", "http://a:1,controller:8520", "http://a:1,,ftp://b"])
def test_a_list_of_controllers_is_validated(pki: Pki, tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValidationError, match="AGENT_CONTROLLER_URL must"):
        AgentSettings(ca_file=pki.ca_file, state_dir=tmp_path, controller_url=bad)
