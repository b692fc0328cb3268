"""The bus helpers across a broker restart: the embedded broker is memory-only, so it comes back without a topic or
a producer id. Producers keep delivering (a fresh idempotent producer), consumers follow the topics created again
(read from their beginning), `ensure_topics` gives them back. A broker of its own per test: it is restarted."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from embedded_broker import EmbeddedBroker
from embedded_broker.launcher import free_port
from miaas.bus import KafkaBus, PartitionConsumer, Received, TopicSpec, describe_topics, ensure_topics
from miaas.schemas import ModelEvent
from miaas.testing import wait_for

TOPIC = TopicSpec("restart-test", 2, "a topic of this test only")


class Restartable:
    """One embedded broker on a fixed port that a test can restart (empty, as the memory-only build does)."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.broker = EmbeddedBroker(port=self.port, log_file=log_dir / "tansu.log").start()

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    def restart(self) -> None:
        self.broker.stop()
        self.broker = EmbeddedBroker(port=self.port, log_file=self.log_dir / "tansu.log").start()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Restartable]:
    b = Restartable(tmp_path)
    try:
        yield b
    finally:
        b.broker.stop()


def event(i: int) -> ModelEvent:
    return ModelEvent(model_id=f"m-{i}", name=f"m-{i}", version=1, sha256="0" * 64, path=f"m-{i}/v1",
                      at=datetime(2026, 1, 1, tzinfo=UTC))


def test_a_consumer_reads_a_topic_created_again_and_the_producer_keeps_delivering(broker: Restartable) -> None:
    # given a topic, a consumer of all of it and a producer that has delivered to it
    ensure_topics(broker.bootstrap, [TOPIC])
    seen: list[str] = []
    lock = threading.Lock()

    def handle(r: Received) -> None:
        with lock:
            seen.append(r.value["model_id"])

    consumer = PartitionConsumer(broker.bootstrap, [TOPIC.name], handle, start="beginning", group_id="restart")
    consumer.recheck_s = 0.2
    consumer.start()
    bus = KafkaBus(broker.bootstrap, client_id="restart-test")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    try:
        assert consumer.ready.wait(30)
        for i in range(6):
            bus.publish(TOPIC.name, f"k{i}", event(i))
        assert bus.flush(10) == 0
        wait_for(lambda: len(seen) == 6, 30, "the first messages")

        # when the broker restarts empty and the topic is created again
        broker.restart()
        assert describe_topics(admin, [TOPIC.name])[TOPIC.name] is None  # memory-only: gone
        wait_for(lambda: not consumer.follows(describe_topics(admin, [TOPIC.name])), 30, "the consumer to notice")
        assert ensure_topics(broker.bootstrap, [TOPIC]) == [TOPIC.name]
        now = describe_topics(admin, [TOPIC.name])
        wait_for(lambda: consumer.follows(now), 30, "the consumer to follow the new topic")

        # then the same producer delivers again, and the consumer reads every new message (offsets start anew)
        for i in range(6, 9):
            bus.publish(TOPIC.name, f"k{i}", event(i))
        assert bus.flush(30) == 0
        wait_for(lambda: len(seen) == 9, 30, "the messages written after the restart")
        assert sorted(seen[6:]) == ["m-6", "m-7", "m-8"]
        assert consumer.skipped == 0
    finally:
        consumer.stop()
        bus.close()


def test_ensure_topics_reports_what_it_created_and_leaves_existing_topics(broker: Restartable) -> None:
    assert ensure_topics(broker.bootstrap, [TOPIC]) == [TOPIC.name]
    assert ensure_topics(broker.bootstrap, [TOPIC]) == []
    info = describe_topics(AdminClient({"bootstrap.servers": broker.bootstrap}), [TOPIC.name, "absent"])
    assert info["absent"] is None
    assert info[TOPIC.name] is not None and info[TOPIC.name].partitions == 2
