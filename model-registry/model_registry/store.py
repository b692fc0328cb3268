"""The registry's database: models and their versions. The only module that touches it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from miaas.db import make_engine
from miaas.errors import Conflict
from miaas.schemas import PackageMeta


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use an aware UTC datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for the registry's migrations, built in code (no alembic.ini); `url` for the CLI way."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_version: Mapped[int] = mapped_column(
        Integer, server_default="0", doc="highest version number ever given, deleted versions included: never reused"
    )


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_versions_model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(256), doc="relative to the model store root")
    sha256: Mapped[str] = mapped_column(String(64), doc="of the zip as uploaded")
    size_bytes: Mapped[int] = mapped_column(BigInteger, doc="of the zip as uploaded")
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    meta_json: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class StoreOwnerRow(Base):
    """The model store this database owns (one row at most): the same id is in the store's `.miaas-store.json`."""

    __tablename__ = "store_owner"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False, doc="always 1: one row at most")
    store_id: Mapped[str] = mapped_column(String(64))
    root: Mapped[str] = mapped_column(String(1024), doc="where the store was when it was claimed (informative)")
    claimed_at: Mapped[datetime] = mapped_column(UtcDateTime())


class AliasRow(Base):
    __tablename__ = "aliases"

    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_by: Mapped[str | None] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class VersionRecord:
    model_id: str
    name: str
    version: int
    path: str
    sha256: str
    size_bytes: int
    manifest_sha256: str
    meta: PackageMeta
    created_by: str | None
    created_at: datetime


@dataclass(frozen=True)
class StoreOwner:
    store_id: str
    root: str
    claimed_at: datetime


@dataclass(frozen=True)
class AdoptedModel:
    """A model rebuilt from the store: `last_version` counts deleted versions whose records remain."""

    model_id: str
    name: str
    created_at: datetime
    last_version: int


@dataclass(frozen=True)
class ModelVersions:
    """A model with the numbers of its versions, oldest first."""

    model: ModelRecord
    versions: list[int]


class Store:
    """Models and versions in a SQL database; no connection is made until a method needs one."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Bring the database up to the newest schema: `alembic upgrade head`, on this store's own engine."""
        with self.engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ the model store it owns

    def owner(self) -> StoreOwner | None:
        """The model store this database owns; None for a database that never claimed one."""
        with self._sessions() as s:
            row = s.get(StoreOwnerRow, 1)
            return StoreOwner(row.store_id, row.root, row.claimed_at) if row is not None else None

    def claim(self, store_id: str, root: str, at: datetime) -> None:
        """Record that this database owns the store `store_id`; a database that owns one already is a 409."""
        try:
            with self._sessions() as s, s.begin():
                s.add(StoreOwnerRow(id=1, store_id=store_id, root=root, claimed_at=at))
        except IntegrityError as exc:
            raise Conflict("this database owns a model store already") from exc

    def has_records(self) -> bool:
        """Whether the database records any model (with or without versions)."""
        with self._sessions() as s:
            return s.scalars(select(ModelRow.id).limit(1)).first() is not None

    def adopt(self, owner: StoreOwner, models: list[AdoptedModel], versions: list[VersionRecord]) -> None:
        """Rebuild an empty database from a store, in one transaction: its models, its versions (numbers kept),
        and the store it now owns (any earlier claim of an empty database is replaced). A database with models is
        a 409 and is not changed."""
        with self._sessions() as s, s.begin():
            if s.scalars(select(ModelRow.id).limit(1)).first() is not None:
                raise Conflict("the database records models already: adopt a store only into an empty database")
            s.execute(delete(AliasRow))
            s.execute(delete(StoreOwnerRow))
            s.add(StoreOwnerRow(id=1, store_id=owner.store_id, root=owner.root, claimed_at=owner.claimed_at))
            for m in models:
                s.add(ModelRow(id=m.model_id, name=m.name, created_at=m.created_at, last_version=m.last_version))
            s.flush()
            for r in versions:
                s.add(VersionRow(
                    model_id=r.model_id, version=r.version, path=r.path, sha256=r.sha256, size_bytes=r.size_bytes,
                    manifest_sha256=r.manifest_sha256, meta_json=r.meta.model_dump_json(), created_by=r.created_by,
                    created_at=r.created_at,
                ))

    # ------------------------------------------------------------------ models

    def find_model(self, ref: str) -> ModelRecord | None:
        """The model whose id is `ref`, else the one whose name is `ref`."""
        with self._sessions() as s:
            row = s.get(ModelRow, ref) or s.scalars(select(ModelRow).where(ModelRow.name == ref)).first()
            return _model(row) if row is not None else None

    def find_model_by_name(self, name: str) -> ModelRecord | None:
        with self._sessions() as s:
            row = s.scalars(select(ModelRow).where(ModelRow.name == name)).first()
            return _model(row) if row is not None else None

    def models(self) -> list[ModelVersions]:
        """Every model with its version numbers, by name."""
        with self._sessions() as s:
            numbers: dict[str, list[int]] = {}
            for model_id, version in s.execute(
                select(VersionRow.model_id, VersionRow.version).order_by(VersionRow.model_id, VersionRow.version)
            ):
                numbers.setdefault(model_id, []).append(version)
            rows = s.scalars(select(ModelRow).order_by(ModelRow.name)).all()
            return [ModelVersions(_model(r), numbers.get(r.id, [])) for r in rows]

    def models_page(self, q: str = "", offset: int = 0, limit: int | None = None) -> tuple[list[ModelVersions], int]:
        """The models whose name or id contains `q` (any case), by name, from `offset`, at most `limit`; and how
        many match in all. Only the versions of the models on the page are read."""
        needle = q.strip().lower()
        match = (ModelRow.name.contains(needle, autoescape=True) | ModelRow.id.contains(needle, autoescape=True)
                 if needle else None)
        with self._sessions() as s:
            counted = select(func.count()).select_from(ModelRow)
            query = select(ModelRow).order_by(ModelRow.name).offset(offset)
            if match is not None:
                counted, query = counted.where(match), query.where(match)
            if limit is not None:
                query = query.limit(limit)
            total = int(s.scalar(counted) or 0)
            rows = s.scalars(query).all()
            numbers: dict[str, list[int]] = {}
            if rows:
                for model_id, version in s.execute(
                    select(VersionRow.model_id, VersionRow.version)
                    .where(VersionRow.model_id.in_([r.id for r in rows])).order_by(VersionRow.version)
                ):
                    numbers.setdefault(model_id, []).append(version)
            return [ModelVersions(_model(r), numbers.get(r.id, [])) for r in rows], total

    # ------------------------------------------------------------------ versions

    def latest_version(self, model_id: str) -> int:
        """The highest version number a model has now, 0 when it has none."""
        with self._sessions() as s:
            return int(s.scalar(select(func.max(VersionRow.version)).where(VersionRow.model_id == model_id)) or 0)

    def next_version(self, model_id: str) -> int:
        """The number the model's next version gets: one past every version it ever had (deleted ones too)."""
        with self._sessions() as s:
            return int(s.scalar(select(ModelRow.last_version).where(ModelRow.id == model_id)) or 0) + 1

    def get_version(self, model_id: str, version: int | None = None) -> VersionRecord | None:
        """One version of a model; the latest when `version` is None."""
        with self._sessions() as s:
            query = select(VersionRow, ModelRow.name).join(ModelRow).where(VersionRow.model_id == model_id)
            if version is None:
                query = query.order_by(VersionRow.version.desc()).limit(1)
            else:
                query = query.where(VersionRow.version == version)
            found = s.execute(query).first()
            return _version(found[0], found[1]) if found is not None else None

    def versions(self, model_id: str) -> list[VersionRecord]:
        with self._sessions() as s:
            query = (
                select(VersionRow, ModelRow.name).join(ModelRow)
                .where(VersionRow.model_id == model_id).order_by(VersionRow.version)
            )
            return [_version(row, name) for row, name in s.execute(query)]

    def add_version(self, record: VersionRecord, *, new_model: bool) -> VersionRecord:
        """Record a version (and its model, when new) in one transaction; a clash is a 409."""
        row = VersionRow(
            model_id=record.model_id, version=record.version, path=record.path, sha256=record.sha256,
            size_bytes=record.size_bytes, manifest_sha256=record.manifest_sha256,
            meta_json=record.meta.model_dump_json(), created_by=record.created_by, created_at=record.created_at,
        )
        try:
            with self._sessions() as s, s.begin():
                if new_model:
                    s.add(ModelRow(id=record.model_id, name=record.name, created_at=record.created_at,
                                   last_version=record.version))
                    s.flush()
                else:
                    moved = s.execute(
                        update(ModelRow)
                        .where(ModelRow.id == record.model_id, ModelRow.last_version < record.version)
                        .values(last_version=record.version)
                    )
                    if not getattr(moved, "rowcount", 0):
                        raise Conflict(f"version {record.version} of model '{record.name}' was already given; retry")
                s.add(row)
        except IntegrityError as exc:
            raise Conflict(
                f"version {record.version} of model '{record.name}' was created at the same time elsewhere; retry"
            ) from exc
        return record

    def delete_version(self, model_id: str, version: int) -> bool:
        """Forget a version (its aliases must be gone); False when there was none. The model keeps its counter."""
        with self._sessions() as s, s.begin():
            result = s.execute(delete(VersionRow).where(VersionRow.model_id == model_id, VersionRow.version == version))
            return bool(getattr(result, "rowcount", 0))

    def all_versions(self) -> set[tuple[str, int]]:
        """(model id, version) of every version recorded: what the model store may hold."""
        with self._sessions() as s:
            return {(m, v) for m, v in s.execute(select(VersionRow.model_id, VersionRow.version))}

    # ------------------------------------------------------------------ aliases

    def set_alias(self, model_id: str, alias: str, version: int, *, by: str | None, at: datetime) -> int | None:
        """Point `alias` of a model at `version` (created or moved); returns the version it pointed at before."""
        with self._sessions() as s, s.begin():
            row = s.get(AliasRow, (model_id, alias))
            if row is None:
                s.add(AliasRow(model_id=model_id, alias=alias, version=version, updated_by=by, updated_at=at))
                return None
            before = row.version
            row.version, row.updated_by, row.updated_at = version, by, at
            return before

    def get_alias(self, model_id: str, alias: str) -> int | None:
        with self._sessions() as s:
            row = s.get(AliasRow, (model_id, alias))
            return row.version if row is not None else None

    def aliases_of(self, model_id: str, version: int) -> list[str]:
        """The aliases that point at one version."""
        with self._sessions() as s:
            query = select(AliasRow.alias).where(AliasRow.model_id == model_id, AliasRow.version == version)
            return sorted(s.scalars(query))

    def aliases(self, model_id: str) -> dict[str, int]:
        """The aliases of a model by name."""
        with self._sessions() as s:
            query = (
                select(AliasRow.alias, AliasRow.version).where(AliasRow.model_id == model_id).order_by(AliasRow.alias)
            )
            return {alias: version for alias, version in s.execute(query)}

    def delete_alias(self, model_id: str, alias: str) -> bool:
        """Remove an alias; False when there was none."""
        with self._sessions() as s, s.begin():
            result = s.execute(delete(AliasRow).where(AliasRow.model_id == model_id, AliasRow.alias == alias))
            return bool(getattr(result, "rowcount", 0))


def _model(row: ModelRow) -> ModelRecord:
    return ModelRecord(model_id=row.id, name=row.name, created_at=row.created_at)


def _version(row: VersionRow, name: str) -> VersionRecord:
    return VersionRecord(
        model_id=row.model_id, name=name, version=row.version, path=row.path, sha256=row.sha256,
        size_bytes=row.size_bytes, manifest_sha256=row.manifest_sha256,
        meta=PackageMeta.model_validate_json(row.meta_json), created_by=row.created_by, created_at=row.created_at,
    )
