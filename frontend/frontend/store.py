"""The portal's database: its users and invitations. The only module that touches the database."""

from __future__ import annotations

import enum
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import DateTime, Integer, String, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from werkzeug.security import check_password_hash, generate_password_hash

from miaas.db import make_engine, sqlite_file
from miaas.errors import BadRequest, Conflict, NotFound

log = logging.getLogger(__name__)
HASH_METHOD = "scrypt"
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


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
        return User(self.id, self.username, Role(self.role), _aware(self.created_at))


class _InvitationRow(_Base):
    __tablename__ = "invitations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    created_by: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    used_by: Mapped[str | None] = mapped_column(String(64), nullable=True)

    def to_invitation(self) -> Invitation:
        return Invitation(self.id, Role(self.role), self.created_by, _aware(self.created_at),
                          _aware(self.expires_at), self.used_by)


@dataclass(frozen=True)
class Invitation:
    """An invitation to create an account with a role an admin chose; only the hash of its token is stored."""

    id: int
    role: Role
    created_by: str
    created_at: datetime
    expires_at: datetime
    used_by: str | None

    def usable(self, now: datetime) -> bool:
        return self.used_by is None and now < self.expires_at


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
        if not USERNAME_RE.fullmatch(username):
            raise BadRequest("a username is 1 to 64 letters, digits, dots, dashes, underscores or @")
        with self._session() as s:
            try:
                with s.begin():
                    return self._add_user(s, username, password, role, now)
            except IntegrityError as exc:
                raise Conflict(f"user '{username}' already exists") from exc

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

    def users(self) -> list[User]:
        """Every user, by name."""
        with self._session() as s:
            return [r.to_user() for r in s.scalars(select(_UserRow).order_by(_UserRow.username))]

    def set_role(self, user_id: int, role: Role) -> User:
        """Change a user's role; the last admin cannot stop being one (409)."""
        with self._session() as s, s.begin():
            row = s.get(_UserRow, user_id, with_for_update=True)
            if row is None:
                raise NotFound("no such user")
            if row.role == Role.ADMIN and role != Role.ADMIN and self._admins(s) <= 1:
                raise Conflict("the last admin cannot stop being an admin")
            row.role = Role(role).value
            return row.to_user()

    def delete_user(self, user_id: int) -> User:
        """Remove a user; the last admin cannot be removed (409)."""
        with self._session() as s, s.begin():
            row = s.get(_UserRow, user_id, with_for_update=True)
            if row is None:
                raise NotFound("no such user")
            if row.role == Role.ADMIN and self._admins(s) <= 1:
                raise Conflict("the last admin cannot be removed")
            user = row.to_user()
            s.delete(row)
            return user

    def set_password(self, user_id: int, password: str) -> None:
        with self._session() as s, s.begin():
            row = s.get(_UserRow, user_id)
            if row is None:
                raise NotFound("no such user")
            row.password_hash = generate_password_hash(password, method=HASH_METHOD)

    # ------------------------------------------------------------------ invitations

    def create_invitation(self, role: Role, created_by: str, now: datetime, hours: float) -> tuple[str, Invitation]:
        """A new invitation; returns its token (shown once, never stored) and the invitation."""
        token = secrets.token_urlsafe(32)
        row = _InvitationRow(token_sha256=_sha256(token), role=Role(role).value, created_by=created_by,
                             created_at=now, expires_at=now + timedelta(hours=hours))
        with self._session() as s, s.begin():
            s.add(row)
        return token, row.to_invitation()

    def invitation(self, token: str, now: datetime) -> Invitation | None:
        """The usable invitation this token opens, or None."""
        with self._session() as s:
            row = s.scalar(select(_InvitationRow).where(_InvitationRow.token_sha256 == _sha256(token)))
        found = row.to_invitation() if row is not None else None
        return found if found is not None and found.usable(now) else None

    def invitations(self, now: datetime) -> list[Invitation]:
        """Invitations still usable, newest first."""
        with self._session() as s:
            rows = s.scalars(select(_InvitationRow).order_by(_InvitationRow.id.desc())).all()
        return [i for i in (r.to_invitation() for r in rows) if i.usable(now)]

    def revoke_invitation(self, invitation_id: int) -> None:
        with self._session() as s, s.begin():
            s.execute(delete(_InvitationRow).where(_InvitationRow.id == invitation_id))

    def redeem(self, token: str, username: str, password: str, now: datetime) -> User:
        """Create the invited user with the invitation's role, once: the invitation is used up in the same step."""
        with self._session() as s, s.begin():
            row = s.scalar(select(_InvitationRow).where(_InvitationRow.token_sha256 == _sha256(token))
                           .with_for_update())
            if row is None or not row.to_invitation().usable(now):
                raise BadRequest("this invitation is not valid any more; ask an admin for a new one")
            row.used_by = username.strip()[:64]
            role = Role(row.role)
            user = self._add_user(s, username, password, role, now)
        return user

    def close(self) -> None:
        self.engine.dispose()

    def _add_user(self, s: Session, username: str, password: str, role: Role, now: datetime) -> User:
        username = username.strip()
        if not USERNAME_RE.fullmatch(username):
            raise BadRequest("a username is 1 to 64 letters, digits, dots, dashes, underscores or @")
        if s.scalar(select(_UserRow.id).where(_UserRow.username == username)) is not None:
            raise Conflict(f"user '{username}' already exists")
        row = _UserRow(username=username, password_hash=generate_password_hash(password, method=HASH_METHOD),
                       role=Role(role).value, created_at=now)
        s.add(row)
        s.flush()
        return row.to_user()

    @staticmethod
    def _admins(s: Session) -> int:
        return int(s.scalar(select(func.count()).select_from(_UserRow).where(_UserRow.role == Role.ADMIN.value)) or 0)

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = generate_password_hash("not a password of anyone", method=HASH_METHOD)
        return self._dummy_hash


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(value: datetime) -> datetime:
    """SQLite forgets the time zone; every time the portal stores is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
