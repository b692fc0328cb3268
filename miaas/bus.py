"""Kafka helpers: topics declared once, an idempotent publisher, and a consumer of every partition.

Thin wrappers over confluent-kafka. Nothing connects at construction time except where a method says so.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic
from pydantic import BaseModel

log = logging.getLogger(__name__)

SYSTEM_METRICS = "system-metrics"
DEPLOYMENT_EVENTS = "deployment-events"
MODEL_EVENTS = "model-events"
MAX_MESSAGE_BYTES = 1_000_000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    description: str


TOPICS = (
    TopicSpec(SYSTEM_METRICS, 3, "agent metrics every few seconds (key: agent id)"),
    TopicSpec(DEPLOYMENT_EVENTS, 3, "every state change of a deployment (key: deployment id)"),
    TopicSpec(MODEL_EVENTS, 1, "model versions created and deleted (key: model id)"),
)


def ensure_topics(bootstrap: str, topics: Iterable[TopicSpec] = TOPICS, timeout: float = 15.0) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(t.name, num_partitions=t.partitions, replication_factor=1) for t in topics],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            log.info("created topic %s", name)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise


class EventBus(Protocol):
    """Where services publish events."""

    def publish(self, topic: str, key: str, message: BaseModel) -> None: ...

    def flush(self, timeout: float = 5.0) -> int: ...

    def close(self) -> None: ...


class KafkaBus:
    """Publishes wire messages as JSON with an idempotent producer."""

    def __init__(self, bootstrap: str, *, client_id: str = "miaas") -> None:
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "client.id": client_id,
                "enable.idempotence": True,
                "linger.ms": 5,
                "message.timeout.ms": 30000,
            }
        )

    def publish(self, topic: str, key: str, message: BaseModel) -> None:
        payload = message.model_dump_json().encode()
        while True:
            try:
                self._producer.produce(topic, key=key.encode(), value=payload, on_delivery=_report)
                break
            except BufferError:
                self._producer.poll(0.1)
        self._producer.poll(0)

    def flush(self, timeout: float = 5.0) -> int:
        return int(self._producer.flush(timeout))

    def close(self) -> None:
        self.flush()


def _report(err: KafkaError | None, msg: Any) -> None:
    if err is not None:
        log.error("delivery to %s failed: %s", msg.topic(), err)


class MemoryBus:
    """An in-process bus for unit tests of code that publishes; keeps every message in order."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, BaseModel]] = []
        self._lock = threading.Lock()

    def publish(self, topic: str, key: str, message: BaseModel) -> None:
        with self._lock:
            self.messages.append((topic, key, message))

    def flush(self, timeout: float = 5.0) -> int:
        return 0

    def close(self) -> None:
        pass

    def on(self, topic: str) -> list[BaseModel]:
        with self._lock:
            return [m for t, _, m in self.messages if t == topic]


@dataclass
class Received:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: dict[str, Any]


class PartitionConsumer:
    """Consumes every partition of some topics with `assign()`: no consumer-group join delay.

    Each message's JSON is handed to `handler`; a message that is not a JSON object, is too large, or
    makes the handler raise is logged, counted in `skipped` and passed over: never a crash loop.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Iterable[str],
        handler: Callable[[Received], None],
        *,
        start: str = "end",
        group_id: str = "miaas",
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.handler = handler
        self.start_at = OFFSET_BEGINNING if start == "beginning" else OFFSET_END
        self.group_id = group_id
        self.consumed = 0
        self.skipped = 0
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PartitionConsumer:
        self._thread = threading.Thread(target=self._run, name="consumer-" + "+".join(self.topics), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _assignment(self, consumer: Consumer) -> list[TopicPartition]:
        meta = consumer.list_topics(timeout=10)
        parts: list[TopicPartition] = []
        for topic in self.topics:
            info = meta.topics.get(topic)
            if info is None or info.error is not None:
                raise KafkaException(f"topic {topic} is not available")
            parts += [TopicPartition(topic, p, self.start_at) for p in sorted(info.partitions)]
        return parts

    def _run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest" if self.start_at == OFFSET_BEGINNING else "latest",
                "fetch.message.max.bytes": MAX_MESSAGE_BYTES * 11,
            }
        )
        try:
            while not self._stop.is_set():
                try:
                    consumer.assign(self._assignment(consumer))
                    break
                except KafkaException as exc:
                    log.warning("waiting for topics %s: %s", self.topics, exc)
                    self._stop.wait(1.0)
            self.ready.set()
            while not self._stop.is_set():
                for msg in consumer.consume(num_messages=500, timeout=0.2):
                    self._handle(msg)
        finally:
            consumer.close()

    def _handle(self, msg: Any) -> None:
        if msg.error() is not None:
            if msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", msg.error())
            return
        raw = msg.value() or b""
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        if len(raw) > MAX_MESSAGE_BYTES:
            self._skip(where, f"{len(raw)} bytes is over the {MAX_MESSAGE_BYTES} byte limit")
            return
        try:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            key = msg.key().decode("utf-8", "replace") if msg.key() else None
            self.handler(Received(msg.topic(), msg.partition(), msg.offset(), key, value))
            self.consumed += 1
        except Exception as exc:  # noqa: BLE001 - a poison message must never stop the consumer
            self._skip(where, f"{exc.__class__.__name__}: {str(exc)[:300]}")

    def _skip(self, where: str, why: str) -> None:
        self.skipped += 1
        log.warning("skipped message %s: %s", where, why)


def wait_for_broker(bootstrap: str, timeout: float = 30.0) -> None:
    """Block until the broker answers a metadata request."""
    deadline = time.monotonic() + timeout
    admin = AdminClient({"bootstrap.servers": bootstrap})
    while True:
        try:
            admin.list_topics(timeout=2)
            return
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
