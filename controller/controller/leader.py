"""Which of the controllers on one database leads: a lease row with a fencing number.

Several controllers may share one database (two hosts, one PostgreSQL); exactly one leads: it reconciles, places
and commands agents. The others stand by: they consume the bus (their view of the agents stays warm) and serve
reads, and one of them takes the lease once it has expired.

Glossary:
- **lease**: the row of `leader_lease` named `controller`: the holder's id and URL, the epoch and `expires_at`.
  Its times are the database's (`now()` on PostgreSQL; SQLite, a single host, uses that host's clock), so the hosts'
  clocks do not matter.
- **epoch**: the fencing number. Taking an expired lease adds one; renewing leaves it. Every command a leader sends
  an agent carries it in the signed body as `fence` (agents refuse a lower one: `stale_leader`), and every write of
  the deployment store checks it in the write's own transaction (`guard`), so a deposed leader's late plan fails.
- **deadline**: this instance's own (monotonic) time until which it may act: when it sent its latest successful
  claim, plus what was left of the lease by the database's clock then, less a margin. Past it, the instance stops
  acting at once, before the lease itself ends; only then can another take it.
- **demand mode**: an instance whose renewal thread is not started (embedded use, tests) claims the lease when it
  is about to act and the claim is due, instead of on a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import Column, DateTime, Engine, Integer, MetaData, String, Table, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from miaas.discovery import Registration
from miaas.errors import MiaasError
from miaas.schemas import Wire

log = logging.getLogger(__name__)

LEASE_NAME = "controller"
NEVER = datetime(1970, 1, 1, tzinfo=UTC)
Role = Literal["leader", "standby"]

metadata = MetaData()
lease_table = Table(
    "leader_lease", metadata,
    Column("name", String(64), primary_key=True),
    Column("holder_id", String(128), nullable=True),
    Column("holder_url", String(512), nullable=True),
    Column("epoch", Integer, nullable=False, default=0),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)
"""The lease table, as the controller's migration 0001 (`migrations/versions/0001_initial.py`) makes it."""


class NotLeader(MiaasError):
    """This controller does not lead: a write or a command it was asked for belongs to the leader (503, Retry-After
    in `details`)."""

    status, code = 503, "not_leader"


class Deposed(NotLeader):
    """This controller led, and another took the lease since (an agent saw a higher fence, or the lease row holds
    another epoch): what it was about to do is a stale plan and is not done."""

    code = "stale_leader"


@dataclass(frozen=True)
class Lease:
    """The lease as the database holds it; `expires_in_s` by the database's clock (negative: expired)."""

    holder_id: str | None
    holder_url: str | None
    epoch: int
    expires_in_s: float


class LeaderStatus(Wire):
    """`GET /controller/leader`: who holds the lease, and what this instance is."""

    controller_id: str
    role: Role
    holder_id: str | None
    holder_url: str | None
    epoch: int
    expires_in_s: float


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class LeaseStore:
    """The lease row: claimed (taken when expired, renewed while held) in one transaction, compare-and-set."""

    def __init__(self, engine: Engine, name: str = LEASE_NAME) -> None:
        self.engine = engine  # a database the controller's migrations made (`DeploymentStore` runs them)
        self.name = name

    def _now(self, conn: Connection) -> datetime:
        """The database's clock (PostgreSQL); SQLite serves one host, whose clock it is."""
        if conn.dialect.name == "postgresql":
            return _aware(conn.execute(select(func.now())).scalar_one())
        return datetime.now(UTC)

    def _ensure_row(self, conn: Connection) -> None:
        values = {"name": self.name, "holder_id": None, "holder_url": None, "epoch": 0, "expires_at": NEVER}
        if conn.dialect.name == "postgresql":
            conn.execute(postgresql.insert(lease_table).values(**values).on_conflict_do_nothing())
        elif conn.dialect.name == "sqlite":
            conn.execute(sqlite.insert(lease_table).values(**values).on_conflict_do_nothing())
        elif conn.execute(select(lease_table.c.name).where(lease_table.c.name == self.name)).first() is None:
            conn.execute(lease_table.insert().values(**values))

    def _read(self, conn: Connection, now: datetime) -> Lease:
        row = conn.execute(select(lease_table).where(lease_table.c.name == self.name)).one()
        return Lease(row.holder_id, row.holder_url, int(row.epoch),
                     (_aware(row.expires_at) - now).total_seconds())

    def claim(self, holder_id: str, holder_url: str | None, held: int | None, ttl_s: float) -> tuple[bool, Lease]:
        """Renew the lease if `holder_id` holds it at epoch `held` and it has not expired, else take it if it has
        expired (epoch + 1); whether this holder has it now, and the lease as it is after."""
        with self.engine.begin() as conn:
            self._ensure_row(conn)
            now = self._now(conn)
            expires = now + timedelta(seconds=ttl_s)
            t = lease_table
            won = False
            if held is not None:
                renewed = conn.execute(
                    update(t).where(t.c.name == self.name, t.c.holder_id == holder_id, t.c.epoch == held,
                                    t.c.expires_at > now).values(expires_at=expires, holder_url=holder_url))
                won = renewed.rowcount == 1
            if not won:
                # Two claimants: the second UPDATE waits for the first and, finding the row unexpired, changes none.
                taken = conn.execute(
                    update(t).where(t.c.name == self.name, t.c.expires_at <= now).values(
                        holder_id=holder_id, holder_url=holder_url, epoch=t.c.epoch + 1, expires_at=expires))
                won = taken.rowcount == 1
            return won, self._read(conn, now)

    def release(self, holder_id: str, epoch: int) -> bool:
        """End the lease now if this holder still holds it at `epoch` (a clean stop: the standby need not wait)."""
        with self.engine.begin() as conn:
            now = self._now(conn)
            t = lease_table
            done = conn.execute(update(t).where(t.c.name == self.name, t.c.holder_id == holder_id,
                                                t.c.epoch == epoch).values(expires_at=now))
            return done.rowcount == 1

    def read(self) -> Lease:
        """The lease as it is (epoch 0 and no holder before anyone claimed it)."""
        with self.engine.begin() as conn:
            now = self._now(conn)
            row = conn.execute(select(lease_table).where(lease_table.c.name == self.name)).first()
            if row is None:
                return Lease(None, None, 0, (NEVER - now).total_seconds())
            return self._read(conn, now)

    def holds(self, session: Session, holder_id: str, epoch: int) -> Lease | None:
        """In the caller's transaction: None when `holder_id` holds the lease at `epoch`, else the lease as it is.

        On PostgreSQL the row is read FOR SHARE: a claim by another waits until the caller's transaction ends, so
        no write of a deposed leader can commit after its successor took the lease. SQLite knows no row locks: the
        row is written unchanged instead, which takes the database's write lock for the rest of the transaction."""
        t = lease_table
        if session.get_bind().dialect.name == "sqlite":
            session.execute(update(t).where(t.c.name == self.name, t.c.holder_id == holder_id, t.c.epoch == epoch)
                            .values(epoch=t.c.epoch))
        row = session.execute(select(t).where(t.c.name == self.name).with_for_update(read=True)).first()
        if row is not None and (row.holder_id, int(row.epoch)) == (holder_id, epoch):
            return None
        return Lease(row.holder_id if row is not None else None, row.holder_url if row is not None else None,
                     int(row.epoch) if row is not None else 0, 0.0)


@dataclass(frozen=True)
class Term:
    """This instance's leadership: the epoch it leads with, and the monotonic time it must stop acting by."""

    epoch: int
    deadline: float


def deadline_of(sent_at: float, expires_in_s: float, margin_s: float) -> float:
    """Until when a claim sent at `sent_at` (monotonic) lets its holder act: what the database said was left of the
    lease, counted from before the claim was sent (so never later than the lease's true end), less the margin."""
    return sent_at + expires_in_s - margin_s


class Leader:
    """This controller's side of the lease: claims it every `ttl_s / 3` (on its thread once started, else on
    demand), says whether this instance may act now (`leading`), the fence its commands carry, and guards the
    deployment store's writes (`guard`). Listeners of `on_change` hear each change of role."""

    def __init__(self, lease: LeaseStore, controller_id: str, *, url: str | None, ttl_s: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the leader lease must last more than 0 s, not {ttl_s}")
        self.lease = lease
        self.controller_id = controller_id
        self.url = url
        self.ttl_s = ttl_s
        self.renew_every_s = ttl_s / 3
        self.margin_s = max(ttl_s / 6, 0.2)  # time to stop acting, and the clocks' rates drifting apart
        self.monotonic = monotonic
        self.listeners: list[Callable[[Role], None]] = []
        self.last: Lease | None = None
        """The lease as the latest claim saw it."""
        self.last_error: str | None = None
        self._term: Term | None = None
        self._claimed_at: float | None = None  # monotonic time of the latest claim attempt
        self._role: Role = "standby"
        self._lock = threading.Lock()
        self._claiming = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the loop

    def start(self) -> Leader:
        """Claim now, then keep claiming on a thread (renewing while leading, taking the lease once it expired)."""
        self._stopping.clear()
        self.claim()
        self._thread = threading.Thread(target=self._run, name="leader-lease", daemon=True)
        self._thread.start()
        return self

    def stop(self, release: bool = True) -> None:
        """Stop acting and claiming; with `release`, end a held lease now, so a standby takes over at once."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            term, self._term = self._term, None
        if release and term is not None:
            try:
                self.lease.release(self.controller_id, term.epoch)
            except Exception:  # noqa: BLE001 - an unreleased lease simply expires
                log.warning("could not release the leader lease (epoch %d); it expires by itself", term.epoch,
                            exc_info=True)
        self._settle()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._stopping.wait(self._next_wait())
            if self._stopping.is_set():
                break
            self._settle()  # a term that ran out is told before a claim that may hang on the database
            self.claim()

    def _next_wait(self) -> float:
        """Until the next claim: a third of the lease; sooner after a failed claim, or when the holder's lease ends
        sooner (a standby takes it the moment it expires); never past this instance's own deadline."""
        wait = self.renew_every_s if self.last_error is None else min(self.renew_every_s, 0.5)
        with self._lock:
            term, last = self._term, self.last
        if term is None and last is not None and last.expires_in_s >= 0:
            wait = min(wait, last.expires_in_s + 0.05)
        if term is not None:
            wait = min(wait, max(term.deadline - self.monotonic(), 0.0) + 0.01)
        return max(wait, 0.01)

    # ------------------------------------------------------------------ claims

    def claim(self) -> bool:
        """One claim now (another one in progress is waited for, not doubled); whether this instance leads after.
        A database that cannot be reached leaves the term as it was: it ends at its deadline."""
        with self._claiming:
            sent_at = self.monotonic()
            with self._lock:
                held = self._term.epoch if self._term is not None else None
            self._claimed_at = sent_at
            try:
                won, lease = self.lease.claim(self.controller_id, self.url, held, self.ttl_s)
            except Exception as exc:  # noqa: BLE001 - the database may be away: the term runs out by itself
                self.last_error = f"{exc.__class__.__name__}: {exc}"
                log.warning("leader lease: claim failed (%s)", self.last_error)
                self._settle()
                return self.leading_now()
            self.last_error = None
            with self._lock:
                self.last = lease
                if won:
                    self._term = Term(lease.epoch, deadline_of(sent_at, lease.expires_in_s, self.margin_s))
                else:
                    self._term = None
        self._settle()
        return self.leading_now()

    def _claim_if_due(self, wait: bool = True) -> None:
        """Demand mode: claim when a third of the lease has passed since the last claim (the thread does it when
        started). A claim in progress on another thread is waited for (its outcome is what the caller asks about);
        with `wait=False` (inside a transaction, which may hold the database's write lock) it is not."""
        if self._thread is not None or self._stopping.is_set():
            return
        if not self._claiming.acquire(blocking=wait):
            return
        try:
            last = self._claimed_at
        finally:
            self._claiming.release()
        # A leader renews every third of the lease; a standby asks at most twice a second.
        if last is None or self.monotonic() - last >= (
                self.renew_every_s if self.leading_now() else min(self.renew_every_s, 0.5)):
            self.claim()

    def depose(self, why: str) -> None:
        """Stop acting at once: another leads (an agent saw a higher fence, the lease row holds another epoch)."""
        with self._lock:
            term, self._term = self._term, None
        if term is not None:
            log.warning("leader lease: deposed at epoch %d: %s", term.epoch, why)
        self._settle()

    # ------------------------------------------------------------------ what callers ask

    def leading_now(self) -> bool:
        """Whether this instance may act now (no claim made)."""
        with self._lock:
            term = self._term
        return term is not None and self.monotonic() < term.deadline

    def leading(self) -> bool:
        """Whether this instance may act now; in demand mode it claims first when due."""
        self._claim_if_due()
        return self.leading_now()

    def role(self) -> Role:
        return "leader" if self.leading_now() else "standby"

    def epoch(self) -> int | None:
        """The epoch this instance leads with, while it may act."""
        with self._lock:
            term = self._term
        return term.epoch if term is not None and self.monotonic() < term.deadline else None

    def fence(self) -> int:
        """The fence a command carries now: this instance's epoch; NotLeader when it may not act."""
        if not self.leading():
            raise self.not_leader("commands agents")
        epoch = self.epoch()
        if epoch is None:
            raise self.not_leader("commands agents")
        return epoch

    def require(self, what: str) -> None:
        """Raise NotLeader (naming the leader) unless this instance may act now."""
        if not self.leading():
            raise self.not_leader(what)

    def not_leader(self, what: str) -> NotLeader:
        """The refusal of an action only the leader takes, naming the leader and when to try again."""
        lease = self.last
        try:
            lease = self.lease.read()
        except Exception:  # noqa: BLE001 - the refusal still names what was last known
            log.debug("leader lease: could not read the lease", exc_info=True)
        retry = max(1, round(min(self.ttl_s, max(lease.expires_in_s, 0.0) if lease is not None else self.ttl_s)))
        if lease is not None and lease.holder_id and lease.expires_in_s > 0:
            message = (f"controller {self.controller_id} is a standby; controller {lease.holder_id} at "
                       f"{lease.holder_url} leads (epoch {lease.epoch}) and {what}: send it there")
        else:
            message = (f"controller {self.controller_id} is a standby and no controller leads right now (the lease "
                       f"is free or expiring); {what} once one has taken it: retry in {retry} s")
        return NotLeader(message, details={
            "leader_id": lease.holder_id if lease is not None else None,
            "leader_url": lease.holder_url if lease is not None else None,
            "epoch": lease.epoch if lease is not None else None,
            "retry_after_s": retry,
        })

    def guard(self, session: Session) -> None:
        """Checked in every transaction that writes the deployment store, before it writes: this instance leads
        and the lease row still holds its epoch (read FOR SHARE), else the write fails (NotLeader, Deposed). In
        demand mode it claims first when due (on its own connection: the caller's transaction has not written)."""
        self._claim_if_due(wait=False)
        epoch = self.epoch()
        if epoch is None:
            raise self.not_leader("writes the deployments")
        other = self.lease.holds(session, self.controller_id, epoch)
        if other is not None:
            self.depose(f"the lease is at epoch {other.epoch}, held by {other.holder_id}")
            raise Deposed(f"controller {self.controller_id} was deposed (it led at epoch {epoch}; the lease is at "
                          f"epoch {other.epoch}, held by {other.holder_id}): its write is a stale plan and is not "
                          "made", details={"leader_id": other.holder_id, "leader_url": other.holder_url,
                                           "epoch": other.epoch, "retry_after_s": 1})

    def status(self) -> LeaderStatus:
        lease = self.lease.read()
        return LeaderStatus(controller_id=self.controller_id, role=self.role(), holder_id=lease.holder_id,
                            holder_url=lease.holder_url, epoch=lease.epoch,
                            expires_in_s=round(max(lease.expires_in_s, 0.0), 3))

    def _settle(self) -> None:
        """Tell the listeners when the role changed (a term begun, renewed into, ended or run out)."""
        role = self.role()
        with self._lock:
            changed, self._role = role != self._role, role
            epoch = self._term.epoch if self._term is not None else None
        if not changed:
            return
        if role == "leader":
            log.info("leader lease: controller %s leads (epoch %s)", self.controller_id, epoch)
        else:
            log.warning("leader lease: controller %s stands by", self.controller_id)
        for listener in list(self.listeners):
            try:
                listener(role)
            except Exception:  # noqa: BLE001 - a listener's failure must not stop the lease
                log.exception("leader lease: a listener of the role change failed")


class RegisterWhileLeading:
    """Registers this controller as `controller` with the service registry only while it leads, so that whoever
    finds the controller there (the portal, agents) reaches the leader: registered when a term begins,
    deregistered when it ends. A leader that dies unannounced stays listed until the registry's TTL expires."""

    def __init__(self, make: Callable[[], Registration]) -> None:
        self.make = make
        self.registration: Registration | None = None
        self._lock = threading.Lock()

    def on_role(self, role: Role) -> None:
        with self._lock:
            if role == "leader" and self.registration is None:
                self.registration = self.make()
                self.registration.start()
            elif role == "standby" and self.registration is not None:
                registration, self.registration = self.registration, None
                registration.stop()

    def stop(self) -> None:
        self.on_role("standby")
