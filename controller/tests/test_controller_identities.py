"""The controller as the authority for agents, over real HTTP: an agent joins with a join token and gets a
certificate of its own; bad, expired, used-up and revoked tokens and an id already joined are refused, each with
a clear error; renewals need the agent's current, unrevoked certificate; only operators make join tokens and
revoke; every role reads the revoked list, and a revoked identity is refused by the controller at once and by a
second controller on the same database within the revocation interval."""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Flask
from pydantic import ValidationError

from controller.app import create_app
from controller.identities import AlreadyJoined, IdentityStore, UsedUp
from controller.settings import ControllerSettings
from controller.store import DeploymentStore
from miaas import identity, join
from miaas.errors import UpstreamError
from miaas.identity import ADMIN, AGENT, CONTROLLER, FRONTEND, MODEL_REGISTRY, SERVICE_REGISTRY
from miaas.serve import Server
from miaas.testing import Pki, postgres_schema, wait_for

AGENT_URL = "http://127.0.0.1:7001"


def public_key() -> str:
    return identity.b64e(identity._raw_public(Ed25519PrivateKey.generate().public_key()))


def settings_for(pki: Pki, tmp_path: Path, **kw: Any) -> ControllerSettings:
    values: dict[str, Any] = {"database_url": f"sqlite:///{tmp_path / 'c.db'}", "ca_key_file": pki.ca_key_file,
                              **kw}
    return ControllerSettings(**pki.settings(CONTROLLER), **values)


@pytest.fixture
def app(pki: Pki, tmp_path: Path) -> Flask:
    return create_app(settings_for(pki, tmp_path), locate=lambda name: "http://127.0.0.1:9")


@pytest.fixture
def url(app: Flask, serve: Callable[[Flask], Server]) -> str:
    return serve(app).url


@pytest.fixture
def admin(app: Flask, pki: Pki) -> Any:
    return pki.client(app, ADMIN)


def join_body(token: str, agent_id: str = "agent-1", **kw: str) -> dict[str, str]:
    return {"join_token": token, "agent_id": agent_id, "url": AGENT_URL, "public_key": public_key(), **kw}


def error(resp: requests.Response) -> dict[str, Any]:
    found: dict[str, Any] = resp.json()["error"]
    return found


def new_token(admin: Any, uses: int = 1, ttl_s: float = 600) -> dict[str, Any]:
    resp = admin.post("/controller/join-tokens", json={"uses": uses, "ttl_s": ttl_s})
    assert resp.status_code == 201, resp.json
    found: dict[str, Any] = resp.json
    return found


def test_an_agent_joins_with_a_join_token_and_gets_a_certificate_of_its_own(
        url: str, admin: Any, pki: Pki, tmp_path: Path) -> None:
    # given a join token an operator made
    issued = new_token(admin)
    assert issued["uses"] == 1 and issued["join_token"].count("~") == 1
    # when an agent joins with it
    path = tmp_path / "agent" / "credential.json"
    credential = join.join(url, issued["join_token"], agent_id="agent-1", url=AGENT_URL, path=path)
    # then its certificate is the CA's, of role agent, for its id, its URL bound, for the key it made
    cert = identity.Verifier(identity.load_ca_public(pki.ca_file)).certificate(credential.token, time.time())
    assert (cert.role, cert.subject, cert.url) == (AGENT, "agent-1", AGENT_URL)
    assert cert.not_after - time.time() > 6 * 24 * 3600  # the agents' default lifetime (7 days)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and identity.Credential.load(path).token == credential.token
    # and the operator sees it among the identities
    listed = admin.get("/controller/identities").json["identities"]
    assert [(i["serial"], i["subject"], i["url"], i["revoked_at"]) for i in listed] == [
        (cert.serial, "agent-1", AGENT_URL, None)]


@pytest.mark.parametrize("make_token, code, says", [
    (lambda pki: identity.CertificateAuthority.generate().join_token(now=time.time(), ttl_s=60, uses=1).token,
     "join_token_refused", "not issued by this cluster's CA"),
    (lambda pki: "x" * 40, "join_token_refused", "not a join token"),
    (lambda pki: pki.credential("agent-0", AGENT).token, "join_token_refused", "not a join token"),
    (lambda pki: pki.ca.join_token(now=time.time() - 7200, ttl_s=60, uses=1).token, "join_token_refused",
     "expired"),
], ids=["another-ca", "garbage", "a-certificate", "expired"])
def test_a_bad_or_expired_join_token_is_refused_and_says_why(url: str, pki: Pki, make_token: Callable[[Pki], str],
                                                             code: str, says: str) -> None:
    resp = requests.post(f"{url}/controller/join", json=join_body(make_token(pki)), timeout=10)
    assert resp.status_code == 403, resp.text
    assert error(resp)["code"] == code and says in error(resp)["message"]


def test_a_used_up_token_is_refused_naming_it_and_a_refused_join_uses_nothing_up(url: str, admin: Any) -> None:
    # given a token for two joins and an agent that joined with it
    issued = new_token(admin, uses=2)
    assert requests.post(f"{url}/controller/join", json=join_body(issued["join_token"], "agent-a"),
                         timeout=10).status_code == 201
    # when the same id joins again: 409, it must be revoked first; and that try counted no use
    again = requests.post(f"{url}/controller/join", json=join_body(issued["join_token"], "agent-a"), timeout=10)
    assert again.status_code == 409, again.text
    assert error(again)["code"] == "agent_already_joined"
    assert "revoke it first" in error(again)["message"] and '"subject": "agent-a"' in error(again)["message"]
    assert requests.post(f"{url}/controller/join", json=join_body(issued["join_token"], "agent-b"),
                         timeout=10).status_code == 201
    # then the token is used up, and the refusal names it
    used_up = requests.post(f"{url}/controller/join", json=join_body(issued["join_token"], "agent-c"), timeout=10)
    assert used_up.status_code == 403, used_up.text
    assert error(used_up)["code"] == "join_token_used_up" and issued["serial"] in error(used_up)["message"]


def test_a_revoked_token_is_refused_and_a_revoked_id_may_join_again(url: str, admin: Any) -> None:
    issued = new_token(admin, uses=5)
    joined = requests.post(f"{url}/controller/join", json=join_body(issued["join_token"]), timeout=10).json()
    # when the operator revokes the agent (every certificate of its id)
    revoked = admin.post("/controller/identities/revoke", json={"subject": "agent-1", "reason": "moved host"})
    assert revoked.status_code == 200, revoked.json
    assert [(r["serial"], r["subject"], r["reason"]) for r in revoked.json["revoked"]] == [
        (joined["serial"], "agent-1", "moved host")]
    # then the id may join again, at its new URL
    moved = requests.post(f"{url}/controller/join", timeout=10,
                          json=join_body(issued["join_token"], url="http://127.0.0.1:7002"))
    assert moved.status_code == 201, moved.text
    assert moved.json()["url"] == "http://127.0.0.1:7002"
    # and once the token itself is revoked (by its serial), nobody joins with it any more
    assert admin.post("/controller/identities/revoke", json={"serial": issued["serial"]}).status_code == 200
    refused = requests.post(f"{url}/controller/join", json=join_body(issued["join_token"], "agent-9"), timeout=10)
    assert refused.status_code == 403, refused.text
    assert error(refused)["code"] == "join_token_revoked"
    # revoking again is harmless, and answers the revocation made first
    twice = admin.post("/controller/identities/revoke", json={"serial": issued["serial"]}).json["revoked"]
    assert [r["serial"] for r in twice] == [issued["serial"]]


@pytest.mark.parametrize("body, code", [
    ({"agent_id": "controller"}, "reserved_agent_id"),
    ({"url": "ftp://127.0.0.1:21"}, "invalid_url"),
    ({"public_key": "A" * 40}, "invalid_public_key"),  # 30 bytes
    ({"agent_id": "../etc"}, "validation_error"),
], ids=["role-name", "not-http", "bad-key", "bad-id"])
def test_a_join_with_a_bad_request_is_a_400_and_uses_nothing_up(url: str, admin: Any, body: dict[str, str],
                                                                code: str) -> None:
    issued = new_token(admin, uses=1)
    resp = requests.post(f"{url}/controller/join", json={**join_body(issued["join_token"]), **body}, timeout=10)
    assert resp.status_code == 400, resp.text
    assert error(resp)["code"] == code
    assert requests.post(f"{url}/controller/join", json=join_body(issued["join_token"]), timeout=10).status_code \
        == 201


def test_without_the_ca_key_joins_and_join_tokens_answer_503_saying_so(pki: Pki, tmp_path: Path) -> None:
    app = create_app(settings_for(pki, tmp_path, ca_key_file=None), locate=lambda name: "http://127.0.0.1:9")
    joined = pki.client(app, None).post("/controller/join", json=join_body(pki.join_token()))
    assert joined.status_code == 503 and joined.json["error"]["code"] == "no_ca_key"
    assert "CONTROLLER_CA_KEY_FILE" in joined.json["error"]["message"]
    assert pki.client(app, ADMIN).post("/controller/join-tokens", json={}).status_code == 503
    # revocations need no CA key
    assert pki.client(app, ADMIN).post("/controller/identities/revoke",
                                       json={"serial": "0" * 32}).status_code == 200


def test_a_ca_key_of_another_cluster_is_refused_at_start(pki: Pki, tmp_path: Path) -> None:
    other = identity.CertificateAuthority.generate()
    other.save(tmp_path / "other-key.json", tmp_path / "other.json")
    with pytest.raises(ValidationError, match="not the private key of ca_file"):
        settings_for(pki, tmp_path, ca_key_file=tmp_path / "other-key.json")


def test_an_agent_renews_with_its_current_certificate_for_a_new_key(url: str, admin: Any, tmp_path: Path) -> None:
    first = join.join(url, new_token(admin)["join_token"], agent_id="agent-1", url=AGENT_URL,
                      path=tmp_path / "cred.json")
    renewed = join.renew(url, first, path=tmp_path / "cred.json")
    assert (renewed.cert.subject, renewed.cert.role, renewed.cert.url) == ("agent-1", AGENT, AGENT_URL)
    assert renewed.cert.serial != first.cert.serial and renewed.cert.public_key != first.cert.public_key
    listed = {i["serial"] for i in admin.get("/controller/identities").json["identities"]}
    assert listed == {first.cert.serial, renewed.cert.serial}


def test_an_unsigned_renew_or_one_by_a_revoked_agent_or_a_service_is_refused(
        app: Flask, url: str, admin: Any, pki: Pki, tmp_path: Path) -> None:
    # unsigned: 401 unsigned
    unsigned = requests.post(f"{url}/controller/renew", json={"public_key": public_key()}, timeout=10)
    assert unsigned.status_code == 401 and unsigned.json()["error"]["details"]["reason"] == "unsigned"
    # signed by a service: 403, renewals are the agents'
    by_service = pki.client(app, FRONTEND).post("/controller/renew", json={"public_key": public_key()})
    assert by_service.status_code == 403 and by_service.json["error"]["code"] == "forbidden_role"
    # by an agent revoked meanwhile: 401 revoked, at once
    agent = join.join(url, new_token(admin)["join_token"], agent_id="agent-1", url=AGENT_URL,
                      path=tmp_path / "cred.json")
    assert admin.post("/controller/identities/revoke", json={"subject": "agent-1"}).status_code == 200
    refused = pki.client(app, credential=agent).post("/controller/renew", json={"public_key": public_key()})
    assert refused.status_code == 401, refused.json
    assert refused.json["error"]["details"]["reason"] == "revoked"
    with pytest.raises(UpstreamError, match="revoked"):
        join.renew(url, agent, path=tmp_path / "renewed.json")


@pytest.mark.parametrize("role", [FRONTEND, AGENT, CONTROLLER, MODEL_REGISTRY, SERVICE_REGISTRY, None])
def test_only_an_operator_makes_join_tokens_revokes_and_lists_identities(app: Flask, pki: Pki,
                                                                         role: str | None) -> None:
    client = pki.client(app, role)
    status = 401 if role is None else 403
    assert client.post("/controller/join-tokens", json={"uses": 1}).status_code == status
    assert client.post("/controller/identities/revoke", json={"subject": "agent-1"}).status_code == status
    assert client.get("/controller/identities").status_code == status
    if role is not None:
        assert client.get("/controller/identities").json["error"]["code"] == "forbidden_role"


def test_every_role_reads_the_revoked_list(app: Flask, admin: Any, pki: Pki) -> None:
    leaked = pki.credential(FRONTEND)
    assert admin.post("/controller/identities/revoke",
                      json={"serial": leaked.cert.serial, "reason": "leaked"}).status_code == 200
    for role in identity.ROLES:
        resp = pki.client(app, role).get("/controller/identities/revoked")
        assert resp.status_code == 200, (role, resp.json)
        assert leaked.cert.serial in resp.json["serials"]
    assert pki.client(app, None).get("/controller/identities/revoked").status_code == 401
    # and the revoked identity itself is refused
    refused = pki.client(app, credential=leaked).get("/controller/deployments")
    assert refused.status_code == 401 and refused.json["error"]["details"]["reason"] == "revoked"


def test_a_revoked_agent_is_refused_at_once_here_and_within_the_interval_by_a_controller_on_the_same_database(
        pki: Pki, tmp_path: Path) -> None:
    # given two controllers on one database (an active one and its standby), reading revocations every 0.2 s
    settings = settings_for(pki, tmp_path, revocation_interval_s=0.2)
    active, standby = (create_app(settings, locate=lambda name: "http://127.0.0.1:9") for _ in range(2))
    standby.extensions["miaas_trust"].start()
    try:
        agent = pki.credential("agent-7", AGENT, url=AGENT_URL)
        revoked_path = "/controller/identities/revoked"
        assert pki.client(standby, credential=agent).get(revoked_path).status_code == 200
        # when an operator revokes it on the active controller
        assert pki.client(active, ADMIN).post("/controller/identities/revoke",
                                              json={"serial": agent.cert.serial}).status_code == 200
        # then the active controller refuses its next request, and the standby within its interval
        assert pki.client(active, credential=agent).get(revoked_path).status_code == 401
        wait_for(lambda: pki.client(standby, credential=agent).get(revoked_path).status_code == 401, 30,
                 "the standby refusing the revoked agent")
    finally:
        standby.extensions["miaas_trust"].stop()


# ---------------------------------------------------------------------------------------------- the tables


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IdentityStore]:
    if request.param == "sqlite":
        engine = DeploymentStore(f"sqlite:///{tmp_path / 'c.db'}").engine
        yield IdentityStore(engine)
        engine.dispose()
        return
    with postgres_schema(request.getfixturevalue("postgres_url"), "identities") as url:
        engine = DeploymentStore(url).engine
        yield IdentityStore(engine)
        engine.dispose()


def issuer(pki: Pki, subject: str, now: float, lifetime_s: float = 100) -> Callable[[], identity.Signed]:
    key = Ed25519PrivateKey.generate().public_key()
    return lambda: pki.ca.issue(subject, AGENT, key, now=now, lifetime_s=lifetime_s, url=AGENT_URL)


def test_the_tables_count_uses_refuse_live_ids_and_serve_only_unexpired_revocations(store: IdentityStore,
                                                                                    pki: Pki) -> None:
    t0 = time.time()
    token = pki.ca.join_token(now=t0, ttl_s=600, uses=2).cert  # made elsewhere: counted from its first use
    first = store.join(token, "a1", issuer(pki, "a1", t0), t0)
    with pytest.raises(AlreadyJoined):
        store.join(token, "a1", issuer(pki, "a1", t0), t0)
    store.join(token, "a2", issuer(pki, "a2", t0), t0)  # the refused join used nothing up
    with pytest.raises(UsedUp):
        store.join(token, "a3", issuer(pki, "a3", t0), t0)
    # revoked: listed until the certificate expires, then dropped (it is refused anyway)
    done = store.revoke(None, "a1", "test", t0 + 1)
    assert [r.serial for r in done] == [first.cert.serial]
    assert store.revoked_serials(t0 + 1) == [first.cert.serial]
    assert store.revoked_serials(t0 + 200) == []
    assert {i.subject: i.revoked_at is not None for i in store.identities()} == {"a1": True, "a2": False}
    # an expired certificate does not hold its id either
    later = pki.ca.join_token(now=t0, ttl_s=600, uses=1).cert
    store.join(later, "a2", issuer(pki, "a2", t0 + 200), t0 + 200)


def test_concurrent_joins_never_use_a_token_more_often_than_it_allows(store: IdentityStore, pki: Pki) -> None:
    now = time.time()
    token = pki.ca.join_token(now=now, ttl_s=600, uses=3).cert
    outcomes: list[str] = []
    go = threading.Barrier(8)

    def join_as(i: int) -> None:
        go.wait()
        try:
            store.join(token, f"agent-{i}", issuer(pki, f"agent-{i}", now), now)
            outcomes.append("joined")
        except UsedUp:
            outcomes.append("used up")

    threads = [threading.Thread(target=join_as, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["joined"] * 3 + ["used up"] * 5
    assert len(store.identities()) == 3
