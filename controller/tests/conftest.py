"""Fixtures of the controller's tests: a controller with its reconcile loop and real agents over real HTTP.

The agents are the agent's own app (manager, routes, idempotent commands, generations, signature checks) with a
runtime that starts and stops at once, each with a credential of its own issued by the test CA (`pki`) for its
agent id and the URL of its server; the controller signs its commands as itself. A bus hands the agents' metrics
and events straight to the controller (`observe_metrics`, `observe_event`: the in-process entry, which checks no
signature): the tests here are about the controller's decisions, so they run in seconds. The checked entry over
the real broker is in test_controller_poison.py and test_controller_provenance.py; runs over real processes in
tests/test_e2e_failover.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from controller_kit import (  # noqa: F401 - re-exported for the tests
    MODELS,
    Agent,
    Cluster,
    InstantRuntime,
    Loopback,
    fake_registry,
    meta_of,
    signed_session,
    wait_for,
)
from flask import Flask
from flask.testing import FlaskClient

from agent.app import parts
from controller.app import create_app as create_controller
from controller.service import Controller
from controller.settings import ControllerSettings
from miaas import identity
from miaas.bus import MemoryBus
from miaas.serve import Server
from miaas.testing import Pki


@pytest.fixture
def eventually() -> Callable[..., Any]:
    """wait_for(check, timeout, what): poll until check() is truthy, failing after the timeout."""
    return wait_for


@pytest.fixture
def make_cluster(pki: Pki, tmp_path: Path, serve: Callable[[Flask], Server]) -> Iterator[Callable[..., Cluster]]:
    """Build a cluster with short liveness settings; everything is stopped after the test."""
    made: list[Cluster] = []

    def make(**overrides: Any) -> Cluster:
        registry = serve(fake_registry(pki))
        settings = ControllerSettings(
            **pki.settings(identity.CONTROLLER), database_url=f"sqlite:///{tmp_path / f'c{len(made)}.db'}",
            lost_after_s=1.0, suspect_after_intervals=3, reconcile_interval_s=0.05, agent_timeout_s=2,
            retry_base_s=0.1, retry_max_s=0.5, **overrides,
        )
        loop = Loopback()
        app = create_controller(settings, locate=lambda name: registry.url, bus=MemoryBus())
        controller: Controller = app.extensions["controller"]
        loop.controller = controller
        controller.started_at = controller.clock()
        controller.reconciler.start()
        cluster = Cluster(controller, app, pki, loop, tmp_path, serve, pki.client(app, identity.ADMIN),
                          signed_session(pki.credential(identity.ADMIN)))
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.loop.controller = None
        cluster.controller.reconciler.stop()
        cluster.http.close()
        for agent in cluster.agents.values():
            parts(agent.app).shutdown()


@pytest.fixture
def on_broker(broker: str, pki: Pki, tmp_path: Path) -> Iterator[tuple[Controller, FlaskClient]]:
    """A controller following the real broker through its checked consumers (every message's signature checked),
    and a client calling it as an operator; agents are unreachable (port 9)."""
    settings = ControllerSettings(**pki.settings(identity.CONTROLLER), ca_key_file=pki.ca_key_file,
                                  database_url=f"sqlite:///{tmp_path / 'on-broker.db'}", kafka_bootstrap=broker,
                                  lost_after_s=3600)  # agents made up by a test are not lost while it runs
    app = create_controller(settings, locate=lambda name: "http://127.0.0.1:9")
    controller: Controller = app.extensions["controller"]
    controller.start()
    assert controller.wait_ready(30)
    yield controller, pki.client(app, identity.ADMIN)
    controller.stop()
