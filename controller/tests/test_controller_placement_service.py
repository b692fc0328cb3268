"""The controller's side of placement: what a deploy records, and records from before still read."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from controller.app import create_app
from controller.settings import ControllerSettings
from controller.store import DeploymentRow
from miaas.schemas import AgentCapacity, AgentLoad, AgentMetrics, GpuMetrics
from miaas.testing import Pki

NOW = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture
def app(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Flask:
    """A controller whose model registry knows one version, and whose agents are unreachable (port 9)."""
    settings = ControllerSettings(**pki.settings("controller"), database_url=f"sqlite:///{tmp_path / 'c.db'}")
    app = create_app(settings, locate=lambda name: "http://127.0.0.1:9", clock=lambda: NOW)
    version: dict[str, Any] = {"model_id": "m-1", "name": "iris", "version": 1,
                               "meta": {"setup_commands": ["true"], "start_commands": ["true"],
                                        "resources": {"cpus": 2, "memory_mb": 512}}}
    monkeypatch.setattr(app.extensions["controller"], "_fetch_model", lambda *args: version)
    return app


def call(app: Flask, pki: Pki, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    resp = pki.client(app, "admin").open(path, method=method, json=body)
    return resp.status_code, resp.json


def metrics(agent_id: str, cpu_percent: float, cpus: float = 4) -> AgentMetrics:
    return AgentMetrics(
        agent_id=agent_id, url="http://127.0.0.1:9", capacity=AgentCapacity(cpus=cpus, memory_mb=8192, gpus=1),
        load=AgentLoad(cpu_percent=cpu_percent, memory_percent=10,
                       gpus=[GpuMetrics(index=0, memory_used_mb=1000, memory_total_mb=16000)]),
        sent_at=NOW,
    )


def test_a_deploy_records_its_whole_explanation(app: Flask, pki: Pki) -> None:
    # given two agents, the busier one the only one with room for 2 CPUs
    controller = app.extensions["controller"]
    controller.observe_metrics(metrics("agent-1", cpu_percent=80, cpus=4))
    controller.observe_metrics(metrics("agent-2", cpu_percent=5, cpus=1))
    assert controller.snapshot(NOW)[0].gpu_memory_free_mb == 15000
    # when a model asking for 2 CPUs is deployed (its agent cannot be reached: that changes nothing placed)
    status, body = call(app, pki, "POST", "/controller/deploy", {"model_id": "m-1"})
    assert status in (201, 202), body
    # then the record names the choice, every candidate, and why the other was turned away
    _, d = call(app, pki, "GET", f"/controller/deployments/{body['deployment_id']}")
    assert d["agent_id"] == "agent-1"
    assert [(c["agent_id"], c["rejected"]) for c in d["placement"]] == [
        ("agent-1", None), ("agent-2", "needs 2 CPUs, 1 free")]
    explanation = d["placement_explanation"]
    assert (explanation["chosen"], explanation["agents"], explanation["complete"]) == ("agent-1", 2, True)
    assert explanation["rejections"] == [
        {"code": "cpus", "reason": "with fewer than 2 CPUs free", "count": 1, "examples": ["agent-2"]}]


def test_a_deployment_that_fits_nowhere_waits_with_the_reason_and_the_explanation(app: Flask,
                                                                                   pki: Pki) -> None:
    status, body = call(app, pki, "POST", "/controller/deploy", {"model_id": "m-1"})
    assert status == 202, body
    _, d = call(app, pki, "GET", f"/controller/deployments/{body['deployment_id']}")
    assert (d["status"], d["reason"]) == ("pending", "no live agent: none has reported metrics")
    assert (d["placement_explanation"]["agents"], d["placement_explanation"]["chosen"]) == (0, None)


def test_a_record_from_before_compact_explanations_still_reads(app: Flask, pki: Pki) -> None:
    app.extensions["controller"].store.add(DeploymentRow(
        id="d-old", model_id="m-1", model_name="iris", version=1, status="running", agent_id="a", url=None,
        reason=None, runtime="process", cpus=1, memory_mb=256, gpus=0,
        placement=[{"agent_id": "a", "score": 12.5, "rejected": None}, {"agent_id": "b", "rejected": "agent is lost"}],
        created_by=None, created_at=NOW, updated_at=NOW,
    ))
    _, d = call(app, pki, "GET", "/controller/deployments/d-old")
    assert [(c["agent_id"], c["score"], c["rejected"]) for c in d["placement"]] == [
        ("a", 12.5, None), ("b", None, "agent is lost")]
    assert d["placement_explanation"] is None
