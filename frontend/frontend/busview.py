"""The bus as the broker itself reports it: topics, partitions, offsets, consumer groups and their lag.

Read with confluent-kafka's AdminClient, so it works with the embedded broker and with any Apache Kafka.
Message rates are the growth of the high watermarks between two looks (the previous one kept in memory).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from miaas.errors import UpstreamError

log = logging.getLogger(__name__)
CACHE_S = 2.0  # looks closer together than this reuse the last answer
MIN_RATE_SPAN_S, MAX_RATE_SPAN_S = 1.0, 600.0


class BusUnavailable(UpstreamError):
    def __init__(self, message: str = "The Kafka broker cannot be reached right now. Try again in a moment.") -> None:
        super().__init__(message, code="bus_unavailable")


@dataclass(frozen=True)
class PartitionView:
    partition: int
    leader: int
    low: int
    high: int
    rate: float | None  # messages per second since the previous look

    @property
    def messages(self) -> int:
        return max(0, self.high - self.low)


@dataclass(frozen=True)
class TopicView:
    name: str
    partitions: list[PartitionView]

    @property
    def internal(self) -> bool:
        return self.name.startswith("__")

    @property
    def messages(self) -> int:
        return sum(p.messages for p in self.partitions)

    @property
    def rate(self) -> float | None:
        rates = [p.rate for p in self.partitions if p.rate is not None]
        return sum(rates) if rates else None


@dataclass(frozen=True)
class GroupPartition:
    topic: str
    partition: int
    committed: int
    high: int | None

    @property
    def lag(self) -> int | None:
        return None if self.high is None else max(0, self.high - self.committed)

    @property
    def ahead(self) -> bool:
        """The committed offset is past the high watermark: the broker under-reports its watermarks."""
        return self.high is not None and self.committed > self.high


@dataclass(frozen=True)
class GroupView:
    group_id: str
    state: str
    members: int
    partitions: list[GroupPartition]

    @property
    def lag(self) -> int:
        return sum(p.lag or 0 for p in self.partitions)

    @property
    def ahead(self) -> bool:
        return any(p.ahead for p in self.partitions)


@dataclass(frozen=True)
class BusView:
    bootstrap: str
    cluster_id: str | None
    brokers: list[str]
    topics: list[TopicView]
    groups: list[GroupView]
    errors: list[str] = field(default_factory=list)

    @property
    def watermarks_behind(self) -> bool:
        return any(g.ahead for g in self.groups)

    @property
    def embedded(self) -> bool:
        """The embedded Tansu broker, whose high watermarks run behind (see kafka/README.md)."""
        return "tansu" in (self.cluster_id or "").lower()


class BusInspector:
    """Looks at one broker cluster; the AdminClient is made at the first look, never at construction."""

    def __init__(self, bootstrap: str, clock: Callable[[], float], timeout_s: float = 5.0) -> None:
        self.bootstrap = bootstrap
        self.clock = clock
        self.timeout_s = timeout_s
        self._admin: AdminClient | None = None
        self._lock = threading.Lock()
        self._last: tuple[float, BusView] | None = None
        self._highs: tuple[float, dict[tuple[str, int], int]] | None = None

    def inspect(self) -> BusView:
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last[0] < CACHE_S:
                return self._last[1]
            try:
                view = self._look(now)
            except KafkaException as exc:
                log.warning("cannot read the bus at %s: %s", self.bootstrap, exc)
                raise BusUnavailable() from exc
            self._last = (now, view)
            return view

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap,
                                       "socket.timeout.ms": int(self.timeout_s * 1000)})
        return self._admin

    def _look(self, now: float) -> BusView:
        admin = self._admin_client()
        t = self.timeout_s
        meta = admin.list_topics(timeout=t)
        errors: list[str] = []
        parts = [TopicPartition(name, p) for name, info in meta.topics.items() for p in info.partitions]
        lows = _offsets(admin, parts, OffsetSpec.earliest(), t, errors)
        highs = _offsets(admin, parts, OffsetSpec.latest(), t, errors)
        rates = self._rates(now, highs)
        topics = []
        for name in sorted(meta.topics):
            info = meta.topics[name]
            topics.append(TopicView(name, [
                PartitionView(p, info.partitions[p].leader, lows.get((name, p), 0), highs.get((name, p), 0),
                              rates.get((name, p)))
                for p in sorted(info.partitions)
            ]))
        cluster_id = getattr(meta, "cluster_id", None)
        brokers = [f"#{b.id} at {b.host}:{b.port}" for b in sorted(meta.brokers.values(), key=lambda b: b.id)]
        return BusView(self.bootstrap, cluster_id, brokers, topics, self._groups(admin, highs, errors), errors)

    def _rates(self, now: float, highs: dict[tuple[str, int], int]) -> dict[tuple[str, int], float]:
        rates: dict[tuple[str, int], float] = {}
        if self._highs is not None:
            then, before = self._highs
            span = now - then
            if MIN_RATE_SPAN_S <= span <= MAX_RATE_SPAN_S:
                for tp, high in highs.items():
                    if tp in before and high >= before[tp]:
                        rates[tp] = (high - before[tp]) / span
            if span < MIN_RATE_SPAN_S:
                return rates
        self._highs = (now, highs)
        return rates

    def _groups(self, admin: AdminClient, highs: dict[tuple[str, int], int], errors: list[str]) -> list[GroupView]:
        t = self.timeout_s
        listed = admin.list_consumer_groups(request_timeout=t).result()
        ids = sorted(g.group_id for g in listed.valid)
        errors += [f"listing groups: {e}" for e in listed.errors]
        if not ids:
            return []
        described: dict[str, Any] = {}
        for group_id, future in admin.describe_consumer_groups(ids, request_timeout=t).items():
            try:
                described[group_id] = future.result()
            except KafkaException as exc:
                errors.append(f"group {group_id}: {exc}")
        out = []
        for group_id in ids:
            committed: list[GroupPartition] = []
            try:
                answer = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group_id)],
                                                           request_timeout=t)
                for future in answer.values():
                    for tp in future.result().topic_partitions or []:
                        if tp.offset >= 0:
                            committed.append(GroupPartition(tp.topic, tp.partition, tp.offset,
                                                            highs.get((tp.topic, tp.partition))))
            except KafkaException as exc:
                errors.append(f"offsets of group {group_id}: {exc}")
            d = described.get(group_id)
            state = d.state.name.lower() if d is not None and hasattr(d.state, "name") else "unknown"
            members = len(d.members) if d is not None else 0
            out.append(GroupView(group_id, state, members, sorted(committed, key=lambda p: (p.topic, p.partition))))
        return out

    def close(self) -> None:
        self._admin = None


def _offsets(admin: AdminClient, parts: list[TopicPartition], spec: OffsetSpec, timeout: float,
             errors: list[str]) -> dict[tuple[str, int], int]:
    if not parts:
        return {}
    out: dict[tuple[str, int], int] = {}
    for tp, future in admin.list_offsets({tp: spec for tp in parts}, request_timeout=timeout).items():
        try:
            out[(tp.topic, tp.partition)] = int(future.result().offset)
        except KafkaException as exc:
            errors.append(f"offsets of {tp.topic}[{tp.partition}]: {exc}")
    return out
