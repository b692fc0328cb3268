"""End to end over real processes, real HTTP and the real broker: upload the example, deploy, predict, stop.

The cluster is the one `make up` runs (miaas.cluster.LocalCluster), with two agents; agent-1 reports
90 extra points of load (the documented test setting AGENT_EXTRA_LOAD_PERCENT), so the idle agent-2 must win.
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from confluent_kafka import Consumer, TopicPartition

from controller.app import create_app as create_controller
from controller.settings import ControllerSettings
from miaas.bus import DEPLOYMENT_EVENTS
from miaas.client import Signer
from miaas.cluster import LocalCluster
from miaas.identity import fixed
from miaas.package import pack_model
from miaas.testing import SigningClient

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]


@pytest.fixture(scope="module")
def cluster(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    state = tmp_path_factory.mktemp("cluster")
    ports = {name: 0 for name in ("broker", "service-registry", "model-registry", "controller", "frontend")}
    c = LocalCluster(state_dir=state, bootstrap=broker, ports=ports,
                     agents=[{"AGENT_EXTRA_LOAD_PERCENT": "90"}, {}])
    c.start(timeout=120)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_model(ROOT / "examples" / "iris", tmp_path_factory.mktemp("pkg") / "iris.zip")


def auth(c: LocalCluster) -> Signer:
    """Sign a request as the cluster's admin."""
    return Signer(fixed(c.admin))


def upload(c: LocalCluster, name: str, data: bytes) -> requests.Response:
    return requests.post(
        f"{c.url('model-registry')}/registry/upload-and-validate", auth=auth(c),
        data={"model_name": name}, files={"file": ("model.zip", data, "application/zip")}, timeout=60,
    )


def wait_for_agents(c: LocalCluster, n: int) -> list[dict]:  # type: ignore[type-arg]
    for _ in range(300):
        agents = requests.get(f"{c.url('controller')}/controller/agents", auth=auth(c), timeout=5).json()["agents"]
        if sum(a["state"] == "alive" for a in agents) >= n:
            return agents  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"controller never saw {n} live agents: {agents}")


def events_of(bootstrap: str, deployment_id: str, until: str) -> list[str]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"e2e-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    meta = consumer.list_topics(DEPLOYMENT_EVENTS, timeout=10)
    consumer.assign([TopicPartition(DEPLOYMENT_EVENTS, p, 0) for p in meta.topics[DEPLOYMENT_EVENTS].partitions])
    seen: list[str] = []
    try:
        for _ in range(100):
            for msg in consumer.consume(100, timeout=0.2):
                if msg.error() is None and msg.key() == deployment_id.encode():
                    event = json.loads(msg.value())
                    if event["source"] == "agent":
                        seen.append(event["status"])
            if until in seen:
                break
    finally:
        consumer.close()
    return seen


def test_upload_deploy_predict_stop(cluster: LocalCluster, package: Path, broker: str) -> None:
    # given two live agents, agent-1 heavily loaded
    agents = {a["agent_id"]: a for a in wait_for_agents(cluster, 2)}
    assert agents["agent-1"]["score"] > agents["agent-2"]["score"]

    # when the example is uploaded and deployed
    uploaded = upload(cluster, "iris", package.read_bytes())
    assert uploaded.status_code == 201, uploaded.text
    model = uploaded.json()["model"]
    aliased = requests.put(f"{cluster.url('model-registry')}/registry/models/iris/aliases/production",
                           auth=auth(cluster), json={"version": model["version"]}, timeout=10)
    assert aliased.status_code == 200, aliased.text
    deployed = requests.post(
        f"{cluster.url('controller')}/controller/deploy?wait=300", auth=auth(cluster),
        json={"model_id": "iris", "alias": "production"}, timeout=320,
    )

    # then it runs on the idle agent and answers real predictions
    assert deployed.status_code == 201, deployed.text
    d = deployed.json()
    assert d["status"] == "running", d
    assert d["agent_id"] == "agent-2"
    assert (d["model_id"], d["version"]) == (model["model_id"], model["version"])  # resolved through the alias
    assert {c["agent_id"] for c in d["placement"]} == {"agent-1", "agent-2"}
    answer = requests.post(f"{d['url']}/predict", json={"features": [SETOSA, VIRGINICA]}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == ["setosa", "virginica"]

    # the registry refuses to delete the version while the controller says it is deployed
    registry = cluster.url("model-registry")
    version_url = f"{registry}/registry/models/iris/versions/{model['version']}"
    assert requests.delete(f"{registry}/registry/models/iris/aliases/production", auth=auth(cluster),
                           timeout=10).status_code == 204
    in_use = requests.delete(version_url, auth=auth(cluster), timeout=30)
    assert in_use.status_code == 409, in_use.text
    assert d["deployment_id"] in in_use.json()["error"]["message"]

    # when it is stopped, its URL stops answering
    stopped = requests.post(f"{cluster.url('controller')}/controller/stop", auth=auth(cluster),
                            json={"deployment_id": d["deployment_id"]}, timeout=60)
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["status"] == "stopped"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{d['url']}/health", timeout=5)

    # and every state change went over deployment-events
    seen = events_of(broker, d["deployment_id"], until="stopped")
    assert seen[:2] == ["provisioning", "running"] and seen[-1] == "stopped", seen

    # once stopped, the version can be deleted for good
    assert requests.delete(version_url, auth=auth(cluster), timeout=30).status_code == 204
    assert requests.get(version_url + "/files", auth=auth(cluster), timeout=10).status_code == 404


def zip_without(package: Path, missing: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            if item.filename != missing:
                dst.writestr(item, src.read(item))
    return out.getvalue()


@pytest.mark.parametrize("missing", ["meta.json", "app.py", "requirements.txt", "model.pth"])
def test_a_package_missing_a_required_file_is_refused_by_name(cluster: LocalCluster, package: Path,
                                                             missing: str) -> None:
    resp = upload(cluster, "broken", zip_without(package, missing))
    assert resp.status_code == 400, resp.text
    assert missing in resp.json()["error"]["message"]


def test_deploying_an_unknown_model_is_a_404(cluster: LocalCluster) -> None:
    resp = requests.post(f"{cluster.url('controller')}/controller/deploy", auth=auth(cluster),
                         json={"model_id": "m-does-not-exist"}, timeout=30)
    assert resp.status_code == 404, resp.text
    assert "m-does-not-exist" in resp.json()["error"]["message"]


def test_no_live_agent_means_pending_with_the_reason(cluster: LocalCluster, package: Path, tmp_path: Path,
                                                      broker: str) -> None:
    # given a model in the registry and a controller that has seen no agent
    model = upload(cluster, "iris-lonely", package.read_bytes()).json()["model"]
    assert cluster.pki is not None
    settings = ControllerSettings(ca_file=cluster.pki.ca_file, credential_file=cluster.pki.credentials["controller"],
                                  kafka_bootstrap=broker, database_url=f"sqlite:///{tmp_path / 'c.db'}")
    app = create_controller(settings, locate=lambda name: cluster.url(name))
    app.test_client_class = SigningClient
    client = app.test_client()
    client.credential = cluster.admin
    resp = client.post("/controller/deploy", json={"model_id": model["model_id"]})
    # then it is accepted and waits in the queue, saying why
    assert resp.status_code == 202
    assert resp.json["status"] == "pending"
    assert resp.json["reason"].startswith("no live agent")


@pytest.mark.parametrize("service, method, path", [
    ("service-registry", "get", "/services"),
    ("model-registry", "get", "/registry/models"),
    ("controller", "get", "/controller/deployments"),
    ("controller", "post", "/controller/deploy"),
    ("agent-1", "post", "/create-vm"),
])
def test_unauthenticated_calls_are_refused(cluster: LocalCluster, service: str, method: str, path: str) -> None:
    resp = getattr(requests, method)(f"{cluster.url(service)}{path}", timeout=10)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthenticated"
    assert resp.json()["error"]["details"]["reason"] == "unsigned"
    assert requests.get(f"{cluster.url(service)}/health", timeout=10).status_code == 200


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def test_the_portal_flow_login_upload_deploy_predict_stop(cluster: LocalCluster, package: Path) -> None:
    portal = cluster.url("frontend")
    web = requests.Session()
    # given the admin logged in with the password `miaas up` printed
    login_page = web.get(f"{portal}/login", timeout=10)
    logged_in = web.post(f"{portal}/login", timeout=10, data={
        "csrf_token": csrf_of(login_page.text), "username": "admin", "password": cluster.admin_password})
    assert logged_in.status_code == 200 and "Log out" in logged_in.text, logged_in.text[:500]

    # when the example is uploaded through the portal
    form = web.get(f"{portal}/upload", timeout=10)
    uploaded = web.post(f"{portal}/upload", timeout=60,
                        data={"csrf_token": csrf_of(form.text), "model_name": "iris-web"},
                        files={"file": ("iris.zip", package.read_bytes(), "application/zip")})
    assert uploaded.status_code == 200, uploaded.text[:500]
    assert "Uploaded iris-web version 1" in uploaded.text
    model_page = uploaded.url

    # and version 1 is deployed from the model page
    deployed = web.post(f"{model_page}/deploy", timeout=60,
                        data={"csrf_token": csrf_of(uploaded.text), "version": "1"})
    assert deployed.status_code == 200 and "Deploying iris-web version 1" in deployed.text, deployed.text[:500]
    deployment_id = re.search(r"\(deployment (d-[0-9a-f]+)\)", deployed.text).group(1)  # type: ignore[union-attr]

    # then the deployments page shows it running with its URL, which answers predictions
    for _ in range(600):
        d = requests.get(f"{cluster.url('controller')}/controller/deployments/{deployment_id}",
                         auth=auth(cluster), timeout=10).json()
        if d["status"] in ("running", "failed"):
            break
        time.sleep(0.5)
    assert d["status"] == "running", d
    page = web.get(f"{portal}/deployments", timeout=10)
    url = d["url"]
    assert f'href="{url}"' in page.text
    assert requests.post(f"{url}/predict", json={"features": SETOSA}, timeout=10).json()["predictions"] == ["setosa"]

    # when the Stop button is pressed, the URL stops answering
    stopped = web.post(f"{portal}/deployments/{deployment_id}/stop", timeout=60,
                       data={"csrf_token": csrf_of(page.text)})
    assert stopped.status_code == 200, stopped.text[:500]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=5)
