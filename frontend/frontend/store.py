"""The portal's database: its users, their sessions and API tokens, and invitations. The only module that touches
the database. Secrets (session ids, API tokens, invitation tokens) are stored as their sha256 only."""

from __future__ import annotations

import enum
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from alembic.config import Config
from sqlalchemy import DateTime, ForeignKey, Integer, MetaData, String, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from frontend.migrations import MIGRATIONS, VERSION_TABLE
from frontend.passwords import PasswordHasher
from miaas import migrate
from miaas.db import make_engine, sqlite_file
from miaas.errors import BadRequest, Conflict, NotFound

log = logging.getLogger(__name__)
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
TOKEN_PREFIX = "miaas_pat_"  # marks a personal API token (in logs, secret scanners, a pasted header)
TOKEN_SHOWN_CHARS = len(TOKEN_PREFIX) + 6  # what the token list shows of a token, to tell them apart
MAX_TOKENS_PER_USER = 50
TOKEN_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")


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


MIGRATION_LOCK = migrate.lock_key("frontend")
"""The PostgreSQL advisory lock under which a portal upgrades its database."""


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for the portal's migrations, built in code (no alembic.ini); `url` for the CLI way."""
    return migrate.alembic_config(MIGRATIONS, VERSION_TABLE, url)


class _Base(DeclarativeBase):
    pass


def metadata() -> MetaData:
    """The portal's tables, as the migrations make them."""
    return _Base.metadata


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


class _SessionRow(_Base):
    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True, nullable=False)
    idle_timeout_s: Mapped[int] = mapped_column(Integer, nullable=False)

    def to_session(self) -> SessionInfo:
        return SessionInfo(self.id, self.user_id, _aware(self.created_at), _aware(self.last_seen_at),
                           _aware(self.expires_at), self.idle_timeout_s)


@dataclass(frozen=True)
class SessionInfo:
    """One login: ends at `expires_at`, or after `idle_timeout_s` without a request, or when ended (logout, a
    password change, the user's removal)."""

    id: int
    user_id: int
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    idle_timeout_s: int

    def live(self, now: datetime) -> bool:
        return now < self.expires_at and now < self.last_seen_at + timedelta(seconds=self.idle_timeout_s)


class _TokenRow(_Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    prefix: Mapped[str] = mapped_column(String(32), nullable=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True, nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    def to_token(self, username: str) -> ApiToken:
        return ApiToken(self.id, self.user_id, username, self.name, self.prefix, _aware(self.created_at),
                        _aware(self.expires_at) if self.expires_at else None,
                        _aware(self.last_used_at) if self.last_used_at else None)


@dataclass(frozen=True)
class ApiToken:
    """A personal API token as listed: never the token itself (only its sha256 is stored), a prefix to tell it by.
    It acts with its owner's role at the time of each use."""

    id: int
    user_id: int
    username: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None

    def usable(self, now: datetime) -> bool:
        return self.expires_at is None or now < self.expires_at


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

    def __init__(self, database_url: str, hasher: PasswordHasher | None = None) -> None:
        self.hasher = hasher or PasswordHasher()
        db_file = sqlite_file(database_url)
        self.engine = make_engine(database_url)
        try:
            self.create_schema()
        except BaseException:
            self.engine.dispose()  # a portal that cannot start leaves no connection open
            raise
        if db_file is not None:  # password hashes are for the portal's eyes only
            db_file.chmod(0o600)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._dummy_hash: str | None = None

    def create_schema(self) -> None:
        """Bring the database to the newest schema (`alembic upgrade head`, on this store's engine); one portal at a
        time on PostgreSQL, and a database made before migrations is adopted with its rows (`miaas.migrate`)."""
        migrate.upgrade_to_head(self.engine, alembic_config(), MIGRATION_LOCK)

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
        password_hash = self.hasher.hash(password)  # before the transaction: no lock is held while it runs
        with self._session() as s:
            try:
                with s.begin():
                    return self._add_user(s, username, password_hash, role, now)
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
        """The user whose name and password these are, or None. A hash of older parameters is replaced by one of
        the current parameters once the password has verified against it."""
        with self._session() as s:
            row = s.scalar(select(_UserRow).where(_UserRow.username == username.strip()))
        if row is None:
            # Hash anyway, so the answer takes as long for unknown names as for wrong passwords.
            self.hasher.verify(self._dummy(), password)
            return None
        if not self.hasher.verify(row.password_hash, password):
            return None
        if self.hasher.needs_rehash(row.password_hash):
            fresh = self.hasher.hash(password)
            with self._session() as s, s.begin():  # only if nobody changed the password in the meantime
                done = _rowcount(s.execute(update(_UserRow).where(_UserRow.id == row.id,
                                                                  _UserRow.password_hash == row.password_hash)
                                           .values(password_hash=fresh)))
            if done:
                log.info("re-hashed the password of %r with %s", row.username, self.hasher.method)
        return row.to_user()

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
        """Remove a user with their sessions and API tokens; the last admin cannot be removed (409)."""
        with self._session() as s, s.begin():
            row = s.get(_UserRow, user_id, with_for_update=True)
            if row is None:
                raise NotFound("no such user")
            if row.role == Role.ADMIN and self._admins(s) <= 1:
                raise Conflict("the last admin cannot be removed")
            user = row.to_user()
            s.execute(delete(_SessionRow).where(_SessionRow.user_id == user_id))
            s.execute(delete(_TokenRow).where(_TokenRow.user_id == user_id))
            s.delete(row)
            return user

    def set_password(self, user_id: int, password: str, keep_session: str | None = None) -> int:
        """Set a new password and end every session of the user but `keep_session` (the session id of a user
        changing their own password); returns how many sessions ended. API tokens are not touched."""
        fresh = self.hasher.hash(password)
        with self._session() as s, s.begin():
            row = s.get(_UserRow, user_id, with_for_update=True)
            if row is None:
                raise NotFound("no such user")
            row.password_hash = fresh
            return self._end_sessions(s, user_id, keep_session)

    # ------------------------------------------------------------------ sessions

    def start_session(self, user_id: int, now: datetime, lifetime: timedelta, idle: timedelta) -> str:
        """A new session for the user; returns its id (for the cookie, never stored: the table keeps its sha256).
        Sessions that have ended by time are swept out on the way."""
        session_id = secrets.token_urlsafe(32)
        with self._session() as s, s.begin():
            s.execute(delete(_SessionRow).where(_SessionRow.expires_at <= now))
            s.execute(delete(_SessionRow).where(_SessionRow.last_seen_at <= now - idle))
            s.add(_SessionRow(token_sha256=_sha256(session_id), user_id=user_id, created_at=now, last_seen_at=now,
                              expires_at=now + lifetime, idle_timeout_s=max(1, int(idle.total_seconds()))))
        return session_id

    def session(self, session_id: str, now: datetime, touch_every: timedelta) -> tuple[User, SessionInfo] | None:
        """The user of a live session and the session, or None (unknown, ended, expired or idle too long).
        `last_seen_at` is written at most every `touch_every`, not on every request."""
        digest = _sha256(session_id)
        with self._session() as s:
            found = s.execute(select(_SessionRow, _UserRow).join(_UserRow, _UserRow.id == _SessionRow.user_id)
                              .where(_SessionRow.token_sha256 == digest)).first()
        if found is None:
            return None
        row, user_row = found
        info = row.to_session()
        if not info.live(now):
            self.end_session(session_id)
            return None
        if now - info.last_seen_at >= touch_every:
            with self._session() as s, s.begin():
                s.execute(update(_SessionRow).where(_SessionRow.id == info.id).values(last_seen_at=now))
        return user_row.to_user(), info

    def end_session(self, session_id: str) -> None:
        with self._session() as s, s.begin():
            s.execute(delete(_SessionRow).where(_SessionRow.token_sha256 == _sha256(session_id)))

    def end_sessions(self, user_id: int, keep_session: str | None = None) -> int:
        """End every session of a user, but `keep_session`; returns how many ended."""
        with self._session() as s, s.begin():
            return self._end_sessions(s, user_id, keep_session)

    def sessions_of(self, user_id: int, now: datetime) -> list[SessionInfo]:
        """A user's live sessions, newest first."""
        with self._session() as s:
            rows = s.scalars(select(_SessionRow).where(_SessionRow.user_id == user_id)
                             .order_by(_SessionRow.id.desc())).all()
        return [i for i in (r.to_session() for r in rows) if i.live(now)]

    @staticmethod
    def _end_sessions(s: Session, user_id: int, keep_session: str | None) -> int:
        query = delete(_SessionRow).where(_SessionRow.user_id == user_id)
        if keep_session is not None:
            query = query.where(_SessionRow.token_sha256 != _sha256(keep_session))
        return _rowcount(s.execute(query))

    # ------------------------------------------------------------------ personal API tokens

    def create_token(self, user_id: int, name: str, now: datetime, expires_at: datetime | None
                     ) -> tuple[str, ApiToken]:
        """A new API token of a user; returns the token (shown once, never stored) and what is listed of it."""
        name = name.strip()
        if not TOKEN_NAME_RE.fullmatch(name):
            raise BadRequest("a token needs a name of 1 to 64 characters")
        if expires_at is not None and expires_at <= now:
            raise BadRequest("a token's expiry must be in the future")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._session() as s, s.begin():
            owner = s.get(_UserRow, user_id, with_for_update=True)
            if owner is None:
                raise NotFound("no such user")
            count = s.scalar(select(func.count()).select_from(_TokenRow).where(_TokenRow.user_id == user_id)) or 0
            if count >= MAX_TOKENS_PER_USER:
                raise Conflict(f"at most {MAX_TOKENS_PER_USER} tokens per person; revoke one first")
            row = _TokenRow(token_sha256=_sha256(token), prefix=token[:TOKEN_SHOWN_CHARS], user_id=user_id,
                            name=name, created_at=now, expires_at=expires_at)
            s.add(row)
            s.flush()
            return token, row.to_token(owner.username)

    def token_user(self, token: str, now: datetime, touch_every: timedelta) -> tuple[User, ApiToken] | None:
        """The owner (with their current role) of a usable token and the token, or None: unknown, revoked,
        expired, or its owner removed. `last_used_at` is written at most every `touch_every`."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        with self._session() as s:
            found = s.execute(select(_TokenRow, _UserRow).join(_UserRow, _UserRow.id == _TokenRow.user_id)
                              .where(_TokenRow.token_sha256 == _sha256(token))).first()
        if found is None:
            return None
        row, user_row = found
        listed = row.to_token(user_row.username)
        if not listed.usable(now):
            return None
        if listed.last_used_at is None or now - listed.last_used_at >= touch_every:
            with self._session() as s, s.begin():
                s.execute(update(_TokenRow).where(_TokenRow.id == row.id).values(last_used_at=now))
        return user_row.to_user(), listed

    def tokens(self, user_id: int | None = None) -> list[ApiToken]:
        """The tokens of one user (or of everyone), newest first."""
        query = select(_TokenRow, _UserRow.username).join(_UserRow, _UserRow.id == _TokenRow.user_id)
        if user_id is not None:
            query = query.where(_TokenRow.user_id == user_id)
        with self._session() as s:
            rows = s.execute(query.order_by(_TokenRow.id.desc())).all()
        return [row.to_token(name) for row, name in rows]

    def revoke_token(self, token_id: int, owner_id: int | None) -> ApiToken:
        """Revoke a token of `owner_id` (None: of anyone, for an admin); 404 when there is no such token."""
        with self._session() as s, s.begin():
            found = s.execute(select(_TokenRow, _UserRow.username).join(_UserRow, _UserRow.id == _TokenRow.user_id)
                              .where(_TokenRow.id == token_id)).first()
            if found is None or (owner_id is not None and found[0].user_id != owner_id):
                raise NotFound("no such token")
            row, name = found
            s.delete(row)
            return row.to_token(name)

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
        if not USERNAME_RE.fullmatch(username.strip()):
            raise BadRequest("a username is 1 to 64 letters, digits, dots, dashes, underscores or @")
        password_hash = self.hasher.hash(password)  # before the transaction: no lock is held while it runs
        with self._session() as s, s.begin():
            row = s.scalar(select(_InvitationRow).where(_InvitationRow.token_sha256 == _sha256(token))
                           .with_for_update())
            if row is None or not row.to_invitation().usable(now):
                raise BadRequest("this invitation is not valid any more; ask an admin for a new one")
            row.used_by = username.strip()[:64]
            role = Role(row.role)
            user = self._add_user(s, username, password_hash, role, now)
        return user

    def close(self) -> None:
        self.engine.dispose()

    def _add_user(self, s: Session, username: str, password_hash: str, role: Role, now: datetime) -> User:
        username = username.strip()
        if not USERNAME_RE.fullmatch(username):
            raise BadRequest("a username is 1 to 64 letters, digits, dots, dashes, underscores or @")
        if s.scalar(select(_UserRow.id).where(_UserRow.username == username)) is not None:
            raise Conflict(f"user '{username}' already exists")
        row = _UserRow(username=username, password_hash=password_hash, role=Role(role).value, created_at=now)
        s.add(row)
        s.flush()
        return row.to_user()

    @staticmethod
    def _admins(s: Session) -> int:
        return int(s.scalar(select(func.count()).select_from(_UserRow).where(_UserRow.role == Role.ADMIN.value)) or 0)

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self.hasher.hash("not a password of anyone")
        return self._dummy_hash


def _rowcount(result: object) -> int:
    """Rows an UPDATE or DELETE touched (its result is a CursorResult, which the types do not say)."""
    return int(getattr(result, "rowcount", 0) or 0)


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(value: datetime) -> datetime:
    """SQLite forgets the time zone; every time the portal stores is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
