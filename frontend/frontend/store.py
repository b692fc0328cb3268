"""The portal's database: its users. The only module that touches the database."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import DateTime, Integer, String, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from werkzeug.security import check_password_hash, generate_password_hash

from miaas.db import make_engine, sqlite_file
from miaas.errors import BadRequest, Conflict

log = logging.getLogger(__name__)
HASH_METHOD = "scrypt"


class Role(enum.StrEnum):
    """What a user may do: admins and developers change things, viewers look."""

    ADMIN = "admin"
    DEVELOPER = "developer"
    VIEWER = "viewer"

    @property
    def can_change(self) -> bool:
        return self in (Role.ADMIN, Role.DEVELOPER)


@dataclass(frozen=True)
class User:
    """A user as the rest of the portal sees one: never with the password hash."""

    id: int
    username: str
    role: Role
    created_at: datetime


class _Base(DeclarativeBase):
    pass


class _UserRow(_Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    def to_user(self) -> User:
        return User(self.id, self.username, Role(self.role), self.created_at)


class UserStore:
    """Users with scrypt password hashes, in any database SQLAlchemy speaks."""

    def __init__(self, database_url: str) -> None:
        db_file = sqlite_file(database_url)
        self.engine = make_engine(database_url)
        _Base.metadata.create_all(self.engine)
        if db_file is not None:  # password hashes are for the portal's eyes only
            db_file.chmod(0o600)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._dummy_hash: str | None = None

    def count(self) -> int:
        with self._session() as s:
            return int(s.scalar(select(func.count()).select_from(_UserRow)) or 0)

    def create_user(self, username: str, password: str, role: Role, now: datetime) -> User:
        """Add a user; 409 when the name is taken."""
        username = username.strip()
        if not username:
            raise BadRequest("a username is required")
        row = _UserRow(
            username=username,
            password_hash=generate_password_hash(password, method=HASH_METHOD),
            role=Role(role).value,
            created_at=now,
        )
        with self._session() as s:
            s.add(row)
            try:
                s.commit()
            except IntegrityError as exc:
                raise Conflict(f"user '{username}' already exists") from exc
            return row.to_user()

    def ensure_admin(self, username: str, password: str, now: datetime) -> User | None:
        """Create the first admin when there is no user at all; never touch existing users."""
        if self.count() > 0:
            return None
        try:
            return self.create_user(username, password, Role.ADMIN, now)
        except Conflict:  # another process created it first
            return None

    def authenticate(self, username: str, password: str) -> User | None:
        """The user whose name and password these are, or None."""
        with self._session() as s:
            row = s.scalar(select(_UserRow).where(_UserRow.username == username.strip()))
        if row is None:
            # Hash anyway, so the answer takes as long for unknown names as for wrong passwords.
            check_password_hash(self._dummy(), password)
            return None
        return row.to_user() if check_password_hash(row.password_hash, password) else None

    def get(self, user_id: int) -> User | None:
        with self._session() as s:
            row = s.get(_UserRow, user_id)
            return row.to_user() if row is not None else None

    def close(self) -> None:
        self.engine.dispose()

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = generate_password_hash("not a password of anyone", method=HASH_METHOD)
        return self._dummy_hash


