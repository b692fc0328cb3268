"""Identities of the cluster: a CA, certificates, credentials, and signatures of requests and bus messages.

Glossary:
- **CA**: the cluster's Ed25519 signing key. Its public half (`ca.json`) is given to every service and agent; the
  private half is held by the controller (it issues agents their certificates when they join) and the installer.
- **Certificate**: the CA's signature over who someone is: `subject` (a service name, an agent id, `admin`),
  `role`, the subject's public key, a serial, a validity window and, for an agent, the URL it was bound to when it
  joined. Encoded as `<base64url JSON>.<base64url signature>`; anyone holding the CA's public key can check it.
- **Credential**: a certificate with its private key (a 0600 JSON file). Never sent anywhere.
- **Request signature**: every HTTP call between services is signed by the caller's key over its method, path and
  query, the Host it is sent to (so a receiver cannot replay it against another service), a timestamp, a nonce
  and the SHA-256 of its body. The receiver checks the certificate, the signature, the time window and that the
  nonce is new. No shared secret exists: a receiver learns nothing it could use to call anyone as the caller.
- **Message signature**: every bus message carries its producer's certificate and a signature over topic, key,
  value, a per-producer sequence number and a timestamp. Consumers refuse unsigned, badly signed, replayed
  (sequence not increasing), stale and revoked ones.

Pure apart from the clock, which every checking function takes as an argument.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Roles; a service's subject is its role. Agents have their agent id as subject.
CONTROLLER = "controller"
MODEL_REGISTRY = "model-registry"
SERVICE_REGISTRY = "service-registry"
FRONTEND = "frontend"
AGENT = "agent"
ADMIN = "admin"  # an operator (the `miaas` CLI, bootstrap)
SERVICE_ROLES = (CONTROLLER, MODEL_REGISTRY, SERVICE_REGISTRY, FRONTEND)
ROLES = (*SERVICE_ROLES, AGENT, ADMIN)
JOIN = "join"  # the role of a join token: it can only be exchanged for an agent certificate

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"  # a streamed body (an upload) whose hash the caller cannot know in advance
MAX_SKEW_S = 60.0  # a signed request or message dated further from the receiver's clock is refused
SERVICE_LIFETIME_S = 365 * 24 * 3600
AGENT_LIFETIME_S = 7 * 24 * 3600

# Why a request or a message was refused.
UNSIGNED = "unsigned"
BAD_CERTIFICATE = "bad_certificate"  # not issued by this cluster's CA, malformed, or expired
BAD_SIGNATURE = "bad_signature"
REVOKED = "revoked"
REPLAYED = "replayed"
STALE = "stale"
IMPERSONATION = "impersonation"  # signed by one identity, speaking for another
REFUSAL_REASONS = (UNSIGNED, BAD_CERTIFICATE, BAD_SIGNATURE, REVOKED, REPLAYED, STALE, IMPERSONATION)


class Refused(Exception):
    """A credential, signature or message that is not believed; `reason` is one of REFUSAL_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _raw_public(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


class Certificate(BaseModel):
    """What the CA says of one identity (see the module's glossary)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    role: str
    public_key: str = Field(description="base64url raw Ed25519 public key")
    serial: str = Field(min_length=16, max_length=64)
    not_before: float
    not_after: float
    url: str | None = Field(None, description="an agent's URL, bound when it joined: commands go only there")
    uses: int | None = Field(None, description="join tokens only: how many agents may join with it")


@dataclass(frozen=True)
class Signed:
    """A certificate as sent (`token`) and as read."""

    token: str
    cert: Certificate


def encode_signed(payload: BaseModel, key: Ed25519PrivateKey) -> str:
    body = payload.model_dump_json().encode()
    return f"{b64e(body)}.{b64e(key.sign(body))}"


class CertificateAuthority:
    """The cluster's signing key; issues certificates and join tokens."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.public_key = key.public_key()

    @classmethod
    def generate(cls) -> CertificateAuthority:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> CertificateAuthority:
        data = _read_json(path, "CA key")
        try:
            return cls(Ed25519PrivateKey.from_private_bytes(b64d(str(data["private_key"]))))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path} is not a CA key file (a JSON object with private_key)") from exc

    def save(self, key_path: Path, public_path: Path) -> None:
        write_private_json(key_path, {"private_key": b64e(_raw_private(self.key))})
        write_public_json(public_path, {"ca_public_key": b64e(_raw_public(self.public_key))})

    def issue(
        self, subject: str, role: str, public_key: Ed25519PublicKey, *, now: float, lifetime_s: float,
        url: str | None = None,
    ) -> Signed:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        cert = Certificate(
            subject=subject, role=role, public_key=b64e(_raw_public(public_key)), serial=secrets.token_hex(16),
            not_before=now - 5, not_after=now + lifetime_s, url=url,
        )
        return Signed(encode_signed(cert, self.key), cert)

    def credential(self, subject: str, role: str, *, now: float, lifetime_s: float = SERVICE_LIFETIME_S,
                   url: str | None = None) -> Credential:
        """A new key pair and its certificate."""
        key = Ed25519PrivateKey.generate()
        return Credential(key, self.issue(subject, role, key.public_key(), now=now, lifetime_s=lifetime_s, url=url))

    def join_token(self, *, now: float, ttl_s: float, uses: int) -> Signed:
        """A short-lived token an agent exchanges for its own certificate, at most `uses` times.

        It is a certificate of role `join` whose "public key" is the hash of a secret kept in the token itself:
        `<certificate>~<secret>`, so a leaked list of issued tokens (their serials) lets nobody join."""
        if ttl_s <= 0 or uses < 1:
            raise ValueError("a join token needs a positive lifetime and at least one use")
        secret = secrets.token_urlsafe(24)
        cert = Certificate(
            subject="join", role=JOIN, public_key=b64e(hashlib.sha256(secret.encode()).digest()),
            serial=secrets.token_hex(16), not_before=now - 5, not_after=now + ttl_s, uses=uses,
        )
        return Signed(f"{encode_signed(cert, self.key)}~{secret}", cert)


class Credential:
    """A private key and its certificate."""

    def __init__(self, key: Ed25519PrivateKey, signed: Signed) -> None:
        self.key = key
        self.signed = signed

    @property
    def cert(self) -> Certificate:
        return self.signed.cert

    @property
    def token(self) -> str:
        return self.signed.token

    def sign(self, data: bytes) -> str:
        return b64e(self.key.sign(data))

    def save(self, path: Path) -> None:
        write_private_json(path, {"private_key": b64e(_raw_private(self.key)), "certificate": self.token})

    @classmethod
    def load(cls, path: Path) -> Credential:
        data = _read_json(path, "credential")
        try:
            key = Ed25519PrivateKey.from_private_bytes(b64d(str(data["private_key"])))
            token = str(data["certificate"])
            cert = Certificate.model_validate_json(b64d(token.partition(".")[0]))
        except (KeyError, ValueError, TypeError, ValidationError) as exc:
            raise ValueError(f"{path} is not a credential file (private_key and certificate)") from exc
        if b64d(cert.public_key) != _raw_public(key.public_key()):
            raise ValueError(f"{path}: the certificate is not of this private key")
        return cls(key, Signed(token, cert))


class CredentialFile:
    """A credential read from its file, read again when the file changes: rotation without a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._credential: Credential | None = None
        self._checked = 0.0

    def get(self) -> Credential:
        now = time.monotonic()
        with self._lock:
            if self._credential is None or now - self._checked > 2.0:
                self._checked = now
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    self._credential = Credential.load(self.path)
                    self._stamp = stamp
            assert self._credential is not None
            return self._credential

    def __call__(self) -> Credential:
        return self.get()


CredentialSource = Callable[[], Credential]


def fixed(credential: Credential) -> CredentialSource:
    return lambda: credential


def load_ca_public(path: Path) -> Ed25519PublicKey:
    data = _read_json(path, "CA public key")
    try:
        return Ed25519PublicKey.from_public_bytes(b64d(str(data["ca_public_key"])))
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a CA public key file (a JSON object with ca_public_key)") from exc


class Verifier:
    """Checks certificates against the CA's public key and a revocation list; caches what it has checked."""

    def __init__(self, ca_public_key: Ed25519PublicKey, revoked: Callable[[], frozenset[str]] = frozenset) -> None:
        self.ca_public_key = ca_public_key
        self.revoked = revoked
        self._checked: dict[str, Certificate] = {}
        self._lock = threading.Lock()

    def certificate(self, token: str | None, now: float) -> Certificate:
        """The certificate of `token` if the CA issued it, it is valid now and not revoked; else Refused."""
        if not token:
            raise Refused(UNSIGNED, "no certificate")
        cert = self._checked.get(token)
        if cert is None:
            cert = self._check_signature(token)
            if cert.role == JOIN:
                raise Refused(BAD_CERTIFICATE, "a join token is not a credential")
            with self._lock:
                if len(self._checked) > 10_000:
                    self._checked.clear()
                self._checked[token] = cert
        if not cert.not_before <= now <= cert.not_after:
            raise Refused(BAD_CERTIFICATE, f"the certificate of {cert.subject} is not valid now (expired?)")
        if cert.serial in self.revoked():
            raise Refused(REVOKED, f"the certificate {cert.serial} of {cert.subject} is revoked")
        return cert

    def join_token(self, token: str, now: float) -> Certificate:
        """The join token's certificate when it is genuine and valid now (uses are counted by the caller)."""
        signed, sep, secret = token.partition("~")
        if not sep or not secret:
            raise Refused(BAD_CERTIFICATE, "not a join token")
        cert = self._check_signature(signed)
        if cert.role != JOIN:
            raise Refused(BAD_CERTIFICATE, "not a join token")
        if b64d(cert.public_key) != hashlib.sha256(secret.encode()).digest():
            raise Refused(BAD_SIGNATURE, "the join token's secret does not match")
        if not cert.not_before <= now <= cert.not_after:
            raise Refused(BAD_CERTIFICATE, "the join token has expired")
        if cert.serial in self.revoked():
            raise Refused(REVOKED, "the join token is revoked")
        return cert

    def _check_signature(self, token: str) -> Certificate:
        body_b64, sep, sig_b64 = token.partition(".")
        try:
            body, sig = b64d(body_b64), b64d(sig_b64)
        except (ValueError, TypeError) as exc:
            raise Refused(BAD_CERTIFICATE, "the certificate is not base64url") from exc
        if not sep or len(body) > 4096:
            raise Refused(BAD_CERTIFICATE, "malformed certificate")
        try:
            self.ca_public_key.verify(sig, body)
        except InvalidSignature as exc:
            raise Refused(BAD_CERTIFICATE, "the certificate was not issued by this cluster's CA") from exc
        try:
            return Certificate.model_validate_json(body)
        except ValidationError as exc:
            raise Refused(BAD_CERTIFICATE, "the certificate's content is invalid") from exc


def verify_signature(cert: Certificate, signature: str, data: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(b64d(cert.public_key)).verify(b64d(signature), data)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise Refused(BAD_SIGNATURE, f"the signature is not {cert.subject}'s") from exc


# ---------------------------------------------------------------------------------------------- HTTP requests

CERT_HEADER = "X-MIaaS-Certificate"
SIGNATURE_HEADER = "X-MIaaS-Signature"  # ts=<unix seconds>,nonce=<hex>,body=<sha256 hex|UNSIGNED-PAYLOAD>,sig=<b64>


def request_string(method: str, target: str, host: str, ts: str, nonce: str, body: str,
                   user: str | None = None) -> bytes:
    """The bytes a request signature covers (`user`: the X-MIaaS-User header, the person the portal acts for)."""
    return "\n".join(("miaas-request-v1", method.upper(), target, host.lower(), ts, nonce, body,
                      "" if user is None else f"user:{user}")).encode()


def body_digest(body: bytes | str | None) -> str:
    if body is None:
        return hashlib.sha256(b"").hexdigest()
    if isinstance(body, str):
        body = body.encode()
    return hashlib.sha256(body).hexdigest()


def sign_request(credential: Credential, method: str, target: str, host: str, body_hash: str,
                 now: float, *, user: str | None = None) -> dict[str, str]:
    """The headers that authenticate one request (target: path plus `?query` as sent; `user`: the X-MIaaS-User
    header sent with it, covered too, so nobody on the path can change whom the portal acts for)."""
    ts, nonce = f"{now:.3f}", secrets.token_hex(12)
    sig = credential.sign(request_string(method, target, host, ts, nonce, body_hash, user))
    return {CERT_HEADER: credential.token, SIGNATURE_HEADER: f"ts={ts},nonce={nonce},body={body_hash},sig={sig}"}


@dataclass(frozen=True)
class RequestSignature:
    ts: float
    nonce: str
    body: str
    sig: str


def parse_signature_header(value: str | None) -> RequestSignature:
    if not value:
        raise Refused(UNSIGNED, f"the request is not signed (no {SIGNATURE_HEADER} header)")
    fields = dict(part.partition("=")[::2] for part in value.split(","))
    try:
        return RequestSignature(float(fields["ts"]), fields["nonce"], fields["body"], fields["sig"])
    except (KeyError, ValueError) as exc:
        raise Refused(BAD_SIGNATURE, f"malformed {SIGNATURE_HEADER} header") from exc


class NonceCache:
    """Nonces seen within the time window, so that a signed request cannot be sent twice."""

    def __init__(self, window_s: float = 2 * MAX_SKEW_S, limit: int = 200_000) -> None:
        self.window_s = window_s
        self.limit = limit
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._swept = 0.0

    def first_use(self, nonce: str, now: float) -> bool:
        with self._lock:
            if now - self._swept > self.window_s / 4 or len(self._seen) > self.limit:
                self._seen = {n: t for n, t in self._seen.items() if now - t < self.window_s}
                self._swept = now
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True


def check_request(
    verifier: Verifier, nonces: NonceCache, *, cert_token: str | None, signature: str | None, method: str,
    target: str, host: str, body: Callable[[], bytes] | None, now: float, max_skew_s: float = MAX_SKEW_S,
    user: str | None = None,
) -> Certificate:
    """The caller's certificate when the request is genuinely signed by it, fresh and not replayed; else Refused.

    `body` reads the request body (None: an unsigned streamed body is acceptable here, e.g. a multipart upload)."""
    if not cert_token and not signature:
        raise Refused(UNSIGNED, "no credential: requests must be signed (X-MIaaS-Certificate, X-MIaaS-Signature)")
    cert = verifier.certificate(cert_token, now)
    parsed = parse_signature_header(signature)
    if abs(now - parsed.ts) > max_skew_s:
        raise Refused(STALE, f"the request is dated {now - parsed.ts:.0f}s from this server's clock")
    if parsed.body == UNSIGNED_PAYLOAD:
        if body is not None:
            raise Refused(BAD_SIGNATURE, "only a streamed upload may leave its body unsigned")
    elif body is not None and parsed.body != body_digest(body()):
        raise Refused(BAD_SIGNATURE, "the body is not the one signed")
    verify_signature(cert, parsed.sig, request_string(method, target, host, f"{parsed.ts:.3f}", parsed.nonce,
                                                      parsed.body, user))
    if not nonces.first_use(f"{cert.serial}:{parsed.nonce}", now):
        raise Refused(REPLAYED, "this signed request was already received")
    return cert


# ---------------------------------------------------------------------------------------------- bus messages

H_CERT = "miaas-cert"
H_SEQ = "miaas-seq"
H_TS = "miaas-ts"
H_SIG = "miaas-sig"


def message_string(topic: str, key: bytes | None, value: bytes, seq: int, ts: str) -> bytes:
    head = f"miaas-message-v1\n{topic}\n{seq}\n{ts}\n".encode()
    k = key or b""
    return head + len(k).to_bytes(4, "big") + k + value


class MessageSigner:
    """Signs the messages of one producer: its certificate, a sequence number that only grows, a timestamp.

    The sequence starts from the nanosecond clock at start (or a stored counter, whichever is larger), so a
    restarted producer's messages still come after its earlier ones."""

    def __init__(self, credential: CredentialSource, *, start: int | None = None) -> None:
        self.credential = credential
        self._seq = start if start is not None else time.time_ns()
        self._lock = threading.Lock()

    def headers(self, topic: str, key: bytes | None, value: bytes) -> list[tuple[str, str | bytes | None]]:
        cred = self.credential()
        with self._lock:
            self._seq += 1
            seq = self._seq
        ts = f"{time.time():.3f}"
        sig = cred.sign(message_string(topic, key, value, seq, ts))
        return [(H_CERT, cred.token.encode()), (H_SEQ, str(seq).encode()), (H_TS, ts.encode()),
                (H_SIG, sig.encode())]


class MessageChecker:
    """Checks the signatures of consumed messages: who signed, not replayed (the sequence of a producer on a
    partition only grows), not stale, not revoked. `check` answers the signer's certificate or raises Refused."""

    def __init__(self, verifier: Verifier, *, max_age_s: float = 300.0, max_skew_s: float = MAX_SKEW_S) -> None:
        self.verifier = verifier
        self.max_age_s = max_age_s
        self.max_skew_s = max_skew_s
        self._last: dict[tuple[str, str, int], int] = {}
        # Messages accepted lately, by where they were read: a consumer that hands a batch over again (its handler
        # failed) reads them again, which is no replay. A replay is a copy published again: a new offset.
        self._accepted: OrderedDict[tuple[str, str, int, int | None, int], None] = OrderedDict()
        self.remember = 100_000
        self._lock = threading.Lock()

    def check(self, topic: str, partition: int, key: bytes | None, value: bytes,
              headers: Iterable[tuple[str, bytes | None]] | None, now: float, offset: int | None = None,
              ) -> Certificate:
        """`offset`: where the message was read; the message accepted at that offset read again (a consumer
        handing a batch over once more) is not a replay, the same one at another offset is."""
        found: dict[str, bytes] = {}
        for name, raw in headers or ():
            if raw is not None and name in (H_CERT, H_SEQ, H_TS, H_SIG):
                found[name] = raw
        if H_SIG not in found or H_CERT not in found:
            raise Refused(UNSIGNED, "the message is not signed")
        try:
            token, sig = found[H_CERT].decode(), found[H_SIG].decode()
            seq, ts_text = int(found[H_SEQ]), found[H_TS].decode()
            ts = float(ts_text)
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise Refused(BAD_SIGNATURE, "malformed signature headers") from exc
        cert = self.verifier.certificate(token, now)
        verify_signature(cert, sig, message_string(topic, key, value, seq, ts_text))
        if now - ts > self.max_age_s or ts - now > self.max_skew_s:
            raise Refused(STALE, f"the message was signed {now - ts:.0f}s ago by {cert.subject}")
        where = (cert.serial, topic, partition)
        read_at = (cert.serial, topic, partition, offset, seq)
        with self._lock:
            if offset is not None and read_at in self._accepted:
                return cert  # the very message accepted before, read again at its place in the log
            last = self._last.get(where)
            if last is not None and seq <= last:
                raise Refused(REPLAYED, f"sequence {seq} of {cert.subject} was already seen (last {last})")
            self._last[where] = seq
            if offset is not None:
                self._accepted[read_at] = None
                if len(self._accepted) > self.remember:
                    self._accepted.popitem(last=False)
        return cert


# ---------------------------------------------------------------------------------------------- files


def write_private_json(path: Path, data: dict[str, object]) -> None:
    """Write a secret file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_public_json(path: Path, data: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> dict[str, object]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"{what} file {path} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} file {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path} is not a JSON object")
    return data
