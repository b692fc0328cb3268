"""The controller as the cluster's authority for agents: join tokens, the certificates it issues, revocations.

Glossary (see `miaas.identity` for certificates and tokens):
- **Join**: an agent trades a join token for a certificate of its own (`POST /controller/join`, unsigned): role
  `agent`, subject its agent id, its URL bound in (commands go only there), for the public key it sent. The
  private key never leaves the agent.
- **Use of a join token**: each join counts one, in the transaction that issues the certificate; a token allows
  `uses` joins. A token made elsewhere with the CA key (the installer) is counted from its first use here.
- **Live certificate**: issued here, not expired, not revoked. An agent id holding one cannot join again: revoke
  it first (a second agent taking the id would speak for the first).
- **Renewal**: an agent, signing with its current certificate, gets a new one for a new key (same subject, same
  URL). The old one stays valid until it expires (the agent switches over when it reads its new file).
- **Revocation**: a serial (a certificate or a join token) that nobody believes any more. Every service fetches
  the list (`GET /controller/identities/revoked`) every `MIAAS_REVOCATION_INTERVAL_S`; the controller's own
  list is read from this database at that interval and at once after a revoke. A serial whose certificate has
  expired drops off the served list (it is refused anyway), so the list stays short.

Joins, renewals and revocations of one controller run one at a time (a lock), and each is one transaction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flask import g
from sqlalchemy import DateTime, Engine, Integer, String, Text, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from miaas import identity
from miaas.errors import BadRequest, Conflict, Forbidden, NotFound, Unavailable
from miaas.schemas import (
    IdentityList,
    IdentityView,
    IssuedCertificate,
    JoinRequest,
    JoinTokenIssued,
    JoinTokenRequest,
    RenewRequest,
    Revocation,
    RevokedList,
    RevokeRequest,
    RevokeResult,
)
from miaas.web import Api, RevocationList

log = logging.getLogger(__name__)

RESERVED_SUBJECTS = frozenset({*identity.ROLES, identity.JOIN})
"""Agent ids that would read as a service or an operator in logs and lists: never issued to an agent."""


class Base(DeclarativeBase):
    pass


class IssuedRow(Base):
    """A certificate the controller issued (to an agent, on a join or a renewal)."""

    __tablename__ = "issued_certificates"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(String(128), index=True)
    role: Mapped[str] = mapped_column(String(32))
    url: Mapped[str | None] = mapped_column(String(512), nullable=True)
    public_key: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    not_after: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class JoinTokenRow(Base):
    """A join token's uses: how many joins it allows and how many it has made."""

    __tablename__ = "join_tokens"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    uses: Mapped[int] = mapped_column(Integer)
    used: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RevocationRow(Base):
    """A revoked serial; `expires_at` is when what it names expires anyway (None: not known here)."""

    __tablename__ = "revocations"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)

    def to_wire(self) -> Revocation:
        return Revocation(serial=self.serial, subject=self.subject, reason=self.reason or "",
                          revoked_at=_aware(self.revoked_at))


class UsedUp(Forbidden):
    code = "join_token_used_up"


class AlreadyJoined(Conflict):
    code = "agent_already_joined"


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class IdentityStore:
    """The identity tables, in the controller's database (created at start, as `DeploymentStore` does)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        Base.metadata.create_all(engine)
        self._session = sessionmaker(engine, expire_on_commit=False)

    def _insert_ignoring_duplicates(self, s: Session, row: type[Base], values: dict[str, Any]) -> None:
        """INSERT ... ON CONFLICT DO NOTHING on the primary key (`serial`), on SQLite and PostgreSQL."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        s.execute(dialect.insert(row).values(**values).on_conflict_do_nothing(index_elements=["serial"]))

    def add_join_token(self, cert: identity.Certificate) -> None:
        with self._session.begin() as s:
            self._insert_ignoring_duplicates(s, JoinTokenRow, {
                "serial": cert.serial, "uses": cert.uses or 1, "used": 0, "expires_at": _at(cert.not_after)})

    def join(self, token: identity.Certificate, subject: str, issue: Callable[[], identity.Signed],
             now: float) -> identity.Signed:
        """Count one use of `token`, check that `subject` holds no live certificate, and record the one `issue()`
        makes, in one transaction: a refused join uses nothing up."""
        with self._session.begin() as s:
            self._insert_ignoring_duplicates(s, JoinTokenRow, {  # a token made elsewhere: counted from now
                "serial": token.serial, "uses": token.uses or 1, "used": 0, "expires_at": _at(token.not_after)})
            counted = s.execute(update(JoinTokenRow).where(JoinTokenRow.serial == token.serial,
                                                           JoinTokenRow.used < JoinTokenRow.uses)
                                .values(used=JoinTokenRow.used + 1))
            if counted.rowcount != 1:  # type: ignore[attr-defined]
                allowed = s.get(JoinTokenRow, token.serial)
                raise UsedUp(f"join token {token.serial} is used up: it allowed {allowed.uses if allowed else '?'} "
                             "join(s); ask an administrator for a new one (POST /controller/join-tokens)")
            live = self._live(s, subject, now)
            if live:
                raise AlreadyJoined(
                    f"agent id '{subject}' already holds a live certificate ({', '.join(live)}); revoke it first "
                    f"(POST /controller/identities/revoke {{\"subject\": \"{subject}\"}}) or join with another id",
                    details={"serials": live})
            signed = issue()
            s.add(self._row(signed, now))
            return signed

    def renew(self, current: identity.Certificate, issue: Callable[[], identity.Signed],
              now: float) -> identity.Signed:
        """Record the certificate `issue()` makes for the holder of `current`, unless `current` was revoked."""
        with self._session.begin() as s:
            if s.get(RevocationRow, current.serial) is not None:
                raise Forbidden(f"the certificate {current.serial} of {current.subject} is revoked", code="revoked")
            signed = issue()
            s.add(self._row(signed, now))
            return signed

    @staticmethod
    def _row(signed: identity.Signed, now: float) -> IssuedRow:
        c = signed.cert
        return IssuedRow(serial=c.serial, subject=c.subject, role=c.role, url=c.url, public_key=c.public_key,
                         issued_at=_at(now), not_after=_at(c.not_after))

    @staticmethod
    def _live(s: Session, subject: str, now: float) -> list[str]:
        revoked = select(RevocationRow.serial)
        q = select(IssuedRow.serial).where(IssuedRow.subject == subject, IssuedRow.not_after > _at(now),
                                           IssuedRow.serial.not_in(revoked))
        return list(s.scalars(q))

    def revoke(self, serials: Iterable[str] | None, subject: str | None, reason: str,
               now: float) -> list[Revocation]:
        """Revoke each serial (any certificate or join token of this CA), or every certificate issued to `subject`;
        the revocations, those made before included (revoking twice is harmless). 404 when a subject has none."""
        with self._session.begin() as s:
            wanted = list(serials or ())
            if subject is not None:
                wanted += list(s.scalars(select(IssuedRow.serial).where(IssuedRow.subject == subject)))
                if not wanted:
                    raise NotFound(f"no certificate was issued to '{subject}' by this controller; revoke a "
                                   "certificate made elsewhere by its serial")
            out = []
            for serial in dict.fromkeys(wanted):
                issued = s.get(IssuedRow, serial)
                token = s.get(JoinTokenRow, serial) if issued is None else None
                expires = issued.not_after if issued else token.expires_at if token else None
                self._insert_ignoring_duplicates(s, RevocationRow, {
                    "serial": serial, "subject": issued.subject if issued else "join" if token else None,
                    "reason": reason, "revoked_at": _at(now), "expires_at": expires})
                row = s.get(RevocationRow, serial)
                assert row is not None
                out.append(row.to_wire())
            return out

    def revoked_serials(self, now: float) -> list[str]:
        """The revoked serials of whatever has not expired (or whose expiry is not known here)."""
        with self._session() as s:
            q = select(RevocationRow.serial).where(
                (RevocationRow.expires_at.is_(None)) | (RevocationRow.expires_at > _at(now)))
            return list(s.scalars(q))

    def identities(self) -> list[IdentityView]:
        """Every certificate issued here, newest first, with its revocation."""
        with self._session() as s:
            q = (select(IssuedRow, RevocationRow.revoked_at)
                 .join(RevocationRow, RevocationRow.serial == IssuedRow.serial, isouter=True)
                 .order_by(IssuedRow.issued_at.desc()))
            return [
                IdentityView(serial=r.serial, subject=r.subject, role=r.role, url=r.url, issued_at=_aware(r.issued_at),
                             not_after=_aware(r.not_after), revoked_at=_aware(at) if at is not None else None)
                for r, at in s.execute(q)
            ]


def _public_key(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(identity.b64d(text))
    except (ValueError, TypeError) as exc:
        raise BadRequest("public_key is not a base64url raw Ed25519 public key (32 bytes)",
                         code="invalid_public_key") from exc


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"url {url!r} must be the agent's http(s) URL, with a host", code="invalid_url")


class Authority:
    """Issues agents their certificates and revokes identities (see the module's glossary).

    `ca` None: the CA key is not configured here; joins, renewals and new join tokens answer 503."""

    def __init__(self, store: IdentityStore, verifier: identity.Verifier, revocations: RevocationList,
                 ca: identity.CertificateAuthority | None, *, lifetime_s: float = identity.AGENT_LIFETIME_S,
                 now: Callable[[], float] = time.time) -> None:
        self.store = store
        self.verifier = verifier
        self.revocations = revocations
        self.ca = ca
        self.lifetime_s = lifetime_s
        self.now = now
        self._lock = threading.Lock()

    def _authority(self) -> identity.CertificateAuthority:
        if self.ca is None:
            raise Unavailable("this controller holds no CA key (CONTROLLER_CA_KEY_FILE is not set): it cannot issue "
                              "certificates or join tokens", code="no_ca_key")
        return self.ca

    def join(self, req: JoinRequest) -> IssuedCertificate:
        """A certificate for a new agent, for a valid join token with a use left and an id not live already."""
        ca = self._authority()
        now = self.now()
        try:
            token = self.verifier.join_token(req.join_token, now)
        except identity.Refused as exc:
            code = "join_token_revoked" if exc.reason == identity.REVOKED else "join_token_refused"
            raise Forbidden(f"join refused: {exc.message}", code=code, details={"reason": exc.reason}) from exc
        if req.agent_id in RESERVED_SUBJECTS:
            raise BadRequest(f"agent id '{req.agent_id}' is reserved (a role name); choose another",
                             code="reserved_agent_id")
        _check_url(req.url)
        key = _public_key(req.public_key)
        with self._lock:
            signed = self.store.join(
                token, req.agent_id, lambda: ca.issue(req.agent_id, identity.AGENT, key, now=now,
                                                      lifetime_s=self.lifetime_s, url=req.url), now)
        log.info("agent %s joined at %s (certificate %s, join token %s)", req.agent_id, req.url, signed.cert.serial,
                 token.serial)
        return _issued(signed)

    def renew(self, current: identity.Certificate, req: RenewRequest) -> IssuedCertificate:
        """A new certificate for the calling agent's new key: same subject, same URL."""
        ca = self._authority()
        now = self.now()
        key = _public_key(req.public_key)
        with self._lock:
            signed = self.store.renew(current, lambda: ca.issue(current.subject, identity.AGENT, key, now=now,
                                                                lifetime_s=self.lifetime_s, url=current.url), now)
        log.info("agent %s renewed its certificate %s: now %s", current.subject, current.serial, signed.cert.serial)
        return _issued(signed)

    def join_token(self, req: JoinTokenRequest) -> JoinTokenIssued:
        ca = self._authority()
        signed = ca.join_token(now=self.now(), ttl_s=req.ttl_s, uses=req.uses)
        self.store.add_join_token(signed.cert)
        return JoinTokenIssued(join_token=signed.token, serial=signed.cert.serial, uses=req.uses,
                               expires_at=_at(signed.cert.not_after))

    def revoke(self, req: RevokeRequest, by: str) -> RevokeResult:
        """Revoke by serial or by subject; the controller's own checks refuse them at once."""
        if (req.serial is None) == (req.subject is None):
            raise BadRequest("name exactly one of serial (a certificate or a join token) and subject (an agent id)",
                             code="validation_error")
        with self._lock:
            done = self.store.revoke([req.serial] if req.serial else None, req.subject, req.reason, self.now())
        self.refresh()
        log.warning("%s revoked %s: %s", by, ", ".join(f"{r.serial} ({r.subject})" for r in done),
                    req.reason or "no reason given")
        return RevokeResult(revoked=done)

    def revoked(self) -> list[str]:
        return self.store.revoked_serials(self.now())

    def refresh(self) -> None:
        """Read the revocation list from the database now (else it is read every revocation interval)."""
        self.revocations.update(self.revoked())


def _issued(signed: identity.Signed) -> IssuedCertificate:
    c = signed.cert
    return IssuedCertificate(certificate=signed.token, subject=c.subject, role=c.role, serial=c.serial,
                             not_after=_at(c.not_after), url=c.url)


def build_api(authority: Authority) -> Api:
    api = Api("identities", allow=(identity.ADMIN,))

    @api.route("/controller/join", "POST", body=JoinRequest, response=IssuedCertificate, status=201, public=True)
    def join(body: JoinRequest) -> IssuedCertificate:
        """An agent joins: its join token for a certificate of its own (role agent, its id, its URL bound)."""
        return authority.join(body)

    @api.route("/controller/renew", "POST", body=RenewRequest, response=IssuedCertificate, status=201,
               allow=(identity.AGENT,))
    def renew(body: RenewRequest) -> IssuedCertificate:
        """An agent's new certificate for a new key, asked for with its current one."""
        return authority.renew(g.identity, body)

    @api.route("/controller/join-tokens", "POST", body=JoinTokenRequest, response=JoinTokenIssued, status=201)
    def join_tokens(body: JoinTokenRequest) -> JoinTokenIssued:
        """A new join token (shown once) for `uses` agents to join within `ttl_s` seconds."""
        return authority.join_token(body)

    @api.route("/controller/identities/revoke", "POST", body=RevokeRequest, response=RevokeResult)
    def revoke(body: RevokeRequest) -> RevokeResult:
        """Revoke a certificate or a join token by serial, or every certificate of an agent id."""
        return authority.revoke(body, by=f"{g.identity.role} {g.caller}")

    @api.route("/controller/identities", response=IdentityList)
    def identities() -> IdentityList:
        """Every certificate this controller issued, newest first, and whether it is revoked."""
        return IdentityList(identities=authority.store.identities())

    @api.route("/controller/identities/revoked", response=RevokedList, allow=identity.ROLES)
    def revoked() -> RevokedList:
        """Every revoked serial that has not expired: what every service refuses."""
        return RevokedList(serials=authority.revoked())

    return api
