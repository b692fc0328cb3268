"""`Idempotency-Key` on `POST /controller/deploy` (draft-ietf-httpapi-idempotency-key-header), over real HTTP: a
retry returns the deployment the first request made and creates none; the key with another body is refused (422);
keys expire; concurrent requests with one key make one deployment."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from controller.api import idempotency
from controller.store import DeploymentRow, DeploymentStore, KeyReused, Once
from miaas.errors import BadRequest
from miaas.schemas import DeployRequest


def post(url: str, session: requests.Session, body: dict[str, Any], key: str | None,
         wait: float = 0) -> requests.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return session.post(f"{url}/controller/deploy?wait={wait}", json=body, headers=headers, timeout=30)


def count(cluster: Any) -> int:
    return len(cluster.controller.store.all())


def test_a_retry_with_the_same_key_returns_the_same_deployment_and_creates_none(make_cluster: Any) -> None:
    cluster = make_cluster()
    agent = cluster.add_agent("a")
    url = cluster.serve(cluster.app).url
    first = post(url, cluster.http, {"model_id": "small"}, '"9b3c7f1e-retry"', wait=10)
    assert first.status_code == 201, first.text
    # the retry (same key, the same body written otherwise) answers the same deployment, as it is now
    again = post(url, cluster.http, {"priority": "normal", "model_id": "small"}, '"9b3c7f1e-retry"')
    assert again.status_code == 201, again.text
    assert again.json()["deployment_id"] == first.json()["deployment_id"]
    assert again.json()["status"] == "running"
    assert count(cluster) == 1
    assert agent.runtime.started == [first.json()["deployment_id"]]
    # a bare token is the same key as the structured-field string
    assert post(url, cluster.http, {"model_id": "small"}, "9b3c7f1e-retry").json()["deployment_id"] == \
        first.json()["deployment_id"]
    # without a key, or with another, a new deployment
    assert post(url, cluster.http, {"model_id": "small"}, None).json()["deployment_id"] != \
        first.json()["deployment_id"]
    assert post(url, cluster.http, {"model_id": "small"}, '"another"').json()["deployment_id"] != \
        first.json()["deployment_id"]
    assert count(cluster) == 3


def test_the_same_key_with_another_body_is_a_422_that_says_so(make_cluster: Any) -> None:
    cluster = make_cluster()
    cluster.add_agent("a")
    url = cluster.serve(cluster.app).url
    first = post(url, cluster.http, {"model_id": "small"}, '"k-body"')
    assert first.status_code in (201, 202), first.text
    other = post(url, cluster.http, {"model_id": "half"}, '"k-body"')
    assert other.status_code == 422, other.text
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert "another request" in error["message"] and error["details"]["deployment_id"] == first.json()[
        "deployment_id"]
    assert count(cluster) == 1


@pytest.mark.parametrize("key", ['""', "", "x" * 256, "caf\u00e9"], ids=["empty-string", "empty", "too-long",
                                                                        "not-ascii"])
def test_a_malformed_key_is_a_400(make_cluster: Any, key: str) -> None:
    cluster = make_cluster()
    url = cluster.serve(cluster.app).url
    headers = {"Idempotency-Key": key.encode("utf-8")}
    resp = cluster.http.post(f"{url}/controller/deploy", json={"model_id": "small"}, headers=headers, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_idempotency_key"
    assert count(cluster) == 0


def test_a_key_is_forgotten_once_it_expires(make_cluster: Any) -> None:
    cluster = make_cluster(idempotency_key_ttl_s=0.5)
    cluster.add_agent("a")
    url = cluster.serve(cluster.app).url
    first = post(url, cluster.http, {"model_id": "small"}, '"k-ttl"').json()
    assert post(url, cluster.http, {"model_id": "small"}, '"k-ttl"').json()["deployment_id"] == first[
        "deployment_id"]
    time.sleep(0.6)
    later = post(url, cluster.http, {"model_id": "half"}, '"k-ttl"')  # expired: even another body is new
    assert later.status_code in (201, 202), later.text
    assert later.json()["deployment_id"] != first["deployment_id"]
    assert count(cluster) == 2


def test_concurrent_requests_with_one_key_create_exactly_one_deployment(make_cluster: Any) -> None:
    cluster = make_cluster()
    cluster.add_agent("a", cpus=16)
    url = cluster.serve(cluster.app).url
    answers: list[requests.Response] = []
    lock = threading.Lock()
    go = threading.Barrier(12)

    def send() -> None:
        go.wait()
        resp = post(url, cluster.http, {"model_id": "small"}, '"k-race"')
        with lock:
            answers.append(resp)

    threads = [threading.Thread(target=send) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 12
    assert all(a.status_code in (201, 202) for a in answers), [a.text for a in answers]
    assert len({a.json()["deployment_id"] for a in answers}) == 1
    assert count(cluster) == 1
    assert len(cluster.agents["a"].runtime.started) <= 1  # placed, and provisioned, once


def once(caller: str, key: str = "k", fingerprint: str = "f" * 64, ttl_s: float = 60) -> Once:
    return Once(caller=caller, key=key, fingerprint=fingerprint, ttl_s=ttl_s)


def row(deployment_id: str, now: datetime) -> DeploymentRow:
    return DeploymentRow(
        id=deployment_id, model_id="m", model_name="m", version=1, status="pending", agent_id=None, url=None,
        reason=None, runtime="process", cpus=1.0, memory_mb=256, gpus=0, placement=[], created_by=None,
        created_at=now, updated_at=now, priority=1, generation=0, attempts=0, requeue=False,
    )


def test_keys_are_per_caller_survive_a_restart_and_refuse_another_request(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    now = datetime.now(UTC)
    store = DeploymentStore(url)
    assert store.add(row("d-1", now), once("alice")).deployment_id == "d-1"
    assert store.add(row("d-2", now), once("bob")).deployment_id == "d-2"  # the same key of another caller
    assert store.add(row("d-3", now), once("alice")).deployment_id == "d-1"  # a lost race: the winner's
    again = DeploymentStore(url)  # the controller restarted
    found = again.replay(once("alice"), now + timedelta(seconds=1))
    assert found is not None and found.deployment_id == "d-1"
    with pytest.raises(KeyReused):
        again.replay(once("alice", fingerprint="0" * 64), now)
    assert again.replay(once("alice"), now + timedelta(seconds=61)) is None  # expired
    assert {d.deployment_id for d in again.all()} == {"d-1", "d-2"}


def test_the_key_digest_is_of_the_validated_request_and_the_caller_scopes_it() -> None:
    a = idempotency('"k"', "alice", DeployRequest.model_validate({"model_id": "m"}), 60)
    b = idempotency("k", "alice", DeployRequest.model_validate({"model_id": "m", "priority": "normal"}), 60)
    c = idempotency('"k"', "alice", DeployRequest.model_validate({"model_id": "m", "version": 2}), 60)
    assert a is not None and b is not None and c is not None
    assert (a.key, a.fingerprint) == (b.key, b.fingerprint)
    assert a.fingerprint != c.fingerprint
    assert idempotency(None, "alice", DeployRequest.model_validate({"model_id": "m"}), 60) is None
    assert idempotency('"a\\"b"', None, DeployRequest.model_validate({"model_id": "m"}), 60).key == 'a"b'  # type: ignore[union-attr]
    with pytest.raises(BadRequest):
        idempotency("\t", "alice", DeployRequest.model_validate({"model_id": "m"}), 60)
