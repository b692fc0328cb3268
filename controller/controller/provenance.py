"""Who may say what on the bus the controller reads: a message is believed only when its signer is the identity it
speaks for (DESIGN §7). Pure apart from `ReadOrderChecker`, which remembers what it has accepted.

- `system-metrics`: signed by role `agent`, subject the message's `agent_id`, certificate URL the message's `url`.
  So the URL the controller sends an agent's commands to (the one in its metrics) is the one bound in its
  certificate when it joined.
- `deployment-events`: an agent's report (`source: "agent"`) signed by role `agent`, subject its `agent_id`; a
  controller's event by role `controller`; no other source.

A message that fails raises `identity.Refused(IMPERSONATION)`: the consumer counts it under `impersonation`
(`GET /controller/bus`) and skips it. A message with no signer at all (a consumer built without a checker) is
refused as `unsigned`: the controller believes nothing it could not check.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left, insort
from collections.abc import Iterable
from dataclasses import dataclass, field

from miaas import identity
from miaas.schemas import AgentMetrics, DeploymentEvent


def _signed(signer: identity.Certificate | None, what: str) -> identity.Certificate:
    if signer is None:
        raise identity.Refused(identity.UNSIGNED, f"{what} was read without its signature checked")
    return signer


def check_metrics(signer: identity.Certificate | None, m: AgentMetrics) -> None:
    """Metrics speak for the agent that signed them, at the URL bound in its certificate; else Refused."""
    cert = _signed(signer, f"metrics of {m.agent_id}")
    if cert.role != identity.AGENT or cert.subject != m.agent_id:
        raise identity.Refused(identity.IMPERSONATION,
                               f"metrics of agent {m.agent_id} signed by {cert.role} {cert.subject}")
    if cert.url != m.url:
        raise identity.Refused(identity.IMPERSONATION,
                               f"metrics of agent {m.agent_id} give the URL {m.url!r}; its certificate binds "
                               f"{cert.url!r}")


def check_event(signer: identity.Certificate | None, e: DeploymentEvent) -> None:
    """An event speaks for its source: an agent's for that agent, a controller's for a controller; else Refused."""
    cert = _signed(signer, f"an event of {e.deployment_id}")
    if e.source == "agent":
        if cert.role != identity.AGENT or cert.subject != e.agent_id:
            raise identity.Refused(identity.IMPERSONATION,
                                   f"a report of agent {e.agent_id} on {e.deployment_id} signed by {cert.role} "
                                   f"{cert.subject}")
    elif e.source == "controller":
        if cert.role != identity.CONTROLLER:
            raise identity.Refused(identity.IMPERSONATION,
                                   f"a controller event on {e.deployment_id} signed by {cert.role} {cert.subject}")
    else:
        raise identity.Refused(identity.IMPERSONATION,
                               f"an event of source {e.source!r} on {e.deployment_id} signed by {cert.role} "
                               f"{cert.subject}: no such source")


@dataclass
class _Seen:
    """What one producer (a certificate serial) signed on one partition that was accepted: offset -> (seq, ts)."""

    offsets: list[int] = field(default_factory=list)  # sorted
    seqs: dict[int, tuple[int, float]] = field(default_factory=dict)
    max_seq: int = -1
    floor: int = -1  # offsets below were forgotten for room (not for age): there only a newer sequence passes
    oldest: float = float("inf")  # the earliest ts held

    def accepts(self, offset: int, seq: int) -> bool:
        if seq > self.max_seq:
            return True  # newer than anything seen: the usual case, and a topic created again (offsets from 0)
        known = self.seqs.get(offset)
        if known is not None:
            return known[0] == seq  # the very message, read again
        if offset < self.floor:
            return False
        i = bisect_left(self.offsets, offset)
        return (i == 0 or self.seqs[self.offsets[i - 1]][0] < seq) and \
            (i == len(self.offsets) or seq < self.seqs[self.offsets[i]][0])

    def add(self, offset: int, seq: int, ts: float, limit: int) -> None:
        if offset not in self.seqs:
            insort(self.offsets, offset)
        self.seqs[offset] = (seq, ts)
        self.max_seq = max(self.max_seq, seq)
        self.oldest = min(self.oldest, ts)
        while len(self.offsets) > limit:
            gone = self.offsets.pop(0)
            del self.seqs[gone]
            self.floor = max(self.floor, gone + 1)

    def forget_before(self, cutoff: float) -> None:
        if self.oldest < cutoff:
            self.seqs = {o: (q, ts) for o, (q, ts) in self.seqs.items() if ts >= cutoff}
            self.offsets = sorted(self.seqs)
            self.oldest = min((ts for _, ts in self.seqs.values()), default=float("inf"))


class ReadOrderChecker(identity.MessageChecker):
    """A `MessageChecker` for a consumer that may read a partition out of order: a producer's sequence must grow
    with the offset, rather than with the order of reading.

    `PartitionConsumer` reads some messages again or backwards: when a batch handler raises, the batch is handed
    over again one message at a time; when the latest snapshot of a key is poison, the one before it is read. The
    plain checker knows a message read again at its offset, but refuses one read after a later message of its
    producer as replayed: an agent's previous snapshot would be counted as an attack when its latest is poison.
    Here a message is accepted when it is the one accepted at that offset before, or its sequence fits between
    those of the producer's messages accepted below and above its offset. A replay is appended after the
    original, so it lands above a message whose sequence is not lower: refused as `replayed`. What is remembered
    of a producer is forgotten once older than `max_age_s` (a message that old is refused as stale anyway), and
    beyond `limit` messages per partition (below those, only a newer sequence passes)."""

    def __init__(self, verifier: identity.Verifier, *, limit: int = 4096, max_age_s: float = 300.0,
                 max_skew_s: float = identity.MAX_SKEW_S) -> None:
        super().__init__(verifier, max_age_s=max_age_s, max_skew_s=max_skew_s)
        self.limit = limit
        self._seen: dict[tuple[str, str, int], _Seen] = {}
        self._seen_lock = threading.Lock()
        self._swept = time.monotonic()

    def check(self, topic: str, partition: int, key: bytes | None, value: bytes,
              headers: Iterable[tuple[str, bytes | None]] | None, now: float, offset: int | None = None,
              ) -> identity.Certificate:
        if offset is None:
            return super().check(topic, partition, key, value, headers, now, offset)
        found: dict[str, bytes] = {}
        for name, raw in headers or ():
            if raw is not None and name in (identity.H_CERT, identity.H_SEQ, identity.H_TS, identity.H_SIG):
                found[name] = raw
        if identity.H_SIG not in found or identity.H_CERT not in found:
            raise identity.Refused(identity.UNSIGNED, "the message is not signed")
        try:
            token, sig = found[identity.H_CERT].decode(), found[identity.H_SIG].decode()
            seq, ts_text = int(found[identity.H_SEQ]), found[identity.H_TS].decode()
            ts = float(ts_text)
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise identity.Refused(identity.BAD_SIGNATURE, "malformed signature headers") from exc
        cert = self.verifier.certificate(token, now)
        identity.verify_signature(cert, sig, identity.message_string(topic, key, value, seq, ts_text))
        if now - ts > self.max_age_s or ts - now > self.max_skew_s:
            raise identity.Refused(identity.STALE, f"the message was signed {now - ts:.0f}s ago by {cert.subject}")
        where = (cert.serial, topic, partition)
        with self._seen_lock:
            self._sweep(now)
            seen = self._seen.setdefault(where, _Seen())
            seen.forget_before(now - self.max_age_s)
            if not seen.accepts(offset, seq):
                raise identity.Refused(identity.REPLAYED, f"sequence {seq} of {cert.subject} at offset {offset} "
                                                          f"was already seen (latest {seen.max_seq})")
            seen.add(offset, seq, ts, self.limit)
        return cert

    def _sweep(self, now: float) -> None:
        """Forget the producers heard from last longer than `max_age_s` ago (every `max_age_s`)."""
        tick = time.monotonic()
        if tick - self._swept < self.max_age_s:
            return
        self._swept = tick
        for where, seen in list(self._seen.items()):
            seen.forget_before(now - self.max_age_s)
            if not seen.seqs:  # whatever it signed before is stale now
                del self._seen[where]
