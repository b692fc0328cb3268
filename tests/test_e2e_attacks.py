"""The attack suite: an attacker on the cluster's network, over real processes, real HTTP and the real broker.

Each test is one attack; each must be refused, counted where the issue says so, leak nothing, and leave the cluster
serving. The attacker can reach every port and the broker; it may hold a credential it stole (an agent's file),
one of its own CA, a revoked one, or a copy of a message it read off the bus.

Model code attacks (/proc/*/environ, the agent's state and credential, the control-plane ports) run in
agent/tests/test_agent_sandbox.py; a fresh registry database against a populated store in
model-registry/tests/test_registry_store_ownership.py; the broker restarted under a running cluster in
tests/test_e2e_bus_outage.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

from miaas import identity
from miaas.bus import DEPLOYMENT_EVENTS, SYSTEM_METRICS
from miaas.client import Signer
from miaas.cluster import LocalCluster
from miaas.package import pack_model
from miaas.schemas import AgentCapacity, AgentLoad, AgentMetrics, DeploymentEvent, DeploymentStatus
from miaas.testing import Pki

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
SETOSA = [5.1, 3.5, 1.4, 0.2]
FAST = {"AGENT_METRICS_INTERVAL_S": "0.5"}
REVOCATION_S = 1.0
T = TypeVar("T")
SERVICES = ("service-registry", "model-registry", "controller", "agent-1")  # the portal has no service routes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, broker: str) -> Iterator[LocalCluster]:
    state = tmp_path_factory.mktemp("attacks")
    ports = {name: 0 for name in ("broker", "service-registry", "model-registry", "controller", "frontend")}
    c = LocalCluster(state_dir=state, bootstrap=broker, ports=ports, agents=[dict(FAST), dict(FAST)],
                     extra_env={"MIAAS_REVOCATION_INTERVAL_S": str(REVOCATION_S),
                                "CONTROLLER_RECONCILE_INTERVAL_S": "0.5"})
    c.start(timeout=120)
    try:
        eventually(lambda: len(alive(c)) == 2, 60, "both agents alive")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def running(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The example model deployed and answering: what every attack must leave serving."""
    package = pack_model(ROOT / "examples" / "iris", tmp_path_factory.mktemp("pkg") / "iris.zip")
    up = admin(cluster).post(f"{cluster.url('model-registry')}/registry/upload-and-validate", timeout=120,
                             files={"file": ("iris.zip", package.read_bytes(), "application/zip")},
                             data={"model_name": "iris-attacks"})
    assert up.status_code == 201, up.text
    model_id = up.json()["model"]["model_id"]
    d = admin(cluster).post(f"{cluster.url('controller')}/controller/deploy?wait=300", timeout=330,
                            json={"model_id": model_id})
    assert d.status_code in (201, 202), d.text
    record = eventually(lambda: (r := deployment(cluster, d.json()["deployment_id"]))["status"] == "running" and r,
                        300, "the example running")
    assert predicts(record["url"])
    return record


def admin(c: LocalCluster) -> requests.Session:
    return c.session()


def eventually(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except requests.RequestException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def controller_get(c: LocalCluster, path: str) -> Any:
    resp = admin(c).get(f"{c.url('controller')}{path}", timeout=10)
    resp.raise_for_status()
    return resp.json()


def alive(c: LocalCluster) -> dict[str, dict[str, Any]]:
    return {a["agent_id"]: a for a in controller_get(c, "/controller/agents")["agents"] if a["state"] == "alive"}


def deployment(c: LocalCluster, deployment_id: str) -> dict[str, Any]:
    return controller_get(c, f"/controller/deployments/{deployment_id}")  # type: ignore[no-any-return]


def refused(c: LocalCluster, topic: str) -> dict[str, int]:
    """What the controller's consumer of `topic` skipped, per reason."""
    for consumer in controller_get(c, "/controller/bus")["consumers"]:
        if topic in consumer["topics"]:
            return consumer["skipped_by_reason"]  # type: ignore[no-any-return]
    raise AssertionError(f"no consumer of {topic}")


def predicts(url: str) -> bool:
    answer = requests.post(f"{url}/predict", json={"features": SETOSA}, timeout=10)
    return answer.status_code == 200 and answer.json()["predictions"] == ["setosa"]


def agent_credential(c: LocalCluster, agent_id: str) -> identity.Credential:
    """What an attacker who read an agent's state folder holds."""
    return identity.Credential.load(c.state_dir / agent_id / "credential.json")


def metrics(agent_id: str, url: str, cpus: float = 512) -> AgentMetrics:
    return AgentMetrics(agent_id=agent_id, url=url, capacity=AgentCapacity(cpus=cpus, memory_mb=1 << 20),
                        load=AgentLoad(cpu_percent=0, memory_percent=0), interval_s=0.5, sent_at=datetime.now(UTC))


def publish(c: LocalCluster, topic: str, key: str, message: Any, signer: identity.Credential | None = None,
            headers: list[tuple[str, Any]] | None = None, value: bytes | None = None) -> None:
    """Put a message on the bus as an attacker with broker access would: raw, unsigned or signed by `signer`."""
    bootstrap = c.bootstrap
    assert bootstrap is not None
    payload = value if value is not None else message.model_dump_json().encode()
    if headers is None and signer is not None:
        headers = identity.MessageSigner(identity.fixed(signer)).headers(topic, key.encode(), payload)
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=key.encode(), value=payload, headers=headers)
    assert producer.flush(10) == 0


def counted(c: LocalCluster, topic: str, reason: str, before: dict[str, int]) -> bool:
    return refused(c, topic).get(reason, 0) > before.get(reason, 0)


# ------------------------------------------------------------------------------------------------ the bus


def test_forged_metrics_of_a_new_agent_are_refused_and_counted_and_it_is_never_listed(cluster: LocalCluster) -> None:
    before = refused(cluster, SYSTEM_METRICS)
    for _ in range(3):  # the attack of the issue: three made-up messages, a new id, a URL of its own, huge capacity
        publish(cluster, SYSTEM_METRICS, "evil-agent", metrics("evil-agent", "http://10.66.6.6:9000"))
    eventually(lambda: refused(cluster, SYSTEM_METRICS).get("unsigned", 0) >= before.get("unsigned", 0) + 3, 30,
               "three unsigned metrics counted")
    time.sleep(1.5)  # three of the agents' own intervals: had it been folded, it would be listed by now
    assert "evil-agent" not in {a["agent_id"] for a in controller_get(cluster, "/controller/agents")["agents"]}


def test_metrics_signed_by_another_ca_are_refused_as_bad_certificate(cluster: LocalCluster) -> None:
    before = refused(cluster, SYSTEM_METRICS)
    stranger = Pki(cluster.state_dir / "stranger-ca").credential("evil-agent", "agent", url="http://10.66.6.6:1")
    publish(cluster, SYSTEM_METRICS, "evil-agent", metrics("evil-agent", "http://10.66.6.6:1"), signer=stranger)
    eventually(lambda: counted(cluster, SYSTEM_METRICS, "bad_certificate", before), 30, "bad_certificate counted")
    assert "evil-agent" not in alive(cluster)


def test_a_stolen_agent_credential_cannot_speak_for_another_agent_or_move_its_own_url(cluster: LocalCluster) -> None:
    stolen = agent_credential(cluster, "agent-1")
    real_2 = alive(cluster)["agent-2"]["url"]
    before = refused(cluster, SYSTEM_METRICS)
    # agent-1's key claiming to be agent-2 (with a huge capacity, to draw the next deployment)
    publish(cluster, SYSTEM_METRICS, "agent-2", metrics("agent-2", "http://10.66.6.6:9000"), signer=stolen)
    eventually(lambda: counted(cluster, SYSTEM_METRICS, "impersonation", before), 30, "impersonation counted")
    # agent-1's key, its own id, an attacker's URL: commands must never go there
    # (agent-1's own genuine snapshots come every 0.5 s: one read in the same batch supersedes a forged one unread,
    # which is harmless; the attacker keeps sending until one is read, and refused)
    middle = refused(cluster, SYSTEM_METRICS)

    def forge_once() -> bool:
        publish(cluster, SYSTEM_METRICS, "agent-1", metrics("agent-1", "http://10.66.6.6:9001"), signer=stolen)
        time.sleep(0.3)
        assert alive(cluster)["agent-1"]["url"] == stolen.cert.url
        return counted(cluster, SYSTEM_METRICS, "impersonation", middle)

    eventually(forge_once, 60, "a moved URL refused and counted")
    now = alive(cluster)
    assert now["agent-2"]["url"] == real_2
    assert now["agent-1"]["url"] == stolen.cert.url
    assert now["agent-2"]["capacity"]["cpus"] < 512


def test_a_replayed_message_is_refused_as_replayed(cluster: LocalCluster) -> None:
    bootstrap = cluster.bootstrap
    assert bootstrap is not None
    # read one genuine, signed metrics message of agent-1 off the bus...
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "attacker", "enable.auto.commit": False})
    partitions = consumer.list_topics(SYSTEM_METRICS, timeout=10).topics[SYSTEM_METRICS].partitions
    consumer.assign([TopicPartition(SYSTEM_METRICS, p, OFFSET_END) for p in partitions])
    captured = None
    deadline = time.monotonic() + 30
    while captured is None and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None and msg.key() == b"agent-1":
            captured = msg
    consumer.close()
    assert captured is not None, "no metrics of agent-1 read off the bus"
    assert dict(captured.headers() or [])[identity.H_SIG], "the agent's messages are signed"
    # ...and publish it again, bytes and headers unchanged
    before = refused(cluster, SYSTEM_METRICS)
    publish(cluster, SYSTEM_METRICS, "agent-1", None, headers=captured.headers(), value=captured.value())
    eventually(lambda: counted(cluster, SYSTEM_METRICS, "replayed", before), 30, "the replay counted")


def test_a_forged_event_cannot_fail_a_deployment_or_give_it_another_url(cluster: LocalCluster,
                                                                         running: dict[str, Any]) -> None:
    victim = running["agent_id"]
    other = "agent-2" if victim == "agent-1" else "agent-1"
    forged = DeploymentEvent(deployment_id=running["deployment_id"], agent_id=victim, status=DeploymentStatus.FAILED,
                             url="http://10.66.6.6:1", reason="forged", source="agent", at=datetime.now(UTC),
                             generation=running["generation"])
    before = refused(cluster, DEPLOYMENT_EVENTS)
    publish(cluster, DEPLOYMENT_EVENTS, running["deployment_id"], forged)  # unsigned
    publish(cluster, DEPLOYMENT_EVENTS, running["deployment_id"], forged,  # signed by the other agent's stolen key
            signer=agent_credential(cluster, other))
    forged_controller = forged.model_copy(update={"source": "controller"})
    publish(cluster, DEPLOYMENT_EVENTS, running["deployment_id"], forged_controller,  # posing as the controller
            signer=agent_credential(cluster, other))
    eventually(lambda: counted(cluster, DEPLOYMENT_EVENTS, "unsigned", before)
               and refused(cluster, DEPLOYMENT_EVENTS).get("impersonation", 0)
               >= before.get("impersonation", 0) + 2, 30, "the forged events counted")
    now = deployment(cluster, running["deployment_id"])
    assert now["status"] == "running"
    assert now["url"] == running["url"]
    assert predicts(now["url"])


# ------------------------------------------------------------------------------------------------ HTTP


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def _routes(c: LocalCluster, service: str) -> list[tuple[str, str, list[str]]]:
    """Every signed route of a running service, from its own OpenAPI document, with the roles it allows."""
    doc = requests.get(f"{c.url(service)}/openapi.json", timeout=10).json()
    out = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if op.get("security"):
                out.append((method.upper(), _fill(path), op["x-miaas-roles"]))
    assert out, f"{service} lists no signed route"
    return out


@pytest.mark.parametrize("service", SERVICES)
def test_every_route_refuses_no_credential_a_foreign_one_and_every_role_it_does_not_allow(
        cluster: LocalCluster, service: str) -> None:
    assert cluster.pki is not None
    ca = cluster.pki.ca()
    stranger = Pki(cluster.state_dir / f"stranger-{service}")
    base = cluster.url(service)
    for method, path, allowed in _routes(cluster, service):
        url = f"{base}{path}"
        anonymous = requests.request(method, url, timeout=10, json={})
        assert anonymous.status_code == 401, (service, method, path, anonymous.text)
        foreign = requests.request(method, url, timeout=10, json={},
                                   auth=Signer(identity.fixed(stranger.credential("admin"))))
        assert foreign.status_code == 401, (service, method, path)
        assert foreign.json()["error"]["details"]["reason"] == "bad_certificate"
        for role in set(identity.ROLES) - set(allowed):
            cred = ca.credential(f"walker-{role}", role, now=time.time(), lifetime_s=600,
                                 url="http://127.0.0.1:1" if role == identity.AGENT else None)
            wrong = requests.request(method, url, timeout=10, json={}, auth=Signer(identity.fixed(cred)))
            assert wrong.status_code == 403, (service, method, path, role, wrong.text)
            assert wrong.json()["error"]["code"] == "forbidden_role"
        if allowed and identity.FRONTEND not in allowed:
            role = allowed[0]
            cred = ca.credential(f"walker-{role}", role, now=time.time(), lifetime_s=600,
                                 url="http://127.0.0.1:1" if role == identity.AGENT else None)
            posing = requests.request(method, url, timeout=10, json={}, auth=Signer(identity.fixed(cred)),
                                      headers={"X-MIaaS-User": "admin"})
            assert posing.status_code == 403, (service, method, path, role)
            assert posing.json()["error"]["code"] == "forbidden_user_header"


def test_a_signed_request_sent_again_or_to_another_path_is_refused(cluster: LocalCluster) -> None:
    url = f"{cluster.url('controller')}/controller/agents"
    sent = admin(cluster).get(url, timeout=10)
    assert sent.status_code == 200
    headers = {k: v for k, v in sent.request.headers.items() if k.startswith("X-MIaaS")}
    again = requests.get(url, headers=headers, timeout=10)
    assert again.status_code == 401
    assert again.json()["error"]["details"]["reason"] == "replayed"
    moved = requests.get(f"{cluster.url('controller')}/controller/deployments", headers=headers, timeout=10)
    assert moved.status_code == 401
    assert moved.json()["error"]["details"]["reason"] == "bad_signature"


def test_only_the_controller_commands_agents(cluster: LocalCluster, running: dict[str, Any]) -> None:
    agent_url = alive(cluster)[running["agent_id"]]["url"]
    stop = {"deployment_id": running["deployment_id"], "generation": running["generation"]}
    for who in ("admin", "agent-1", "agent-2"):
        cred = cluster.admin if who == "admin" else agent_credential(cluster, who)
        resp = requests.post(f"{agent_url}/stop-vm", json=stop, timeout=10, auth=Signer(identity.fixed(cred)))
        assert resp.status_code == 403, (who, resp.text)
    assert predicts(deployment(cluster, running["deployment_id"])["url"])


# ------------------------------------------------------------------------------------------------ joining, revoking


def test_joining_needs_a_genuine_unused_token_and_a_free_id(cluster: LocalCluster) -> None:
    join = f"{cluster.url('controller')}/controller/join"
    key = identity.Credential.load(cluster.pki.credentials["admin"]) if cluster.pki else None
    assert key is not None
    body = {"agent_id": "evil-agent", "url": "http://10.66.6.6:9000", "public_key": key.cert.public_key}
    forged = Pki(cluster.state_dir / "stranger-join").join_token()
    assert requests.post(join, json={**body, "join_token": forged}, timeout=10).status_code in (401, 403)
    assert requests.post(join, json={**body, "join_token": "x" * 40}, timeout=10).status_code in (400, 401, 403)
    assert cluster.pki is not None
    one_use = cluster.pki.join_token(uses=1)
    taken = requests.post(join, json={**body, "agent_id": "agent-1", "join_token": one_use}, timeout=10)
    assert taken.status_code == 409, taken.text  # agent-1 holds a live certificate: nobody else becomes agent-1
    first = requests.post(join, json={**body, "join_token": one_use}, timeout=10)
    assert first.status_code == 201, first.text
    second = requests.post(join, json={**body, "agent_id": "evil-agent-2", "join_token": one_use}, timeout=10)
    assert second.status_code == 403, second.text
    # tidy up: the joined identity is revoked, and so is the token
    assert admin(cluster).post(f"{cluster.url('controller')}/controller/identities/revoke", timeout=10,
                               json={"subject": "evil-agent", "reason": "test"}).status_code == 200


def test_a_revoked_agent_is_refused_everywhere_within_seconds_and_the_cluster_keeps_serving(
        cluster: LocalCluster, running: dict[str, Any]) -> None:
    victim = "agent-2" if running["agent_id"] == "agent-1" else "agent-1"
    cred = agent_credential(cluster, victim)
    as_agent = requests.Session()
    as_agent.auth = Signer(identity.fixed(cred))
    fetch = f"{cluster.url('model-registry')}/registry/fetch-model?model_id={running['model_id']}"
    assert as_agent.get(fetch, timeout=10).status_code == 200
    before = refused(cluster, SYSTEM_METRICS)
    revoked = admin(cluster).post(f"{cluster.url('controller')}/controller/identities/revoke", timeout=10,
                                  json={"subject": victim, "reason": "attack suite"})
    assert revoked.status_code == 200, revoked.text
    assert cred.cert.serial in {r["serial"] for r in revoked.json()["revoked"]}
    # its calls: refused by every service within a few revocation intervals
    for service, path in (("model-registry", fetch.removeprefix(cluster.url("model-registry"))),
                          ("service-registry", "/services"), ("controller", "/controller/identities/revoked")):
        url = f"{cluster.url(service)}{path}"
        eventually(lambda u=url: (r := as_agent.get(u, timeout=10)).status_code == 401  # type: ignore[misc]
                   and r.json()["error"]["details"]["reason"] == "revoked", 10 * REVOCATION_S + 10,
                   f"{service} refusing the revoked agent")
    # its messages: refused and counted, and it is not alive any more
    eventually(lambda: counted(cluster, SYSTEM_METRICS, "revoked", before), 30, "its metrics refused as revoked")
    eventually(lambda: victim not in alive(cluster), 60, "the revoked agent no longer alive")
    assert predicts(deployment(cluster, running["deployment_id"])["url"])
