"""Kafka helpers: topics declared once, an idempotent publisher, and a consumer of every partition.

Thin wrappers over confluent-kafka. Nothing connects at construction time except where a method says so.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic
from pydantic import BaseModel, ValidationError

from miaas import identity
from miaas.schemas import AgentMetrics, ConsumerStats, DeploymentEvent, ModelEvent

log = logging.getLogger(__name__)

SYSTEM_METRICS = "system-metrics"
DEPLOYMENT_EVENTS = "deployment-events"
MODEL_EVENTS = "model-events"
MAX_MESSAGE_BYTES = 1_000_000


KAFKA_CONFIG_ENV = "MIAAS_KAFKA_CONFIG"
_OWN_KEYS = frozenset({"bootstrap.servers", "group.id", "client.id", "enable.idempotence", "enable.auto.commit"})


def kafka_config(raw: str | None = None) -> dict[str, str | int | float | bool]:
    """The broker settings every client of this process adds (`MIAAS_KAFKA_CONFIG`: a JSON object of librdkafka
    settings, e.g. `{"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "...",
    "sasl.password": "...", "ssl.ca.location": "/etc/miaas/kafka-ca.pem"}` for Apache Kafka with SASL/SCRAM)."""
    text = os.environ.get(KAFKA_CONFIG_ENV, "") if raw is None else raw
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{KAFKA_CONFIG_ENV} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in data.items()):
        raise ValueError(f"{KAFKA_CONFIG_ENV} must be a JSON object of librdkafka settings (name: value)")
    own = _OWN_KEYS & set(data)
    if own:
        raise ValueError(f"{KAFKA_CONFIG_ENV} may not set {', '.join(sorted(own))}: MIaaS sets those itself")
    return data


def client_config(bootstrap: str, **more: object) -> dict[str, Any]:
    """A librdkafka configuration: the bootstrap servers, the process's broker settings, then `more`."""
    return {"bootstrap.servers": bootstrap, **kafka_config(), **{k.replace("_", "."): v for k, v in more.items()}}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    description: str
    schema: type[BaseModel] | None = None  # the wire message every value is
    snapshot_key: str | None = None  # a stream of snapshots: the field that is the key; the latest of a key wins


TOPICS = (
    TopicSpec(SYSTEM_METRICS, 3, "agent metrics every few seconds (key: agent id)", AgentMetrics, "agent_id"),
    TopicSpec(DEPLOYMENT_EVENTS, 3, "every state change of a deployment (key: deployment id)", DeploymentEvent),
    TopicSpec(MODEL_EVENTS, 1, "model versions created and deleted (key: model id)", ModelEvent),
)
# The wire schema of each topic, for `PartitionConsumer(schemas=...)`.
SCHEMAS: dict[str, type[BaseModel]] = {t.name: t.schema for t in TOPICS if t.schema is not None}
# The snapshot topics and their key field, for `PartitionConsumer(latest_only=...)`.
SNAPSHOTS: dict[str, str] = {t.name: t.snapshot_key for t in TOPICS if t.snapshot_key is not None}


def ensure_topics(bootstrap: str, topics: Iterable[TopicSpec] = TOPICS, timeout: float = 15.0) -> list[str]:
    """Create the topics that do not exist yet, with their declared partitions; the names created.

    Called again whenever a broker comes back without them (the embedded broker is memory-only). A topic that exists
    with fewer partitions than declared (created meanwhile by a client, with the broker's default) is given the
    missing ones where the broker can (Tansu cannot: then a warning; consumers read every partition there is, so
    only the spread differs). Existing topics are otherwise left as they are.
    """
    specs = list(topics)
    admin = AdminClient(client_config(bootstrap))
    futures = admin.create_topics(
        [NewTopic(t.name, num_partitions=t.partitions, replication_factor=1) for t in specs],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    created: list[str] = []
    existing: set[str] = set()
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            log.info("created topic %s", name)
            created.append(name)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                existing.add(name)
                continue
            raise
    if existing:
        _add_missing_partitions(admin, [t for t in specs if t.name in existing], timeout)
    return created


def _add_missing_partitions(admin: AdminClient, specs: list[TopicSpec], timeout: float) -> None:
    found = describe_topics(admin, [t.name for t in specs], timeout)
    short = [(t, info) for t in specs if (info := found.get(t.name)) is not None and info.partitions < t.partitions]
    if not short:
        return
    futures = admin.create_partitions([NewPartitions(t.name, t.partitions) for t, _ in short],
                                      request_timeout=timeout)
    for (spec, info), future in zip(short, futures.values(), strict=True):
        try:
            future.result(timeout=timeout)
            log.warning("topic %s had %d partitions, %d declared: added the others", spec.name, info.partitions,
                        spec.partitions)
        except KafkaException as exc:
            log.warning("topic %s has %d partitions, %d declared, and the broker did not add any: %s", spec.name,
                        info.partitions, spec.partitions, exc)


@dataclass(frozen=True)
class TopicInfo:
    """One topic as the broker has it now: its partitions, and its id (each creation of a topic gets a new one;
    None where the broker gives none). A topic deleted and created again is a new topic with the same name."""

    name: str
    partitions: int
    topic_id: str | None = None

    def same_topic(self, now: TopicInfo) -> bool:
        """Whether `now` is still this topic, not one created again since (by its id, else by what can be seen)."""
        if self.topic_id is not None and now.topic_id is not None:
            return self.topic_id == now.topic_id
        return now.partitions >= self.partitions


def describe_topics(
    admin: AdminClient, names: Iterable[str], timeout: float = 5.0, *, metadata: Consumer | None = None,
) -> dict[str, TopicInfo | None]:
    """The named topics as the broker has them now (None for one that does not exist); never creates a topic.

    Raises KafkaException when the broker does not answer. The metadata request goes through `metadata` when given
    (a consumer about to be assigned: it is then connected already), else through `admin`. Topic ids come from a
    second request (`describe_topics`): a broker that does not give them leaves `topic_id` None.
    """
    wanted = list(names)
    meta = (metadata if metadata is not None else admin).list_topics(timeout=timeout)
    out: dict[str, TopicInfo | None] = {}
    for name in wanted:
        info = meta.topics.get(name)
        out[name] = TopicInfo(name, len(info.partitions)) if info is not None and info.error is None else None
    present = [name for name in wanted if out[name] is not None]
    if not present:
        return out
    try:
        futures = admin.describe_topics(TopicCollection(present), request_timeout=timeout)
    except KafkaException:
        return out
    for name, future in futures.items():
        try:
            found = future.result(timeout=timeout)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                out[name] = None  # deleted between the two requests
            continue
        out[name] = TopicInfo(name, len(found.partitions), _topic_id(found.topic_id))
    return out


def _topic_id(uuid: Any) -> str | None:
    if uuid is None or (uuid.get_most_significant_bits() == 0 and uuid.get_least_significant_bits() == 0):
        return None
    return str(uuid)


class EventBus(Protocol):
    """Where services publish events."""

    def publish(self, topic: str, key: str, message: BaseModel) -> None: ...

    def flush(self, timeout: float = 5.0) -> int: ...

    def close(self) -> None: ...


class KafkaBus:
    """Publishes wire messages as JSON with an idempotent producer.

    Producers never create topics (`ensure_topics` does, with their declared partitions). A producer that lost every
    broker after it had delivered, whose delivery failed, or that hit a fatal error is replaced by a fresh one before
    the next publish: a broker that comes back empty (the embedded one is memory-only) does not know the old producer
    id (an idempotent producer then retries `UNKNOWN_PRODUCER_ID` until each message times out), and Tansu numbers
    producer ids from 1 again, so an old producer's sequence numbers would collide with a new one's. The messages the
    old producer still held are purged from it and published again by the new one, in order.
    """

    def __init__(self, bootstrap: str, *, client_id: str = "miaas", signer: identity.MessageSigner | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        self.signer = signer
        self._config: dict[str, Any] = {
            **client_config(bootstrap),
            "client.id": client_id,
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.timeout.ms": 30000,
            "allow.auto.create.topics": False,
            **(config or {}),
        }
        self._lock = threading.RLock()
        self.renewed = 0
        """Producers replaced so far (the broker went away, a delivery failed, a fatal error)."""
        self._producer, self._health = self._new_producer()

    def publish(self, topic: str, key: str, message: BaseModel) -> None:
        payload = message.model_dump_json().encode()
        raw_key = key.encode()
        headers = self.signer.headers(topic, raw_key, payload) if self.signer is not None else None
        producer, health = self._producer_now()
        while True:
            try:
                producer.produce(topic, key=raw_key, value=payload, headers=headers, on_delivery=health.delivered)
                break
            except BufferError:
                producer.poll(0.1)
        self._poll(producer, health, 0)

    def flush(self, timeout: float = 5.0) -> int:
        producer, health = self._producer_now()
        try:
            return int(producer.flush(timeout))
        except KafkaException as exc:
            health.failed(exc)
            return len(producer)

    def close(self) -> None:
        self.flush()

    def _new_producer(self) -> tuple[Producer, _ProducerHealth]:
        health = _ProducerHealth()
        return Producer({**self._config, "error_cb": health.error}), health

    def _poll(self, producer: Producer, health: _ProducerHealth, timeout: float) -> None:
        try:
            producer.poll(timeout)
        except KafkaException as exc:  # a fatal error: this producer is done; the next publish gets a fresh one
            health.failed(exc)

    def _producer_now(self) -> tuple[Producer, _ProducerHealth]:
        """The producer to publish with: a fresh one when the current one may be stuck on a broker that restarted."""
        with self._lock:
            self._poll(self._producer, self._health, 0)  # its callbacks say whether it lost the broker meanwhile
            if self._health.stale:
                self._renew()
            return self._producer, self._health

    def _renew(self) -> None:
        old, health = self._producer, self._health
        log.warning("producer %s: %s; publishing with a fresh producer", self._config["client.id"], health.stale)
        health.purged = []
        try:
            old.purge(in_queue=True, in_flight=True)
            old.flush(1.0)  # hands the purged messages to `health.delivered`, which keeps them
        except KafkaException as exc:
            log.warning("producer %s: purging the old producer failed: %s", self._config["client.id"], exc)
        self._producer, self._health = self._new_producer()
        self.renewed += 1
        for topic, key, value, headers in health.purged:
            while True:
                try:
                    self._producer.produce(topic, key=key, value=value, headers=headers,
                                           on_delivery=self._health.delivered)
                    break
                except BufferError:
                    self._producer.poll(0.1)


def _report(err: KafkaError | None, msg: Any) -> None:
    if err is not None:
        log.error("delivery to %s failed: %s", msg.topic(), err)


_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})


class _ProducerHealth:
    """What one producer's callbacks said: whether it delivered, and why it may be stuck (`stale`)."""

    def __init__(self) -> None:
        self.has_delivered = False
        self.stale: str | None = None
        self.purged: list[tuple[str, bytes | None, bytes | None, Any]] | None = None
        """While it is replaced: the messages purged from it, to publish again."""

    def error(self, err: KafkaError) -> None:
        if err.fatal():
            self.stale = f"a fatal error ({err.str()})"
        elif err.code() == KafkaError._ALL_BROKERS_DOWN and self.has_delivered:
            self.stale = "every broker went away"

    def failed(self, exc: KafkaException) -> None:
        self.stale = f"it failed ({exc})"

    def delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is None:
            self.has_delivered = True
            return
        if err.code() in _PURGED and self.purged is not None:
            self.purged.append((msg.topic(), msg.key(), msg.value(), msg.headers()))
            return
        _report(err, msg)
        self.stale = f"a delivery failed ({err.str()})"


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


class Received:
    """One message read from the bus: where it came from, its key, and its JSON object or validated message.

    On a topic consumed with a schema, `message` holds the validated wire message and `value` parses the raw bytes
    again only if asked; otherwise `value` holds the JSON object and `message` is None.
    """

    __slots__ = ("topic", "partition", "offset", "key", "message", "signer", "_value", "_raw")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: str | None,
        value: dict[str, Any] | None = None,
        message: BaseModel | None = None,
        raw: bytes | None = None,
        signer: identity.Certificate | None = None,
    ) -> None:
        self.signer = signer
        """The producer's certificate, when the consumer checks signatures."""
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.message = message
        self._value = value
        self._raw = raw

    @property
    def value(self) -> dict[str, Any]:
        if self._value is None:
            if self._raw is not None:
                self._value = _json_object(self._raw)
            elif self.message is not None:
                self._value = self.message.model_dump(mode="json")
            else:
                self._value = {}
        return self._value

    def __repr__(self) -> str:
        return f"Received({self.topic}[{self.partition}]@{self.offset}, key={self.key!r})"


class NotAnObject(ValueError):
    """Valid JSON that is not an object: every wire message is one."""


class KeyMismatch(ValueError):
    """A message of a `latest_only` topic whose key is not its subject (an agent's metrics keyed by another id)."""


def _json_object(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise NotAnObject(f"a JSON {type(value).__name__}, not an object")
    return value


# Why a message was skipped (the keys of ConsumerStats.skipped_by_reason).
TOO_LARGE = "too_large"  # over MAX_MESSAGE_BYTES: never parsed
BAD_JSON = "bad_json"  # not UTF-8 JSON, or JSON that is not an object, or no value at all
SCHEMA_VERSION = "schema_version"  # a schema_version this code does not know
NOT_FINITE = "not_finite"  # NaN or infinity where a number is expected
OUT_OF_RANGE = "out_of_range"  # a number below or above its bounds: negative CPU %, memory, capacity, interval
INVALID = "invalid"  # anything else the schema refuses: a missing field, a wrong type
HANDLER_ERROR = "handler_error"  # valid, but the handler raised
# ... and, where signatures are checked, identity.REFUSAL_REASONS: unsigned, bad_certificate, bad_signature,
# revoked, replayed, stale, impersonation (signed by one identity, speaking for another: raised by a handler).
SKIP_REASONS = (TOO_LARGE, BAD_JSON, SCHEMA_VERSION, NOT_FINITE, OUT_OF_RANGE, INVALID, HANDLER_ERROR,
                *identity.REFUSAL_REASONS)
_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def skip_reason(exc: BaseException) -> tuple[str, str]:
    """The reason (one of SKIP_REASONS) a message that raised `exc` is skipped, and a short detail."""
    if isinstance(exc, (NotAnObject, UnicodeDecodeError, json.JSONDecodeError)):
        return BAD_JSON, str(exc)[:200]
    if isinstance(exc, KeyMismatch):
        return INVALID, str(exc)[:200]
    if isinstance(exc, identity.Refused):
        return exc.reason, str(exc)[:200]
    if not isinstance(exc, ValidationError):
        return HANDLER_ERROR, f"{exc.__class__.__name__}: {str(exc)[:200]}"
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0] if errors else {"type": "", "loc": (), "msg": ""}
    detail = f"{'.'.join(map(str, first['loc'])) or '(message)'}: {first['msg'][:200]}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    kinds = {e["type"] for e in errors}
    if "json_invalid" in kinds or any(e["type"] in ("model_type", "dict_type") and not e["loc"] for e in errors):
        return BAD_JSON, detail
    if any(e["loc"][:1] == ("schema_version",) for e in errors):
        return SCHEMA_VERSION, detail
    if "finite_number" in kinds:
        return NOT_FINITE, detail
    if kinds & _RANGE_ERRORS:
        return OUT_OF_RANGE, detail
    return INVALID, detail


class SkipLog:
    """Logs skipped messages without flooding: per reason, one line at once, then at most one every `every_s`
    saying how many more there were meanwhile (and the last of them)."""

    def __init__(self, name: str, every_s: float = 10.0) -> None:
        self.name = name
        self.every_s = every_s
        self._logged_at: dict[str, float] = {}
        self._held: dict[str, tuple[int, str]] = {}

    def skipped(self, reason: str, what: str, now: float) -> None:
        last = self._logged_at.get(reason)
        if last is not None and now - last < self.every_s:
            held, _ = self._held.get(reason, (0, ""))
            self._held[reason] = (held + 1, what)
            return
        self._logged_at[reason] = now
        log.warning("%s: %s: %s", self.name, reason, what)

    def flush(self, now: float) -> None:
        """Log the counts held back for longer than `every_s`; cheap when nothing is held."""
        if not self._held:
            return
        for reason, (held, what) in list(self._held.items()):
            if now - self._logged_at[reason] >= self.every_s:
                del self._held[reason]
                self._logged_at[reason] = now
                log.warning("%s: %d more %s in %.0fs; the last: %s", self.name, held, reason, self.every_s, what)


class PartitionConsumer:
    """Consumes every partition of some topics with `assign()`: no consumer-group join delay.

    Messages are read in batches. Each is checked (size, then JSON, or its wire schema when `schemas` names one
    for its topic) and handed on: one at a time to `handler`, or a batch at a time to `batch_handler` (as an
    iterator that checks each message when the handler asks for it; the handler must read it to the end).

    A poison message (too large, bad JSON, an unknown schema version, NaN, a negative capacity...) or one that makes
    the handler raise is counted per reason (`skipped_by_reason`, `stats()`), logged without flooding and passed
    over: never a crash loop, and the messages after it are consumed. A batch handler must be idempotent per
    message: when it raises, the batch is handed over again one message at a time to find the culprit.

    `latest_only` names snapshot topics, each with the field of its message that is the key (`system-metrics`:
    `agent_id`): within a batch only the latest message of a key is read; the earlier ones it replaces are passed
    over unread and counted in `superseded`, as log compaction would (if the latest is poison, the one before it
    is read instead). A message whose key is not that field is skipped as invalid.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Iterable[str],
        handler: Callable[[Received], None] | None = None,
        *,
        batch_handler: Callable[[Iterator[Received]], None] | None = None,
        schemas: Mapping[str, type[BaseModel]] | None = None,
        latest_only: Mapping[str, str] | None = None,
        start: str = "end",
        group_id: str = "miaas",
        batch_size: int = 500,
        log_every_s: float = 10.0,
        checker: identity.MessageChecker | None = None,
    ) -> None:
        if (handler is None) == (batch_handler is None):
            raise ValueError("give one of handler and batch_handler")
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.handler = handler
        self.batch_handler = batch_handler
        self.schemas = dict(schemas or {})
        self.latest_only = dict(latest_only or {})
        if any(t not in self.schemas for t in self.latest_only):
            raise ValueError("a latest_only topic needs a schema: its key field is checked")
        # What `_decode` needs of a topic, in one lookup: the schema's validator of JSON bytes, and the key field.
        self._checks = {t: (m.__pydantic_validator__.validate_json, self.latest_only.get(t))
                        for t, m in self.schemas.items()}
        self.start_at = OFFSET_BEGINNING if start == "beginning" else OFFSET_END
        self.group_id = group_id
        self.batch_size = batch_size
        self.checker = checker
        """Checks each message's signature before anything else: refused ones are skipped, per reason."""
        self.consumed = 0
        self.superseded = 0
        self.skipped = 0
        self.skipped_by_reason: dict[str, int] = {}
        self.last_skipped: str | None = None
        self.ready = threading.Event()
        self._skip_log = SkipLog("skipped a message on " + "+".join(self.topics), log_every_s)
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Following the topics (`_follow_topics`): what each topic was when assigned, and a request to look now.
        self._assigned: dict[str, TopicInfo] = {}
        self._assigned_lock = threading.Lock()
        self._look_now = threading.Event()
        self.reassigned = 0

    def start(self) -> PartitionConsumer:
        self._thread = threading.Thread(target=self._run, name="consumer-" + "+".join(self.topics), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def handled(self) -> int:
        """Messages done with: handed over, superseded or skipped."""
        return self.consumed + self.superseded + self.skipped

    def stats(self) -> ConsumerStats:
        """What this consumer has handled and skipped so far, per reason."""
        with self._stats_lock:
            return ConsumerStats(
                topics=self.topics, consumed=self.consumed, superseded=self.superseded, skipped=self.skipped,
                skipped_by_reason=dict(self.skipped_by_reason), last_skipped=self.last_skipped,
            )

    recheck_s = 2.0
    """Seconds between two looks at the topics: one deleted and created again (a broker restarted empty) is read
    from its beginning, partitions added are read too. `look_again()` asks for a look at once."""

    def _assignment(self, consumer: Consumer, admin: AdminClient | None = None) -> list[TopicPartition]:
        """Every partition of every topic, from `start`; raises KafkaException while one of them is missing."""
        admin = admin if admin is not None else AdminClient(client_config(self.bootstrap))
        found = describe_topics(admin, self.topics, timeout=10, metadata=consumer)
        parts: list[TopicPartition] = []
        for topic in self.topics:
            info = found.get(topic)
            if info is None:
                raise KafkaException(f"topic {topic} is not available")
            parts += [TopicPartition(topic, p, self.start_at) for p in range(info.partitions)]
        with self._assigned_lock:
            self._assigned = {topic: info for topic, info in found.items() if info is not None}
        return parts

    def look_again(self) -> None:
        """Compare the assignment with the topics as the broker has them at once, not at the next periodic look."""
        self._look_now.set()

    def follows(self, found: Mapping[str, TopicInfo | None]) -> bool:
        """Whether this consumer is assigned to every partition of its topics as they are in `found`
        (`describe_topics`): not to a topic since deleted, or created again."""
        if not self.ready.is_set():
            return False
        with self._assigned_lock:
            for topic in self.topics:
                now, was = found.get(topic), self._assigned.get(topic)
                if now is None or was is None or not was.same_topic(now) or was.partitions != now.partitions:
                    return False
        return True

    def _follow_topics(self, consumer: Consumer, admin: AdminClient) -> None:
        """Follow the topics as the broker has them now: a topic gone is let go (its positions mean nothing any
        more); one created again, or first seen, is read from its beginning (all of it was written since); added
        partitions are read from their beginning. Positions in the topics that did not change are kept."""
        try:
            found = describe_topics(admin, self.topics, timeout=2)
        except KafkaException as exc:
            log.debug("consumer of %s: no answer from the broker: %s", self.topics, exc)
            return
        drop: list[TopicPartition] = []
        add: list[TopicPartition] = []
        with self._assigned_lock:
            for topic in self.topics:
                now, was = found.get(topic), self._assigned.get(topic)
                if now is None:
                    if was is not None:
                        log.warning("consumer of %s: topic %s is gone (a broker restarted empty?); waiting for it "
                                    "to be created again", self.topics, topic)
                        drop += [TopicPartition(topic, p) for p in range(was.partitions)]
                        del self._assigned[topic]
                    continue
                if was is None or not was.same_topic(now):
                    if was is not None:
                        drop += [TopicPartition(topic, p) for p in range(was.partitions)]
                    add += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(now.partitions)]
                    log.warning("consumer of %s: topic %s was created again; reading it from its beginning",
                                self.topics, topic)
                elif now.partitions > was.partitions:
                    add += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(was.partitions, now.partitions)]
                self._assigned[topic] = now
        if drop:
            consumer.incremental_unassign(drop)
        if add:
            consumer.incremental_assign(add)
            self.reassigned += 1

    def _run(self) -> None:
        consumer = Consumer(
            {
                **client_config(self.bootstrap),
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest" if self.start_at == OFFSET_BEGINNING else "latest",
                "fetch.message.max.bytes": MAX_MESSAGE_BYTES * 11,
            }
        )
        admin = AdminClient(client_config(self.bootstrap))
        try:
            while not self._stop.is_set():
                try:
                    consumer.assign(self._assignment(consumer, admin))
                    break
                except KafkaException as exc:
                    log.warning("waiting for topics %s: %s", self.topics, exc)
                    self._stop.wait(1.0)
            self.ready.set()
            next_look = time.monotonic() + self.recheck_s
            while not self._stop.is_set():
                try:
                    batch = consumer.consume(num_messages=self.batch_size, timeout=0.2)
                    if batch:
                        self._handle_batch(batch)
                    if self._look_now.is_set() or time.monotonic() >= next_look:
                        self._look_now.clear()
                        self._follow_topics(consumer, admin)
                        next_look = time.monotonic() + self.recheck_s
                except Exception:  # noqa: BLE001 - the consumer outlives any error; offsets have moved on
                    log.exception("consumer of %s failed; going on in a second", self.topics)
                    self._stop.wait(1.0)
                self._skip_log.flush(time.monotonic())
        finally:
            consumer.close()

    def _handle_batch(self, batch: list[Any]) -> None:
        bad: set[int] = set()  # positions found poison: never read (or counted) twice
        tally: dict[str, int] = {}
        if self.batch_handler is None:
            assert self.handler is not None
            for r in self._select(batch, bad, tally):
                self._deliver(r, self.handler)
            with self._stats_lock:
                self.superseded += tally.get("superseded", 0)
            return
        # The batch handler gets an iterator that validates each message as it is asked for it, so a message is
        # folded (and the one it replaces freed) before the next is built: no batch of models alive at once.
        messages = self._select(batch, bad, tally)
        try:
            self.batch_handler(messages)
            for _ in messages:  # a handler that stopped early has not seen these: hand them over one by one
                raise RuntimeError("batch handler did not read its whole batch")
            self.consumed += tally["handed"]
        except Exception:  # noqa: BLE001 - find the message that made it raise: the batch again, one at a time
            messages.close()
            handle = self.batch_handler
            for r in self._select(batch, bad, tally):
                self._deliver(r, lambda r: handle(iter((r,))))
        with self._stats_lock:
            self.superseded += tally.get("superseded", 0)

    def _select(self, batch: list[Any], bad: set[int], tally: dict[str, int]) -> Generator[Received, None, None]:
        """The messages of a batch to hand over, in order, each checked when asked for; poison ones skipped (and
        added to `bad`), superseded ones of `latest_only` topics passed over. Once all are read, `tally` says how
        many were handed over and how many superseded."""
        previous: dict[int, int] = {}  # position -> position of the message with the same key before it
        superseded: set[int] = set()
        if self.latest_only:
            # Keyed per topic by the key bytes alone: no tuple per message (allocations that outlive a message
            # are what make the garbage collector walk the models just folded).
            last: dict[str, dict[bytes, int]] = {topic: {} for topic in self.latest_only}
            for i, msg in enumerate(batch):
                of_topic = last.get(msg.topic())
                if of_topic is not None and (key := msg.key()) is not None and msg.error() is None:
                    j = of_topic.get(key)
                    if j is not None:
                        previous[i] = j
                        superseded.add(j)
                    of_topic[key] = i
            del last
        handed = 0
        for i, msg in enumerate(batch):
            if i in superseded:
                continue
            while True:
                r = None if i in bad else self._decode(msg)
                if r is not None:
                    handed += 1
                    yield r
                    break
                bad.add(i)
                j = previous.get(i)
                if j is None:
                    break
                superseded.discard(j)  # the latest was poison: the one before it is read after all
                i, msg = j, batch[j]
        tally["handed"], tally["superseded"] = handed, len(superseded)

    def _deliver(self, r: Received, handle: Callable[[Received], None]) -> None:
        try:
            handle(r)
            self.consumed += 1
        except Exception as exc:  # noqa: BLE001 - a poison message must never stop the consumer
            self._skip(f"{r.topic}[{r.partition}]@{r.offset}", *skip_reason(exc))

    def _decode(self, msg: Any) -> Received | None:
        """The message ready for the handler, or None when it is skipped (counted and logged) or an error."""
        error = msg.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                self._skip_log.skipped("broker_error", str(error), time.monotonic())
            return None
        raw = msg.value()
        topic = msg.topic()
        if raw is None or len(raw) > MAX_MESSAGE_BYTES:
            why = "no value" if raw is None else f"{len(raw):,} bytes, over the {MAX_MESSAGE_BYTES:,} byte limit"
            self._skip(f"{topic}[{msg.partition()}]@{msg.offset()}", BAD_JSON if raw is None else TOO_LARGE, why)
            return None
        try:
            raw_key = msg.key()
            signer = None
            if self.checker is not None:
                signer = self.checker.check(topic, msg.partition(), raw_key, raw, msg.headers(), time.time(),
                                            msg.offset())
            key = raw_key.decode("utf-8", "replace") if raw_key is not None else None
            checks = self._checks.get(topic)
            if checks is None:
                return Received(topic, msg.partition(), msg.offset(), key, value=_json_object(raw), signer=signer)
            validate_json, field = checks
            message = validate_json(raw)  # Model.model_validate_json without its Python wrapper
            if field is not None and key is not None and getattr(message, field) != key:
                raise KeyMismatch(f"key {key[:100]!r} is not the message's {field} {getattr(message, field)!r}")
            return Received(topic, msg.partition(), msg.offset(), key, message=message, raw=raw, signer=signer)
        except Exception as exc:  # noqa: BLE001 - whatever the bytes are, they are counted and passed over
            self._skip(f"{topic}[{msg.partition()}]@{msg.offset()}", *skip_reason(exc))
            return None

    def _skip(self, where: str, reason: str, why: str) -> None:
        what = f"{where}: {why}"
        with self._stats_lock:
            self.skipped += 1
            self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
            self.last_skipped = f"{reason} {what}"
        self._skip_log.skipped(reason, what, time.monotonic())


def wait_for_broker(bootstrap: str, timeout: float = 30.0) -> None:
    """Block until the broker answers a metadata request."""
    deadline = time.monotonic() + timeout
    admin = AdminClient(client_config(bootstrap))
    while True:
        try:
            admin.list_topics(timeout=2)
            return
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
