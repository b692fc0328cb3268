"""The controller's database: deployment records. The only module that touches it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Float, Integer, String, Text, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from controller.states import can_move
from miaas.db import make_engine
from miaas.errors import Conflict, NotFound
from miaas.schemas import CandidateExplanation, Deployment, DeploymentStatus, Resources


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
    placement: Mapped[list[dict[str, object]]] = mapped_column(JSON, default=list)
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    def to_wire(self) -> Deployment:
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
            placement=[CandidateExplanation.model_validate(c) for c in self.placement or []],
            created_at=_aware(self.created_at),
            updated_at=_aware(self.updated_at),
        )

    @property
    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, memory_mb=self.memory_mb, gpus=self.gpus)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class DeploymentStore:
    """Deployment records and their state machine."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def add(self, row: DeploymentRow) -> Deployment:
        with self._session.begin() as s:
            s.add(row)
        return row.to_wire()

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


def placement_json(explanation: tuple[CandidateExplanation, ...]) -> list[dict[str, object]]:
    return [json.loads(c.model_dump_json()) for c in explanation]
