"""The controller's database: deployment records. The only module that touches it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from alembic.config import Config
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    delete,
    event,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, ORMExecuteState, Session, mapped_column, sessionmaker

from controller.lifecycle import Record
from controller.migrations import MIGRATIONS, VERSION_TABLE
from controller.states import can_move
from miaas import migrate
from miaas.db import make_engine
from miaas.errors import Conflict, MiaasError, NotFound
from miaas.schemas import (
    PRIORITIES,
    CandidateExplanation,
    Deployment,
    DeploymentStatus,
    PlacementExplanation,
    Resources,
)

MIGRATION_LOCK = migrate.lock_key("controller")
"""The PostgreSQL advisory lock under which a controller upgrades its database."""


class Base(DeclarativeBase):
    pass


class DeploymentRow(Base):
    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(128), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    agent_id: Mapped[str | None] = mapped_column(String(128), index=True)
    url: Mapped[str | None] = mapped_column(String(512))
    reason: Mapped[str | None] = mapped_column(Text)
    runtime: Mapped[str] = mapped_column(String(32))
    cpus: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[int] = mapped_column(Integer)
    gpus: Mapped[int] = mapped_column(Integer)
    # The placement explanation; rows written before explanations were compact hold a bare list of candidates.
    placement: Mapped[dict[str, object] | list[dict[str, object]]] = mapped_column(JSON, default=list)
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Added with the lifecycle under failure; migration 0001 adds them to databases made before migrations.
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"), index=True)
    generation: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    requeue: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))

    def to_wire(self) -> Deployment:
        explanation = PlacementExplanation.model_validate(self.placement) if isinstance(self.placement, dict) else None
        candidates = explanation.candidates if explanation else [
            CandidateExplanation.model_validate(c) for c in self.placement or []
        ]
        return Deployment(
            deployment_id=self.id,
            model_id=self.model_id,
            model_name=self.model_name,
            version=self.version,
            status=DeploymentStatus(self.status),
            agent_id=self.agent_id,
            url=self.url,
            reason=self.reason,
            runtime=self.runtime,
            placement=candidates,
            placement_explanation=explanation,
            priority=PRIORITIES[self.priority or 0],
            generation=self.generation or 0,
            attempts=self.attempts or 0,
            created_at=_aware(self.created_at),
            updated_at=_aware(self.updated_at),
        )

    def record(self) -> Record:
        """What the lifecycle rules know of this row."""
        return Record(
            deployment_id=self.id, status=DeploymentStatus(self.status), agent_id=self.agent_id,
            created_at=_aware(self.created_at), updated_at=_aware(self.updated_at), generation=self.generation or 0,
            priority=self.priority if self.priority is not None else 1, attempts=self.attempts or 0,
            next_attempt_at=_aware(self.next_attempt_at) if self.next_attempt_at else None,
            requeue=bool(self.requeue), cpus=self.cpus, memory_mb=self.memory_mb, gpus=self.gpus,
            runtime=self.runtime, reason=self.reason,
        )

    @property
    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, memory_mb=self.memory_mb, gpus=self.gpus)


class IdempotencyRow(Base):
    """One `Idempotency-Key` of `POST /controller/deploy`: the deployment it made, for whom, for which request.

    Written in the transaction that adds the deployment, so a key and its deployment exist together or not at all."""

    __tablename__ = "idempotency_keys"

    caller: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    deployment_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


@dataclass(frozen=True)
class Once:
    """An `Idempotency-Key` a request came with: who sent it, the key, a digest of what it asked, how long it holds."""

    caller: str
    key: str
    fingerprint: str
    ttl_s: float


class KeyReused(MiaasError):
    """An Idempotency-Key sent again with another request (draft-ietf-httpapi-idempotency-key-header: 422)."""

    status, code = 422, "idempotency_key_reused"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for the controller's migrations, built in code (no alembic.ini); `url` for the CLI way."""
    return migrate.alembic_config(MIGRATIONS, VERSION_TABLE, url)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


UNSET: Any = object()
"""A field `change` leaves as it is."""


def _mark_written(session: Session, _context: Any) -> None:
    session.info["wrote"] = True


def _mark_written_by_statement(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        state.session.info["wrote"] = True


class DeploymentStore:
    """Deployment records and their state machine."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        try:
            self.create_schema()
        except BaseException:
            self.engine.dispose()  # a controller that cannot start leaves no connection open
            raise
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self.commits = 0
        """Transactions that wrote, counted once committed: a memo of rows is current while this number stands."""
        self._commits_lock = threading.Lock()
        event.listen(self._session, "after_flush", _mark_written)
        event.listen(self._session, "do_orm_execute", _mark_written_by_statement)
        event.listen(self._session, "after_commit", self._count_commit)

    def create_schema(self) -> None:
        """Bring the database to the newest schema (`alembic upgrade head`, on this store's engine), every table of
        the controller's included; one controller at a time on PostgreSQL, and a database made before migrations is
        adopted with its rows (`miaas.migrate`)."""
        migrate.upgrade_to_head(self.engine, alembic_config(), MIGRATION_LOCK)

    def guard_writes(self, guard: Callable[[Session], None]) -> None:
        """Run `guard(session)` in every transaction that writes, before it writes; what it raises undoes the
        transaction (the leader's fence: `controller.leader.Leader.guard`)."""
        event.listen(self._session, "before_flush", lambda session, _context, _instances: guard(session))

    def _count_commit(self, session: Session) -> None:
        if session.info.pop("wrote", False):
            with self._commits_lock:
                self.commits += 1

    def add(self, row: DeploymentRow, once: Once | None = None) -> Deployment:
        """Add a deployment. With `once`, its idempotency key is written in the same transaction; when a request with
        the same key won meanwhile, nothing is added and that request's deployment is returned instead."""
        if once is None:
            with self._session.begin() as s:
                s.add(row)
            return row.to_wire()
        now = row.created_at
        try:
            with self._session.begin() as s:
                s.execute(delete(IdempotencyRow).where(IdempotencyRow.expires_at <= now))  # expired keys go
                s.add(row)
                s.add(IdempotencyRow(caller=once.caller, key=once.key, fingerprint=once.fingerprint,
                                     deployment_id=row.id, created_at=now,
                                     expires_at=now + timedelta(seconds=once.ttl_s)))
        except IntegrityError as exc:
            won = self.replay(once, now)  # a concurrent request with this key won: its deployment, or 422
            if won is None:
                raise Conflict(f"Idempotency-Key {once.key!r} could not be recorded; send the request again") from exc
            return won
        return row.to_wire()

    def replay(self, once: Once, now: datetime) -> Deployment | None:
        """The deployment a request with this key made already; None when the key is new (or expired: forgotten).
        The same key with another request is refused (422): a retry must repeat its request exactly."""
        with self._session.begin() as s:
            found = s.get(IdempotencyRow, (once.caller, once.key))
            if found is None:
                return None
            if _aware(found.expires_at) <= now:
                s.delete(found)
                return None
            if found.fingerprint != once.fingerprint:
                raise KeyReused(
                    f"Idempotency-Key {once.key!r} was used for another request (deployment {found.deployment_id}); "
                    "a retry must send the same body, a new request a new key",
                    details={"deployment_id": found.deployment_id},
                )
            row = s.get(DeploymentRow, found.deployment_id)
            return row.to_wire() if row is not None else None

    def get(self, deployment_id: str) -> Deployment:
        with self._session() as s:
            row = s.get(DeploymentRow, deployment_id)
            if row is None:
                raise NotFound(f"deployment '{deployment_id}' not found")
            return row.to_wire()

    def all(
        self,
        statuses: frozenset[DeploymentStatus] | None = None,
        *,
        model_id: str | None = None,
        version: int | None = None,
    ) -> list[Deployment]:
        """Deployments, newest first, optionally only in some states or of one model (and version)."""
        with self._session() as s:
            q = select(DeploymentRow).order_by(DeploymentRow.created_at.desc())
            if statuses is not None:
                q = q.where(DeploymentRow.status.in_([x.value for x in statuses]))
            if model_id is not None:
                q = q.where(DeploymentRow.model_id == model_id)
            if version is not None:
                q = q.where(DeploymentRow.version == version)
            return [r.to_wire() for r in s.scalars(q)]

    def active_on_agents(self, statuses: frozenset[DeploymentStatus]) -> list[DeploymentRow]:
        """Rows in the given states that hold resources on an agent."""
        with self._session() as s:
            q = select(DeploymentRow).where(
                DeploymentRow.status.in_([x.value for x in statuses]), DeploymentRow.agent_id.is_not(None)
            )
            return list(s.scalars(q))

    def reported_states(self, deployment_ids: Iterable[str]) -> dict[str, tuple[str, str | None, str | None]]:
        """Status, agent and URL of each known deployment among the ids: one query per 500 ids, not one per report."""
        ids = list(deployment_ids)
        found: dict[str, tuple[str, str | None, str | None]] = {}
        with self._session() as s:
            for i in range(0, len(ids), 500):
                q = select(DeploymentRow.id, DeploymentRow.status, DeploymentRow.agent_id, DeploymentRow.url).where(
                    DeploymentRow.id.in_(ids[i:i + 500])
                )
                found.update((r.id, (r.status, r.agent_id, r.url)) for r in s.execute(q))
        return found

    def records(self, statuses: frozenset[DeploymentStatus]) -> list[Record]:
        """The rules' view of every deployment in the given states."""
        with self._session() as s:
            q = select(DeploymentRow).where(DeploymentRow.status.in_([x.value for x in statuses]))
            return [r.record() for r in s.scalars(q)]

    def records_of(self, deployment_ids: Iterable[str]) -> dict[str, Record]:
        """The rules' view of the known deployments among the ids, whatever their state."""
        ids = list(deployment_ids)
        found: dict[str, Record] = {}
        with self._session() as s:
            for i in range(0, len(ids), 500):
                q = select(DeploymentRow).where(DeploymentRow.id.in_(ids[i:i + 500]))
                found.update((r.id, r.record()) for r in s.scalars(q))
        return found

    def decide(
        self, deployment_id: str, now: datetime, decide: Callable[[Record], dict[str, Any] | None]
    ) -> Deployment | None:
        """Change a row in one transaction as `decide(record)` says: a dict of columns (`status` among them), or None.

        A move to another status must be legal. Returns the changed deployment, or None when nothing changed
        (no such row, no decision, an illegal move, or every value already so).
        """
        with self._session.begin() as s:
            row = s.get(DeploymentRow, deployment_id, with_for_update=True)
            if row is None:
                return None
            values = decide(row.record())
            if values is None:
                return None
            values = {k: v for k, v in values.items() if v is not UNSET}
            current = DeploymentStatus(row.status)
            status = values.pop("status", current)
            if status is not current and not can_move(current, status):
                return None
            if status is current and all(getattr(row, k) == v for k, v in values.items()):
                return None
            row.status = status.value
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = now
            return row.to_wire()

    def change(
        self,
        deployment_id: str,
        now: datetime,
        *,
        when: Callable[[Record], bool] = lambda r: True,
        **values: Any,
    ) -> Deployment | None:
        """Set columns (and `status`) of a row if `when(record)` holds; see `decide`."""
        return self.decide(deployment_id, now, lambda r: values if when(r) else None)

    def transition(
        self,
        deployment_id: str,
        target: DeploymentStatus,
        now: datetime,
        *,
        url: str | None = None,
        reason: str | None = None,
        from_agent: str | None = None,
        strict: bool = True,
    ) -> Deployment | None:
        """Move a deployment to `target` if legal; strict refuses an illegal move with 409, else ignores it.

        With `from_agent`, a report from an agent the deployment is not placed on is ignored.
        """
        with self._session.begin() as s:
            row = s.get(DeploymentRow, deployment_id, with_for_update=True)
            if row is None:
                if strict:
                    raise NotFound(f"deployment '{deployment_id}' not found")
                return None
            if from_agent is not None and row.agent_id != from_agent:
                return None
            current = DeploymentStatus(row.status)
            if current == target:
                changed = (url is not None and url != row.url) or (reason is not None and reason != row.reason)
                if not changed:
                    return row.to_wire()
            elif not can_move(current, target):
                if strict:
                    raise Conflict(f"deployment '{deployment_id}' is {current.value}; cannot become {target.value}")
                return None
            row.status = target.value
            if url is not None:
                row.url = url
            if reason is not None:
                row.reason = reason
            row.updated_at = now
            return row.to_wire()


def placement_json(explanation: PlacementExplanation) -> dict[str, object]:
    return explanation.model_dump(mode="json")
