"""Stopping a deployment whose agent the controller cannot reach is refused, never reported as done."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from controller.app import create_app
from controller.settings import ControllerSettings
from controller.store import DeploymentRow
from miaas.schemas import DeploymentStatus
from miaas.testing import Pki


def test_stop_on_an_unknown_agent_is_a_503_and_the_deployment_keeps_its_state(pki: Pki, tmp_path: Path) -> None:
    # given a running deployment on an agent this controller has not heard from
    settings = ControllerSettings(**pki.settings("controller"), database_url=f"sqlite:///{tmp_path / 'c.db'}")
    app = create_app(settings, locate=lambda name: "http://127.0.0.1:9")
    controller = app.extensions["controller"]
    now = datetime.now(UTC)
    controller.store.add(DeploymentRow(
        id="d-1", model_id="m-1", model_name="iris", version=1, status="running", agent_id="ghost",
        url="http://127.0.0.1:9", reason=None, runtime="process", cpus=1, memory_mb=256, gpus=0, placement=[],
        created_by=None, created_at=now, updated_at=now,
    ))
    client = pki.client(app, "admin")
    # when it is stopped
    resp = client.post("/controller/stop", json={"deployment_id": "d-1"})
    # then the controller says it cannot, and does not pretend
    assert resp.status_code == 503
    assert "ghost" in resp.json["error"]["message"]
    assert controller.store.get("d-1").status == DeploymentStatus.RUNNING
    # and an unknown deployment is a 404
    assert client.post("/controller/stop", json={"deployment_id": "d-404"}).status_code == 404


def test_deployments_can_be_filtered_by_model_version_and_activity(pki: Pki, tmp_path: Path) -> None:
    settings = ControllerSettings(**pki.settings("controller"), database_url=f"sqlite:///{tmp_path / 'c.db'}")
    app = create_app(settings, locate=lambda name: "http://127.0.0.1:9")
    store = app.extensions["controller"].store
    now = datetime.now(UTC)
    for i, (model, version, status) in enumerate([("m-1", 1, "running"), ("m-1", 1, "stopped"), ("m-1", 2, "running"),
                                                   ("m-2", 1, "provisioning")]):
        store.add(DeploymentRow(
            id=f"d-{i}", model_id=model, model_name=model, version=version, status=status, agent_id="a", url=None,
            reason=None, runtime="process", cpus=1, memory_mb=256, gpus=0, placement=[], created_by=None,
            created_at=now, updated_at=now,
        ))
    client = pki.client(app, "model-registry")  # the registry asks whether a version is in use

    def ids(qs: str) -> set[str]:
        resp = client.get(f"/controller/deployments?{qs}")
        assert resp.status_code == 200, resp.json
        return {d["deployment_id"] for d in resp.json["deployments"]}

    assert ids("model_id=m-1&version=1&active=true") == {"d-0"}
    assert ids("model_id=m-1") == {"d-0", "d-1", "d-2"}
    assert ids("status=provisioning") == {"d-3"}
    assert ids("active=true") == {"d-0", "d-2", "d-3"}
    assert client.get("/controller/deployments?version=0").status_code == 400
