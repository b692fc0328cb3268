"""Signed bus messages over the real broker: a consumer with a checker hands over only genuine messages, with the
signer's certificate, and counts the others per reason; a batch handed over again is not taken for a replay."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from confluent_kafka import Producer

from miaas import identity
from miaas.bus import KafkaBus, PartitionConsumer, Received, TopicSpec, ensure_topics
from miaas.schemas import AgentCapacity, AgentLoad, AgentMetrics
from miaas.testing import Pki


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def metrics(agent_id: str, cpus: float = 4) -> AgentMetrics:
    return AgentMetrics(agent_id=agent_id, url=f"http://{agent_id}:8600", capacity=AgentCapacity(cpus=cpus,
                        memory_mb=8192), load=AgentLoad(cpu_percent=1, memory_percent=1), sent_at=datetime.now(UTC))


class Harness:
    def __init__(self, broker: str, pki: Pki, *, fail_first_batch: bool = False) -> None:
        self.broker = broker
        self.topic = f"signed-{uuid.uuid4().hex[:8]}"
        ensure_topics(broker, [TopicSpec(self.topic, 1, "test")])
        self.handed: list[Received] = []
        self.fail_first_batch = fail_first_batch
        self.revoked = set[str]()
        verifier = identity.Verifier(pki.ca.public_key, revoked=lambda: frozenset(self.revoked))
        self.consumer = PartitionConsumer(
            broker, [self.topic], batch_handler=self.fold, schemas={self.topic: AgentMetrics}, start="beginning",
            group_id="signed-test", checker=identity.MessageChecker(verifier))

    def fold(self, batch: Iterator[Received]) -> None:
        got = list(batch)
        if self.fail_first_batch and len(got) > 1:
            self.fail_first_batch = False
            raise RuntimeError("the handler fails once: the batch is handed over again one message at a time")
        self.handed += got

    def send(self, agent_id: str, credential: identity.Credential | None) -> None:
        bus = KafkaBus(self.broker, signer=identity.MessageSigner(identity.fixed(credential)) if credential else None)
        bus.publish(self.topic, agent_id, metrics(agent_id))
        assert bus.flush(10) == 0


@pytest.fixture
def harness(broker: str, pki: Pki) -> Iterator[Harness]:
    h = Harness(broker, pki)
    yield h
    h.consumer.stop()


def test_genuine_messages_carry_their_signer_and_the_others_are_counted_per_reason(harness: Harness,
                                                                                     pki: Pki) -> None:
    a = pki.credential("agent-a", "agent", url="http://agent-a:8600")
    stranger = Pki(pki.root / "stranger").credential("agent-a", "agent")
    harness.send("agent-a", a)
    harness.send("agent-a", None)
    harness.send("agent-a", stranger)
    # a genuine message read off the bus and put back as it was: a replay
    captured: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
    signer = identity.MessageSigner(identity.fixed(a))
    value = metrics("agent-a").model_dump_json().encode()
    headers = signer.headers(harness.topic, b"agent-a", value)
    captured.append((b"agent-a", value, headers))  # type: ignore[arg-type]
    # a signed message whose value was changed after signing
    tampered = metrics("agent-a", cpus=512).model_dump_json().encode()
    producer = Producer({"bootstrap.servers": harness.broker})
    for key, v, h in captured * 2:
        producer.produce(harness.topic, key=key, value=v, headers=h)
    producer.produce(harness.topic, key=b"agent-a", value=tampered, headers=signer.headers(harness.topic, b"agent-a",
                                                                                             value))
    assert producer.flush(10) == 0
    harness.consumer.start()
    wait_until(lambda: harness.consumer.handled == 6, "the first six read")
    harness.revoked.add(a.cert.serial)
    harness.send("agent-a", a)  # revoked by now
    reasons = {"unsigned": 1, "bad_certificate": 1, "replayed": 1, "bad_signature": 1, "revoked": 1}
    wait_until(lambda: harness.consumer.stats().skipped_by_reason == reasons, "every forgery counted")
    assert len(harness.handed) == 2  # the first genuine one, and the captured one the first time it came
    assert {r.signer.subject for r in harness.handed if r.signer} == {"agent-a"}
    assert all(r.signer is not None and r.signer.serial == a.cert.serial for r in harness.handed)


def test_a_batch_handed_over_again_is_not_a_replay(broker: str, pki: Pki) -> None:
    h = Harness(broker, pki, fail_first_batch=True)
    a = pki.credential("agent-a", "agent")
    bus = KafkaBus(broker, signer=identity.MessageSigner(identity.fixed(a)))
    for cpus in (1, 2, 3):
        bus.publish(h.topic, "agent-a", metrics("agent-a", cpus=cpus))
    assert bus.flush(10) == 0
    h.consumer.start()
    try:
        wait_until(lambda: len(h.handed) == 3, "the three messages handed over after the retry")
        assert h.consumer.stats().skipped_by_reason == {}
    finally:
        h.consumer.stop()
