"""The shared Kafka helpers on the real broker: topics created idempotently, poison messages skipped."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from miaas.bus import TOPICS, KafkaBus, PartitionConsumer, Received, TopicSpec, ensure_topics
from miaas.schemas import DeploymentEvent, DeploymentStatus


def wait_until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(200):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def test_ensure_topics_is_idempotent(broker: str) -> None:
    ensure_topics(broker)
    ensure_topics(broker)
    topics = AdminClient({"bootstrap.servers": broker}).list_topics(timeout=10).topics
    for spec in TOPICS:
        assert len(topics[spec.name].partitions) == spec.partitions


def test_poison_messages_are_counted_and_skipped_and_consumption_goes_on(broker: str) -> None:
    # given a consumer of every partition of a fresh topic, whose handler refuses invalid events
    topic = f"poison-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker, [TopicSpec(topic, 2, "test")])
    good: list[Received] = []

    def handle(msg: Received) -> None:
        DeploymentEvent.model_validate(msg.value)
        good.append(msg)

    consumer = PartitionConsumer(broker, [topic], handle, start="beginning", group_id="poison-test").start()
    try:
        assert consumer.ready.wait(30)
        # when bad JSON, a non-object, an unknown schema version, NaN and a 2 MB payload arrive between good ones
        raw = Producer({"bootstrap.servers": broker, "message.max.bytes": 5_000_000})
        for payload in [b"{not json", b"[1, 2]", b'{"schema_version": 99, "deployment_id": "x"}',
                        b'{"schema_version": 1, "deployment_id": "x", "status": NaN}', b"x" * 2_000_000]:
            raw.produce(topic, key=b"k", value=payload)
        raw.flush(10)
        bus = KafkaBus(broker)
        for i in range(3):
            bus.publish(topic, f"d-{i}", DeploymentEvent(deployment_id=f"d-{i}", status=DeploymentStatus.RUNNING,
                                                         source="test", at=datetime.now(UTC)))
        bus.flush()
        # then the good ones are handled, every bad one is counted, and the consumer is still alive
        wait_until(lambda: len(good) == 3 and consumer.skipped == 5, "3 handled and 5 skipped")
        assert sorted(m.key or "" for m in good) == ["d-0", "d-1", "d-2"]
        assert consumer._thread is not None and consumer._thread.is_alive()
    finally:
        consumer.stop()
