"""The identity primitives: certificates from the cluster CA, signed requests and signed bus messages."""

from __future__ import annotations

import pytest

from miaas.identity import (
    AGENT,
    BAD_CERTIFICATE,
    BAD_SIGNATURE,
    CONTROLLER,
    REPLAYED,
    REVOKED,
    STALE,
    UNSIGNED,
    CertificateAuthority,
    Credential,
    MessageChecker,
    MessageSigner,
    NonceCache,
    Refused,
    Verifier,
    body_digest,
    check_request,
    fixed,
    load_ca_public,
    sign_request,
)

NOW = 1_800_000_000.0


def _check(verifier: Verifier, nonces: NonceCache, headers: dict[str, str], *, host: str = "agent-1:8600",
           body: bytes = b"{}", now: float = NOW) -> str:
    cert = check_request(verifier, nonces, cert_token=headers.get("X-MIaaS-Certificate"),
                         signature=headers.get("X-MIaaS-Signature"), method="POST", target="/create-vm",
                         host=host, body=lambda: body, now=now)
    return cert.subject


def test_a_signed_request_is_believed_once_and_only_where_it_was_sent() -> None:
    ca = CertificateAuthority.generate()
    controller = ca.credential("controller", CONTROLLER, now=NOW)
    verifier, nonces = Verifier(ca.public_key), NonceCache()
    headers = sign_request(controller, "POST", "/create-vm", "agent-1:8600", body_digest(b"{}"), NOW)
    assert _check(verifier, nonces, headers) == "controller"
    with pytest.raises(Refused) as replay:
        _check(verifier, nonces, headers)
    assert replay.value.reason == REPLAYED
    other = sign_request(controller, "POST", "/create-vm", "agent-1:8600", body_digest(b"{}"), NOW)
    with pytest.raises(Refused) as elsewhere:  # an agent replaying the controller's call against another agent
        _check(verifier, NonceCache(), other, host="agent-2:8600")
    assert elsewhere.value.reason == BAD_SIGNATURE
    with pytest.raises(Refused) as tampered:
        _check(verifier, NonceCache(), other, body=b'{"x": 1}')
    assert tampered.value.reason == BAD_SIGNATURE
    with pytest.raises(Refused) as old:
        _check(verifier, NonceCache(), other, now=NOW + 600)
    assert old.value.reason == STALE


def test_certificates_of_another_ca_revoked_or_expired_are_refused() -> None:
    ca, rogue = CertificateAuthority.generate(), CertificateAuthority.generate()
    forged = rogue.credential("controller", CONTROLLER, now=NOW)
    revoked: set[str] = set()
    verifier = Verifier(ca.public_key, lambda: frozenset(revoked))
    with pytest.raises(Refused) as foreign:
        verifier.certificate(forged.token, NOW)
    assert foreign.value.reason == BAD_CERTIFICATE
    agent = ca.credential("agent-1", AGENT, now=NOW, lifetime_s=60, url="http://10.0.0.5:8600")
    assert verifier.certificate(agent.token, NOW).url == "http://10.0.0.5:8600"
    with pytest.raises(Refused) as expired:
        verifier.certificate(agent.token, NOW + 120)
    assert expired.value.reason == BAD_CERTIFICATE
    revoked.add(agent.cert.serial)
    with pytest.raises(Refused) as gone:
        verifier.certificate(agent.token, NOW)
    assert gone.value.reason == REVOKED
    with pytest.raises(Refused) as none:
        verifier.certificate(None, NOW)
    assert none.value.reason == UNSIGNED


def test_a_join_token_is_not_a_credential_and_needs_its_secret() -> None:
    ca = CertificateAuthority.generate()
    verifier = Verifier(ca.public_key)
    token = ca.join_token(now=NOW, ttl_s=600, uses=2)
    assert verifier.join_token(token.token, NOW).uses == 2
    signed, _, _ = token.token.partition("~")
    with pytest.raises(Refused):
        verifier.join_token(signed + "~guessed", NOW)
    with pytest.raises(Refused):
        verifier.certificate(signed, NOW)
    with pytest.raises(Refused):
        verifier.join_token(token.token, NOW + 700)


def test_bus_messages_are_checked_for_signer_replay_and_age(monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CertificateAuthority.generate()
    agent = ca.credential("agent-1", AGENT, now=NOW)
    monkeypatch.setattr("miaas.identity.time.time", lambda: NOW)
    signer, checker = MessageSigner(fixed(agent)), MessageChecker(Verifier(ca.public_key))
    value = b'{"agent_id": "agent-1"}'
    headers = signer.headers("system-metrics", b"agent-1", value)
    assert checker.check("system-metrics", 0, b"agent-1", value, headers, NOW).subject == "agent-1"
    for topic, key, body, hdrs, now, reason in [
        ("system-metrics", b"agent-1", value, headers, NOW, REPLAYED),
        ("system-metrics", b"agent-1", b'{"agent_id": "agent-2"}', signer.headers("system-metrics", b"agent-1",
                                                                                    value), NOW, BAD_SIGNATURE),
        ("system-metrics", b"agent-1", value, [], NOW, UNSIGNED),
        ("system-metrics", b"agent-1", value, signer.headers("system-metrics", b"agent-1", value), NOW + 3600,
         STALE),
    ]:
        with pytest.raises(Refused) as refused:
            checker.check(topic, 0, key, body, hdrs, now)
        assert refused.value.reason == reason


def test_credential_and_ca_files_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ca = CertificateAuthority.generate()
    ca.save(tmp_path / "ca.key", tmp_path / "ca.json")
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    cred = CertificateAuthority.load(tmp_path / "ca.key").credential("model-registry", "model-registry", now=NOW)
    cred.save(tmp_path / "mr.json")
    loaded = Credential.load(tmp_path / "mr.json")
    assert Verifier(load_ca_public(tmp_path / "ca.json")).certificate(loaded.token, NOW).subject == "model-registry"


def test_the_person_the_portal_acts_for_is_covered_by_the_signature() -> None:
    ca = CertificateAuthority.generate()
    portal = ca.credential("frontend", "frontend", now=NOW)
    verifier = Verifier(ca.public_key)
    headers = sign_request(portal, "GET", "/registry/models", "mr:8510", body_digest(b""), NOW, user="alice")

    def check(user: str | None) -> str:
        return check_request(verifier, NonceCache(), cert_token=headers["X-MIaaS-Certificate"],
                             signature=headers["X-MIaaS-Signature"], method="GET", target="/registry/models",
                             host="mr:8510", body=lambda: b"", now=NOW, user=user).subject

    assert check("alice") == "frontend"
    for changed in ("mallory", None):  # someone on the path naming another person, or dropping the header
        with pytest.raises(Refused) as refused:
            check(changed)
        assert refused.value.reason == BAD_SIGNATURE
