"""Stopping a deployment whose agent the controller cannot reach is refused, never reported as done."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from controller.app import create_app
from controller.settings import ControllerSettings
from controller.store import DeploymentRow
from miaas.schemas import DeploymentStatus


def test_stop_on_an_unknown_agent_is_a_503_and_the_deployment_keeps_its_state(service_token: str,
                                                                              tmp_path: Path) -> None:
    # given a running deployment on an agent this controller has not heard from
    settings = ControllerSettings(service_token=service_token, database_url=f"sqlite:///{tmp_path / 'c.db'}")
    app = create_app(settings, locate=lambda name: "http://127.0.0.1:9")
    controller = app.extensions["controller"]
    now = datetime.now(UTC)
    controller.store.add(DeploymentRow(
        id="d-1", model_id="m-1", model_name="iris", version=1, status="running", agent_id="ghost",
        url="http://127.0.0.1:9", reason=None, runtime="process", cpus=1, memory_mb=256, gpus=0, placement=[],
        created_by=None, created_at=now, updated_at=now,
    ))
    client = app.test_client()
    headers = {"Authorization": f"Bearer {service_token}"}
    # when it is stopped
    resp = client.post("/controller/stop", json={"deployment_id": "d-1"}, headers=headers)
    # then the controller says it cannot, and does not pretend
    assert resp.status_code == 503
    assert "ghost" in resp.json["error"]["message"]
    assert controller.store.get("d-1").status == DeploymentStatus.RUNNING
    # and an unknown deployment is a 404
    assert client.post("/controller/stop", json={"deployment_id": "d-404"}, headers=headers).status_code == 404
