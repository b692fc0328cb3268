"""The controller believes a bus message only from the identity it speaks for, over the real broker: metrics signed
by agent A claiming agent B or another URL, an agent's report signed by another agent, unsigned, replayed and
revoked messages are skipped and counted per reason on `GET /controller/bus`; when a batch holds a bad message,
only that one is skipped."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import Producer
from flask.testing import FlaskClient

from controller.provenance import ReadOrderChecker, check_event, check_metrics
from controller.service import Controller
from controller.store import DeploymentRow
from miaas import identity
from miaas.bus import DEPLOYMENT_EVENTS, SYSTEM_METRICS, PartitionConsumer, TopicSpec, ensure_topics
from miaas.identity import AGENT, CONTROLLER, Credential, MessageChecker, MessageSigner, Refused, fixed
from miaas.schemas import AgentCapacity, AgentLoad, AgentMetrics, DeploymentEvent, DeploymentStatus
from miaas.testing import Pki, wait_for

URL_A = "http://127.0.0.1:7101"


def metrics(agent_id: str, url: str = URL_A) -> bytes:
    return AgentMetrics(agent_id=agent_id, url=url, capacity=AgentCapacity(cpus=4, memory_mb=8192),
                        load=AgentLoad(cpu_percent=10, memory_percent=20), sent_at=datetime.now(UTC),
                        ).model_dump_json().encode()


def event(deployment_id: str, agent_id: str, status: DeploymentStatus, source: str = "agent") -> bytes:
    return DeploymentEvent(deployment_id=deployment_id, agent_id=agent_id, status=status, reason=f"said by {source}",
                           source=source, at=datetime.now(UTC), generation=1).model_dump_json().encode()


class Publisher:
    """Produces to the real broker, signing as a credential (one signer each, as a producer has)."""

    def __init__(self, broker: str) -> None:
        self.producer = Producer({"bootstrap.servers": broker})
        self.signers: dict[str, MessageSigner] = {}

    def send(self, topic: str, key: str, value: bytes, by: Credential | None = None,
             headers: list[Any] | None = None) -> list[Any] | None:
        """Publish (signed by `by`, or with `headers` as given, or unsigned); the headers sent."""
        if by is not None:
            signer = self.signers.setdefault(by.cert.serial, MessageSigner(fixed(by)))
            headers = signer.headers(topic, key.encode(), value)
        self.producer.produce(topic, key=key.encode(), value=value, headers=headers)
        self.producer.flush(30)
        return headers


@pytest.fixture
def publisher(broker: str) -> Iterator[Publisher]:
    p = Publisher(broker)
    yield p
    p.producer.flush(5)


def consumer_of(client: FlaskClient, topic: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in client.get("/controller/bus").json["consumers"] if c["topics"] == [topic])
    return found


def skipped(client: FlaskClient, topic: str) -> dict[str, int]:
    counts: dict[str, int] = consumer_of(client, topic)["skipped_by_reason"]
    return counts


def counted(client: FlaskClient, topic: str, reason: str, at_least: int) -> Callable[[], bool]:
    return lambda: skipped(client, topic).get(reason, 0) >= at_least


def test_metrics_are_believed_only_from_their_agent_at_its_bound_url_and_refusals_are_counted(
        on_broker: tuple[Controller, FlaskClient], publisher: Publisher, pki: Pki) -> None:
    controller, client = on_broker
    a, b = f"agent-a-{uuid.uuid4().hex[:6]}", f"agent-b-{uuid.uuid4().hex[:6]}"
    agent_a = pki.credential(a, AGENT, url=URL_A)
    # when agent A signs metrics claiming to be agent B, then metrics of its own but at another URL
    publisher.send(SYSTEM_METRICS, b, metrics(b), by=agent_a)
    wait_for(counted(client, SYSTEM_METRICS, "impersonation", 1), 30, "metrics for another agent refused")
    publisher.send(SYSTEM_METRICS, a, metrics(a, url="http://127.0.0.1:9"), by=agent_a)
    wait_for(counted(client, SYSTEM_METRICS, "impersonation", 2), 30, "metrics at another URL refused")
    # and an unsigned message, and one signed by a service
    publisher.send(SYSTEM_METRICS, b, metrics(b))
    publisher.send(SYSTEM_METRICS, f"{b}-2", metrics(f"{b}-2"), by=pki.credential(CONTROLLER))
    wait_for(counted(client, SYSTEM_METRICS, "unsigned", 1), 30, "unsigned metrics refused")
    wait_for(counted(client, SYSTEM_METRICS, "impersonation", 3), 30, "metrics signed by a service refused")
    # then none of them is in the view
    assert controller.view.get(b) is None and controller.view.get(a) is None
    # while A's own metrics at its bound URL are: the URL its commands go to is its certificate's
    value = metrics(a)
    good = publisher.send(SYSTEM_METRICS, a, value, by=agent_a)
    wait_for(lambda: controller.view.get(a) is not None, 30, "agent A in the view")
    assert controller._agent_url(a) == URL_A
    agents = client.get("/controller/agents").json["agents"]
    assert [(x["agent_id"], x["url"]) for x in agents] == [(a, URL_A)]
    # when the very same message (bytes and headers) is published again: a replay; other bytes under its
    # signature: a bad signature
    publisher.send(SYSTEM_METRICS, a, value, headers=good)
    wait_for(counted(client, SYSTEM_METRICS, "replayed", 1), 30, "the replay refused")
    publisher.send(SYSTEM_METRICS, a, metrics(a), headers=good)
    wait_for(counted(client, SYSTEM_METRICS, "replayed", 1), 30, "the replay refused")
    wait_for(counted(client, SYSTEM_METRICS, "bad_signature", 1), 30, "the altered message refused")
    # and once A is revoked, its messages are refused as revoked
    assert client.post("/controller/identities/revoke", json={"serial": agent_a.cert.serial}).status_code == 200
    publisher.send(SYSTEM_METRICS, a, metrics(a), by=agent_a)
    wait_for(counted(client, SYSTEM_METRICS, "revoked", 1), 30, "the revoked agent refused")
    assert skipped(client, SYSTEM_METRICS) == {"impersonation": 3, "unsigned": 1, "replayed": 1,
                                               "bad_signature": 1, "revoked": 1}


def test_an_agent_report_signed_by_another_agent_is_refused_and_the_record_keeps_its_state(
        on_broker: tuple[Controller, FlaskClient], publisher: Publisher, pki: Pki) -> None:
    controller, client = on_broker
    suffix = uuid.uuid4().hex[:6]
    a, b, d = f"agent-a-{suffix}", f"agent-b-{suffix}", f"d-{suffix}"
    now = datetime.now(UTC)
    controller.store.add(DeploymentRow(
        id=d, model_id="m", model_name="m", version=1, status="provisioning", agent_id=a, url=None, reason=None,
        runtime="process", cpus=1, memory_mb=256, gpus=0, placement=[], created_by=None, created_at=now,
        updated_at=now, priority=1, generation=1))
    agent_a, agent_b = pki.credential(a, AGENT, url=URL_A), pki.credential(b, AGENT, url="http://127.0.0.1:7102")
    # when agent B reports A's deployment failed as agent A, stopped as the controller, and failed unsigned
    publisher.send(DEPLOYMENT_EVENTS, d, event(d, a, DeploymentStatus.FAILED), by=agent_b)
    publisher.send(DEPLOYMENT_EVENTS, d, event(d, a, DeploymentStatus.STOPPED, source="controller"), by=agent_b)
    publisher.send(DEPLOYMENT_EVENTS, d, event(d, a, DeploymentStatus.FAILED))
    # and then A reports it running (one key, one partition: read after those)
    publisher.send(DEPLOYMENT_EVENTS, d, event(d, a, DeploymentStatus.RUNNING), by=agent_a)
    # then A's report applies, on a record none of the others changed (a failed one would have stayed failed)
    wait_for(lambda: controller.store.get(d).status is not DeploymentStatus.PROVISIONING, 30, "A's report applied")
    assert controller.store.get(d).status is DeploymentStatus.RUNNING
    # and each of the others is counted under its reason
    counts = skipped(client, DEPLOYMENT_EVENTS)
    assert counts.get("impersonation", 0) >= 2 and counts.get("unsigned", 0) >= 1, counts


@pytest.mark.parametrize("bad, reason", [
    ("for-b", "impersonation"),  # handled, it raises: the batch is handed over again, A's message checked again
    ("poison", "not_finite"),  # A's latest snapshot is poison: the one before it is read after it
])
def test_in_a_batch_with_a_bad_message_only_that_one_is_skipped(
        broker: str, on_broker: tuple[Controller, FlaskClient], publisher: Publisher, pki: Pki, bad: str,
        reason: str) -> None:
    controller, _ = on_broker
    # given one partition holding agent A's metrics and then a bad message A signed, before anyone reads it
    topic = f"metrics-batch-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker, [TopicSpec(topic, 1, "a test's metrics")])
    suffix = uuid.uuid4().hex[:6]
    a, b = f"agent-a-{suffix}", f"agent-b-{suffix}"
    agent_a = pki.credential(a, AGENT, url=URL_A)
    publisher.send(topic, a, metrics(a), by=agent_a)
    if bad == "for-b":
        publisher.send(topic, b, metrics(b), by=agent_a)
    else:
        publisher.send(topic, a, metrics(a).replace(b'"cpu_percent":10.0', b'"cpu_percent":NaN'), by=agent_a)
    # when the controller's metrics handler reads them in one batch
    consumer = PartitionConsumer(broker, [topic], batch_handler=controller.on_metrics,
                                 schemas={topic: AgentMetrics}, latest_only={topic: "agent_id"}, start="beginning",
                                 group_id="test", checker=controller.message_checker()).start()
    try:
        wait_for(lambda: consumer.handled >= 2, 30, "both messages handled")
    finally:
        consumer.stop()
    # then only the bad one is skipped, under its reason, and A is in the view
    assert consumer.skipped_by_reason == {reason: 1}
    assert controller.view.get(a) is not None and controller.view.get(b) is None


# ---------------------------------------------------------------------------------------------- the rules


def test_a_message_read_again_or_backwards_is_not_a_replay_but_one_published_again_is(pki: Pki) -> None:
    verifier = identity.Verifier(identity.load_ca_public(pki.ca_file))
    cred = pki.credential("agent-r", AGENT, url=URL_A)
    signer = MessageSigner(fixed(cred))
    first, second, third = (signer.headers("t", b"k", v) for v in (b"1", b"2", b"3"))
    now = datetime.now(UTC).timestamp()
    # the plain checker refuses a message read after a later one of its producer (the snapshot before a poison
    # one, which the consumer reads instead)
    plain = MessageChecker(verifier)
    plain.check("t", 0, b"k", b"2", second, now, 6)
    with pytest.raises(Refused, match="replayed"):
        plain.check("t", 0, b"k", b"1", first, now, 5)
    # the controller's accepts it, and either read again (a batch handed over again)
    ours = ReadOrderChecker(verifier)
    ours.check("t", 0, b"k", b"2", second, now, 6)
    ours.check("t", 0, b"k", b"1", first, now, 5)
    ours.check("t", 0, b"k", b"1", first, now, 5)
    ours.check("t", 0, b"k", b"3", third, now, 7)
    # but the same message at another offset is a replay, above or below the original
    for offset in (8, 4):
        with pytest.raises(Refused) as refused:
            ours.check("t", 0, b"k", b"2", second, now, offset)
        assert refused.value.reason == identity.REPLAYED
    # and a message at a known offset that is not the one accepted there is too
    with pytest.raises(Refused, match="replayed"):
        ours.check("t", 0, b"k", b"1", first, now, 6)
    # a newer message at a low offset (the topic was created again) is believed
    assert ours.check("t", 0, b"k", b"4", signer.headers("t", b"k", b"4"), now, 0).subject == "agent-r"


def test_the_rules_of_who_speaks_for_whom(pki: Pki) -> None:
    a = pki.credential("agent-a", AGENT, url=URL_A).cert
    m = AgentMetrics.model_validate_json(metrics("agent-a"))
    check_metrics(a, m)
    for signer, claim in [(a, metrics("agent-b")), (a, metrics("agent-a", url="http://x:1")),
                          (pki.credential("agent-a", CONTROLLER, url=URL_A).cert, metrics("agent-a"))]:
        with pytest.raises(Refused) as refused:
            check_metrics(signer, AgentMetrics.model_validate_json(claim))
        assert refused.value.reason == identity.IMPERSONATION
    with pytest.raises(Refused, match="unsigned"):
        check_metrics(None, m)
    check_event(a, DeploymentEvent.model_validate_json(event("d", "agent-a", DeploymentStatus.RUNNING)))
    check_event(pki.credential(CONTROLLER).cert,
                DeploymentEvent.model_validate_json(event("d", "agent-a", DeploymentStatus.STOPPED, "controller")))
    for claim in [event("d", "agent-b", DeploymentStatus.FAILED), event("d", "agent-a", DeploymentStatus.FAILED,
                                                                        "controller"),
                  event("d", "agent-a", DeploymentStatus.FAILED, "portal")]:
        with pytest.raises(Refused, match="impersonation"):
            check_event(a, DeploymentEvent.model_validate_json(claim))
