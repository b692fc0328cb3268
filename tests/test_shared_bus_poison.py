"""Poison messages on the real broker: each kind is counted under its reason and skipped, and the good message sent
after it is still handed over. The consumer reads like the controller's metrics consumer: the AgentMetrics schema,
batches, and only the latest snapshot of an agent within a batch."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from confluent_kafka import Producer

from miaas.bus import PartitionConsumer, Received, SkipLog, TopicSpec, ensure_topics
from miaas.schemas import AgentCapacity, AgentLoad, AgentMetrics

TEN_MB = 10 * 1024 * 1024


def wait_until(predicate: Callable[[], bool], what: str, tries: int = 300) -> None:
    import time

    for _ in range(tries):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def metrics(agent_id: str, **change: object) -> dict[str, object]:
    """A valid metrics message as JSON-ready data, with some fields changed."""
    good = AgentMetrics(
        agent_id=agent_id, url="http://127.0.0.1:8600", capacity=AgentCapacity(cpus=4, memory_mb=8192),
        load=AgentLoad(cpu_percent=10, memory_percent=20), sent_at=datetime.now(UTC),
    ).model_dump(mode="json")
    for path, value in change.items():
        *parents, leaf = path.split("__")
        target = good
        for p in parents:
            target = target[p]  # type: ignore[assignment]
        target[leaf] = value
    return good


def raw(value: dict[str, object]) -> bytes:
    return json.dumps(value).encode()


class Harness:
    """A fresh topic, a consumer of it that records what it hands over, and a producer of raw bytes."""

    def __init__(self, broker: str) -> None:
        self.topic = f"poison-{uuid.uuid4().hex[:8]}"
        ensure_topics(broker, [TopicSpec(self.topic, 1, "test")])
        self.handed: list[AgentMetrics] = []
        self.consumer = PartitionConsumer(
            broker, [self.topic], batch_handler=self.fold, schemas={self.topic: AgentMetrics},
            latest_only={self.topic: "agent_id"}, start="beginning", group_id="poison-test",
        )
        self.producer = Producer({"bootstrap.servers": broker, "message.max.bytes": TEN_MB + 1_000_000})

    def fold(self, batch: Iterator[Received]) -> None:
        self.handed += [r.message for r in batch if isinstance(r.message, AgentMetrics)]

    def send(self, key: str, value: bytes) -> None:
        self.producer.produce(self.topic, key=key.encode(), value=value)
        self.producer.flush(30)

    def agents(self) -> list[str]:
        return [m.agent_id for m in self.handed]


@pytest.fixture
def bus(broker: str) -> Iterator[Harness]:
    harness = Harness(broker)
    harness.consumer.start()
    assert harness.consumer.ready.wait(30)
    yield harness
    harness.consumer.stop()
    harness.producer.flush(10)
    del harness.producer  # no producer left to retry a broker the session has stopped


POISON = {
    "bad JSON": (b'{"schema_version": 1, "agent_id": "poison"', "bad_json"),
    "not UTF-8": (b"\xff\xfe{}", "bad_json"),
    "JSON that is not an object": (b"[1, 2, 3]", "bad_json"),
    "an unknown schema version": (raw(metrics("poison", schema_version=2)), "schema_version"),
    "NaN CPU %": (raw(metrics("poison", load__cpu_percent=float("nan"))), "not_finite"),
    "infinite memory": (raw(metrics("poison", capacity__memory_mb=float("inf"))), "not_finite"),
    "negative CPU %": (raw(metrics("poison", load__cpu_percent=-5)), "out_of_range"),
    "negative memory capacity": (raw(metrics("poison", capacity__memory_mb=-1024)), "out_of_range"),
    "negative CPU count": (raw(metrics("poison", capacity__cpus=-2)), "out_of_range"),
    "a negative interval": (raw(metrics("poison", interval_s=-5)), "out_of_range"),
    "a date without a time zone": (raw(metrics("poison", sent_at="2026-01-01T00:00:00")), "invalid"),
    "a key that is not its agent": (raw(metrics("someone-else")), "invalid"),
    "a 10 MB payload": (b'{"pad": "' + b"x" * TEN_MB + b'"}', "too_large"),
}


@pytest.mark.parametrize("kind", list(POISON))
def test_a_poison_message_is_counted_under_its_reason_and_the_next_good_one_is_handed_over(
    bus: Harness, kind: str
) -> None:
    payload, reason = POISON[kind]
    # given a consumer of every partition; when a poison message arrives, then a good one
    bus.send("poison", payload)
    bus.send("agent-good", raw(metrics("agent-good")))
    # then the poison is counted under its reason, never handed over, and the good one is
    wait_until(lambda: bus.agents() == ["agent-good"] and bus.consumer.skipped == 1, f"{kind} skipped, good handed")
    stats = bus.consumer.stats()
    assert stats.skipped_by_reason == {reason: 1}
    assert stats.last_skipped is not None and stats.last_skipped.startswith(reason)
    assert stats.consumed == 1
    assert bus.consumer._thread is not None and bus.consumer._thread.is_alive()


def test_when_the_latest_snapshot_of_an_agent_is_poison_the_one_before_it_is_used(bus: Harness) -> None:
    # given a good snapshot of an agent followed by a poison one in the same batch (or the next one)
    bus.producer.produce(bus.topic, key=b"agent-a", value=raw(metrics("agent-a", load__cpu_percent=42)))
    bus.producer.produce(bus.topic, key=b"agent-a", value=raw(metrics("agent-a", load__cpu_percent=float("nan"))))
    bus.producer.flush(30)
    # then the poison is counted and the good one is folded
    wait_until(lambda: bus.consumer.skipped == 1 and len(bus.handed) == 1, "poison counted, good one handed")
    assert bus.handed[0].load.cpu_percent == 42
    assert bus.consumer.stats().skipped_by_reason == {"not_finite": 1}


def test_snapshots_superseded_in_their_batch_are_passed_over_unread(bus: Harness) -> None:
    # given three snapshots of one agent and one of another, sent together
    for cpu in (1, 2, 3):
        bus.producer.produce(bus.topic, key=b"agent-a", value=raw(metrics("agent-a", load__cpu_percent=cpu)))
    bus.producer.produce(bus.topic, key=b"agent-b", value=raw(metrics("agent-b")))
    bus.producer.flush(30)
    # then every one is accounted for, and the last handed over of agent-a is its latest
    wait_until(lambda: bus.consumer.handled == 4, "all four handled")
    assert bus.consumer.consumed + bus.consumer.superseded == 4
    assert [m.load.cpu_percent for m in bus.handed if m.agent_id == "agent-a"][-1] == 3
    assert "agent-b" in bus.agents()
    assert bus.consumer.skipped == 0


def test_a_flood_of_poison_is_counted_in_full_and_logged_in_a_few_lines(
    bus: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # given a flood of bad messages, then a good one
    caplog.set_level(logging.WARNING, logger="miaas.bus")
    for i in range(2_000):
        bus.producer.produce(bus.topic, key=f"p-{i}".encode(), value=b"{oops")
        if i % 500 == 0:
            bus.producer.poll(0)
    bus.producer.produce(bus.topic, key=b"agent-good", value=raw(metrics("agent-good")))
    bus.producer.flush(30)
    # then each is counted, the good one gets through, and the log has a line, not a line per message
    wait_until(lambda: bus.consumer.skipped == 2_000 and bus.agents() == ["agent-good"], "flood counted")
    assert bus.consumer.stats().skipped_by_reason == {"bad_json": 2_000}
    skipped_lines = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert 1 <= len(skipped_lines) <= 3


def test_the_skip_log_holds_back_repeats_and_later_says_how_many(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="miaas.bus")
    skips = SkipLog("skipped a message on t", every_s=10.0)
    for i in range(1_000):
        skips.skipped("bad_json", f"t[0]@{i}: oops", now=100.0 + i * 0.001)
    skips.skipped("too_large", "t[0]@1000: 11 MB", now=101.0)
    skips.flush(now=105.0)  # too early: still held back
    assert [r.getMessage() for r in caplog.records] == [
        "skipped a message on t: bad_json: t[0]@0: oops",
        "skipped a message on t: too_large: t[0]@1000: 11 MB",
    ]
    skips.flush(now=110.5)
    assert caplog.records[-1].getMessage() == (
        "skipped a message on t: 999 more bad_json in 10s; the last: t[0]@999: oops"
    )
    skips.flush(now=200.0)  # nothing held back: nothing said
    assert len(caplog.records) == 3


def test_a_batch_whose_handler_raises_is_handed_over_again_one_by_one_and_only_the_culprit_is_skipped(
    broker: str,
) -> None:
    # given a batch handler that fails on one agent's metrics (a bug, a database down for that row...)
    topic = f"poison-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker, [TopicSpec(topic, 1, "test")])
    folded: set[str] = set()

    def fold(batch: Iterator[Received]) -> None:
        for r in batch:
            assert isinstance(r.message, AgentMetrics)
            if r.message.agent_id == "agent-boom":
                raise RuntimeError("cannot fold agent-boom")
            folded.add(r.message.agent_id)

    consumer = PartitionConsumer(broker, [topic], batch_handler=fold, schemas={topic: AgentMetrics},
                                 start="beginning", group_id="poison-test").start()
    producer = Producer({"bootstrap.servers": broker})
    try:
        assert consumer.ready.wait(30)
        # when it arrives among good ones
        for agent in ("agent-1", "agent-boom", "agent-2"):
            producer.produce(topic, key=agent.encode(), value=raw(metrics(agent)))
        producer.flush(30)
        # then the others are folded, and only it is counted, as a handler error
        wait_until(lambda: folded == {"agent-1", "agent-2"} and consumer.skipped == 1, "the culprit found")
        assert consumer.stats().skipped_by_reason == {"handler_error": 1}
        assert consumer.consumed == 2
    finally:
        consumer.stop()
        producer.flush(10)
