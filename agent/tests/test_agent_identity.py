"""The agent's identity: who may call its routes, how it gets its own credential when it starts (its file, or a
join), when it refuses to start, and a renewal that replaces its credential while it runs.

The controller's own /controller/join and /controller/renew are not here: a stand-in controller (`Issuer`) issues
certificates with the test CA through the same signed-request machinery (miaas.web), and answers the revocation
list. The real join against the real controller is tested end to end (tests/).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flask import Flask, g
from pydantic import SecretStr, ValidationError

import agent as agent_package
from agent.app import parts
from agent.credential import CredentialHolder, NoCredential
from agent.settings import AgentSettings
from miaas import identity
from miaas.bus import SYSTEM_METRICS
from miaas.errors import Forbidden
from miaas.identity import ADMIN, AGENT, CONTROLLER, FRONTEND, MODEL_REGISTRY, SERVICE_REGISTRY
from miaas.schemas import IssuedCertificate, JoinRequest, RenewRequest, RevokedList
from miaas.testing import Pki, wait_for
from miaas.web import Api, ServiceAuth, create_service_app

COMMANDS = [("post", "/create-vm", {"deployment_id": "d", "model_id": "tiny", "version": 1}),
            ("post", "/stop-vm", {"deployment_id": "d"})]
READS = [("get", "/deployments", None), ("get", "/deployments/d", None), ("get", "/deployments/d/logs", None)]


def call(client: Any, method: str, path: str, body: Any) -> Any:
    return getattr(client, method)(path, json=body) if body is not None else getattr(client, method)(path)


# ---------------------------------------------------------------------------------------------- who may call


def test_an_unsigned_request_is_refused_with_401_but_health_and_openapi_are_public(agent_app: Flask,
                                                                                     pki: Pki) -> None:
    anonymous = pki.client(agent_app, None)
    for method, path, body in [*COMMANDS, *READS]:
        resp = call(anonymous, method, path, body)
        assert resp.status_code == 401, path
        assert resp.json["error"]["code"] == "unauthenticated"
        assert resp.json["error"]["details"]["reason"] == identity.UNSIGNED
    assert anonymous.get("/health").status_code == 200
    assert anonymous.get("/openapi.json").status_code == 200


def test_only_the_controller_commands_the_agent(agent_app: Flask, pki: Pki, store: Any) -> None:
    # given a model the agent could run
    store.add("tiny")
    # when another identity, another agent included, asks it to create or stop a deployment, it is refused (403)
    for role in (FRONTEND, ADMIN, AGENT, MODEL_REGISTRY, SERVICE_REGISTRY):
        other = pki.client(agent_app, role)
        for method, path, body in COMMANDS:
            resp = call(other, method, path, body)
            assert (resp.status_code, resp.json["error"]["code"]) == (403, "forbidden_role"), (role, path)
            assert "allowed: controller" in resp.json["error"]["message"]
    # and nothing was created
    assert pki.client(agent_app, CONTROLLER).get("/deployments").json["deployments"] == []
    # then the controller may
    stopped = pki.client(agent_app, CONTROLLER).post("/stop-vm", json={"deployment_id": "d"})
    assert stopped.status_code == 404  # allowed, and there is no such deployment


def test_the_controller_the_portal_and_operators_may_look_but_no_other_identity(agent_app: Flask, pki: Pki) -> None:
    for role in (CONTROLLER, FRONTEND, ADMIN):
        assert pki.client(agent_app, role).get("/deployments").status_code == 200, role
        assert pki.client(agent_app, role).get("/deployments/d").status_code == 404, role  # allowed: not found
    for role in (AGENT, MODEL_REGISTRY, SERVICE_REGISTRY):
        for method, path, body in READS:
            resp = call(pki.client(agent_app, role), method, path, body)
            assert (resp.status_code, resp.json["error"]["code"]) == (403, "forbidden_role"), (role, path)


def test_the_controller_may_not_act_for_a_person(agent_app: Flask, pki: Pki) -> None:
    # when the controller sends X-MIaaS-User, it is refused: only the portal acts for a person
    as_someone = pki.client(agent_app, CONTROLLER, user="alice")
    for method, path, body in [*COMMANDS, *READS]:
        resp = call(as_someone, method, path, body)
        assert (resp.status_code, resp.json["error"]["code"]) == (403, "forbidden_user_header"), path
    # while the portal may look on a person's behalf
    assert pki.client(agent_app, FRONTEND, user="alice").get("/deployments").status_code == 200


def test_a_certificate_of_another_cluster_is_refused(agent_app: Flask, pki: Pki, tmp_path: Path) -> None:
    foreign = Pki(tmp_path / "other-ca").credential(CONTROLLER)
    resp = pki.client(agent_app, credential=foreign).get("/deployments")
    assert resp.status_code == 401
    assert resp.json["error"]["details"]["reason"] == identity.BAD_CERTIFICATE


def test_the_openapi_document_names_the_roles_of_each_route(agent_app: Flask, pki: Pki) -> None:
    doc = pki.client(agent_app, None).get("/openapi.json").json
    assert doc["paths"]["/create-vm"]["post"]["x-miaas-roles"] == [CONTROLLER]
    assert doc["paths"]["/stop-vm"]["post"]["x-miaas-roles"] == [CONTROLLER]
    for path in ("/deployments", "/deployments/{deployment_id}", "/deployments/{deployment_id}/logs"):
        assert set(doc["paths"][path]["get"]["x-miaas-roles"]) == {CONTROLLER, FRONTEND, ADMIN}


# ---------------------------------------------------------------------------------------------- a stand-in controller


class Issuer:
    """A stand-in controller: joins agents with the test CA's join tokens, renews their certificates (signed by the
    current one) and serves the revocation list, recording who asked for it."""

    def __init__(self, pki: Pki, *, lifetime_s: float = 3600.0) -> None:
        self.pki = pki
        self.lifetime_s = lifetime_s
        self.verifier = identity.Verifier(identity.load_ca_public(pki.ca_file))
        self.joined: list[JoinRequest] = []
        self.renewed: list[str] = []  # serials of the certificates that asked
        self.revocation_callers: list[str] = []  # serials of the certificates that fetched the list
        self.revoked: set[str] = set()
        self._lock = threading.Lock()

    def issue(self, subject: str, public_key: str, url: str | None) -> IssuedCertificate:
        key = Ed25519PublicKey.from_public_bytes(identity.b64d(public_key))
        signed = self.pki.ca.issue(subject, AGENT, key, now=time.time(), lifetime_s=self.lifetime_s, url=url)
        return IssuedCertificate(certificate=signed.token, subject=subject, role=AGENT, serial=signed.cert.serial,
                                 not_after=datetime.fromtimestamp(signed.cert.not_after, UTC), url=url)

    def app(self) -> Flask:
        api = Api("controller")

        @api.route("/controller/join", "POST", body=JoinRequest, response=IssuedCertificate, public=True)
        def join(body: JoinRequest) -> IssuedCertificate:
            """Join."""
            try:
                self.verifier.join_token(body.join_token, time.time())
            except identity.Refused as exc:
                raise Forbidden(exc.message, code="bad_join_token") from exc
            with self._lock:
                self.joined.append(body)
            return self.issue(body.agent_id, body.public_key, body.url)

        @api.route("/controller/renew", "POST", body=RenewRequest, response=IssuedCertificate, allow=(AGENT,))
        def renew(body: RenewRequest) -> IssuedCertificate:
            """Renew."""
            current: identity.Certificate = g.identity
            with self._lock:
                self.renewed.append(current.serial)
            return self.issue(current.subject, body.public_key, current.url)

        @api.route("/controller/identities/revoked", response=RevokedList, allow=identity.ROLES)
        def revoked() -> RevokedList:
            """Revoked."""
            with self._lock:
                self.revocation_callers.append(g.identity.serial)
                return RevokedList(serials=sorted(self.revoked))

        return create_service_app("controller", ServiceAuth(self.verifier), [api], import_name=__name__)


@pytest.fixture
def issuer(pki: Pki, serve: Callable[[Flask], Any]) -> tuple[Issuer, str]:
    stand_in = Issuer(pki)
    return stand_in, serve(stand_in.app()).url


def start(app: Flask, serve: Callable[[Flask], Any]) -> str:
    """Serve the agent and start it as run_service does: its URL known, it obtains its credential."""
    url: str = serve(app).url
    parts(app).start_metrics(url)
    return url


# ---------------------------------------------------------------------------------------------- starting


def test_an_agent_without_a_credential_and_without_a_join_token_refuses_to_start(
    make_agent: Callable[..., Flask], settings: AgentSettings, serve: Callable[[Flask], Any],
) -> None:
    # given an agent with no credential file and no join token
    assert settings.join_token is None and not settings.credential_path.exists()
    app = make_agent(settings, credential=CredentialHolder())

    # when it starts, then it refuses, saying what to do
    with pytest.raises(NoCredential) as refused:
        start(app, serve)
    message = refused.value.message
    assert "no credential" in message and str(settings.credential_path) in message
    assert "AGENT_JOIN_TOKEN" in message and "POST /controller/join-tokens" in message
    assert not parts(app).credential.ready and parts(app).publisher is None


def test_an_agent_process_without_a_credential_exits_with_the_message(pki: Pki, tmp_path: Path) -> None:
    # given the agent's process with no credential file and no join token, in a folder without a .env
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "MIAAS_"))}
    code_root = Path(agent_package.__file__).resolve().parents[2]
    env.update({"MIAAS_CA_FILE": str(pki.ca_file), "AGENT_PORT": "0", "AGENT_SANDBOX": "none",
                "AGENT_STATE_DIR": str(tmp_path / "state"), "AGENT_AGENT_ID": "agent-lonely",
                "MIAAS_KAFKA_BOOTSTRAP": "127.0.0.1:9", "PYTHONPATH": f"{code_root}:{code_root / 'agent'}"})

    # when it starts, then it exits (code 2) naming what is missing and what to do
    done = subprocess.run([sys.executable, "-m", "agent"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "agent agent-lonely refuses to start" in done.stderr and "AGENT_JOIN_TOKEN" in done.stderr


def test_a_credential_bound_to_another_url_refuses_to_start_and_says_to_revoke_and_join_again(
    make_agent: Callable[..., Flask], settings: AgentSettings, pki: Pki, serve: Callable[[Flask], Any],
) -> None:
    # given the agent's credential file, bound when it joined to a URL it no longer serves at
    pki.credential(settings.agent_id, AGENT, url="http://old-host:8600").save(settings.credential_path)
    app = make_agent(settings.model_copy(update={"join_token": SecretStr(pki.join_token())}),
                     credential=CredentialHolder())

    # when it starts elsewhere, then it refuses (a join token changes nothing), saying how to move
    with pytest.raises(NoCredential) as refused:
        start(app, serve)
    message = refused.value.message
    assert "bound to http://old-host:8600" in message
    assert "POST /controller/identities/revoke" in message and settings.agent_id in message
    assert "AGENT_JOIN_TOKEN" in message and str(settings.credential_path) in message


@pytest.mark.parametrize("whose", ["another agent", "another role", "another cluster", "expired"])
def test_a_credential_file_that_is_not_this_agents_is_refused_without_a_join_token(
    make_agent: Callable[..., Flask], settings: AgentSettings, pki: Pki, serve: Callable[[Flask], Any],
    tmp_path: Path, whose: str,
) -> None:
    # given a credential file whose certificate cannot be this agent's
    app = make_agent(settings, credential=CredentialHolder())
    server = serve(app)
    made = {
        "another agent": lambda: pki.credential("agent-someone-else", AGENT, url=server.url),
        "another role": lambda: pki.credential(settings.agent_id, CONTROLLER, url=server.url),
        "another cluster": lambda: Pki(tmp_path / "other").credential(settings.agent_id, AGENT, url=server.url),
        "expired": lambda: pki.ca.credential(settings.agent_id, AGENT, now=time.time() - 7200, lifetime_s=60,
                                             url=server.url),
    }[whose]()
    made.save(settings.credential_path)

    # when it starts, then it refuses, saying why and what to do
    with pytest.raises(NoCredential, match="cannot be used") as refused:
        parts(app).start_metrics(server.url)
    assert "AGENT_JOIN_TOKEN" in refused.value.message


def test_an_agent_with_its_credential_file_uses_it_and_publishes_its_bound_url(
    make_agent: Callable[..., Flask], settings: AgentSettings, pki: Pki, serve: Callable[[Flask], Any], bus: Any,
) -> None:
    # given an agent whose credential file holds its certificate, bound to the URL it serves at
    app = make_agent(settings, bus, credential=CredentialHolder())
    server = serve(app)
    own = pki.credential(settings.agent_id, AGENT, url=server.url)
    own.save(settings.credential_path)
    settings.credential_path.chmod(0o644)  # as a careless copy leaves it

    # when it starts, it uses that credential (readable by its own user only again), and its metrics carry that URL
    parts(app).start_metrics(server.url)
    assert parts(app).credential().cert.serial == own.cert.serial
    assert stat.S_IMODE(settings.credential_path.stat().st_mode) == 0o600
    assert parts(app).renewer is None  # no controller known: nothing to renew with (it warned)
    metrics = wait_for(lambda: bus.on(SYSTEM_METRICS), 60, "metrics")
    assert metrics[0].url == server.url


def test_an_agent_with_a_join_token_joins_at_its_url_and_keeps_its_credential_private(
    make_agent: Callable[..., Flask], settings: AgentSettings, pki: Pki, serve: Callable[[Flask], Any],
    issuer: tuple[Issuer, str],
) -> None:
    # given an agent without a credential, with a join token and the controller's URL
    controller, controller_url = issuer
    tuned = settings.model_copy(update={"join_token": SecretStr(pki.join_token()),
                                        "controller_url": controller_url})
    app = make_agent(tuned, credential=CredentialHolder())

    # when it starts, it joins as its agent id at the URL it serves at
    url = start(app, serve)
    [request] = controller.joined
    assert (request.agent_id, request.url) == (settings.agent_id, url)
    cred = parts(app).credential()
    assert (cred.cert.subject, cred.cert.role, cred.cert.url) == (settings.agent_id, AGENT, url)

    # and its credential is written to its file, readable by the agent's user only, and used after a restart
    path = tuned.credential_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["certificate"] == cred.token
    again = make_agent(tuned, credential=CredentialHolder())
    parts(again).start_metrics(url)
    assert parts(again).credential().cert.serial == cred.cert.serial and len(controller.joined) == 1


def test_a_refused_join_is_a_refusal_to_start_naming_the_controller(
    make_agent: Callable[..., Flask], settings: AgentSettings, pki: Pki, serve: Callable[[Flask], Any],
    issuer: tuple[Issuer, str], tmp_path: Path,
) -> None:
    _, controller_url = issuer
    foreign = Pki(tmp_path / "other").join_token()
    app = make_agent(settings.model_copy(update={"join_token": SecretStr(foreign), "controller_url": controller_url}),
                     credential=CredentialHolder())
    with pytest.raises(NoCredential, match="could not join the cluster") as refused:
        start(app, serve)
    assert controller_url in refused.value.message and not settings.credential_path.exists()


def test_joining_without_the_controllers_url_is_refused_naming_the_setting(
    make_agent: Callable[..., Flask], settings: AgentSettings, pki: Pki, serve: Callable[[Flask], Any],
) -> None:
    app = make_agent(settings.model_copy(update={"join_token": SecretStr(pki.join_token())}),
                     credential=CredentialHolder())
    with pytest.raises(NoCredential, match="AGENT_CONTROLLER_URL"):
        start(app, serve)


# ---------------------------------------------------------------------------------------------- renewal


def test_renewal_replaces_the_credential_without_a_restart(
    make_agent: Callable[..., Flask], settings: AgentSettings, pki: Pki, serve: Callable[[Flask], Any],
    issuer: tuple[Issuer, str],
) -> None:
    # given a running agent whose certificate is past half its life, which knows the controller
    controller, controller_url = issuer
    tuned = settings.model_copy(update={"controller_url": controller_url, "renewal_check_s": 0.1,
                                        "revocation_interval_s": 0.1})
    app = make_agent(tuned, credential=CredentialHolder())
    server = serve(app)
    first = pki.ca.credential(settings.agent_id, AGENT, now=time.time(), lifetime_s=10.0, url=server.url)
    first.save(tuned.credential_path)
    parts(app).start_metrics(server.url)
    trust = app.extensions["miaas_trust"]
    trust.start()  # as run_service does: the revocation list is fetched, signed by the agent
    try:
        # when the renewal thread sees it is due, then it asks the controller, signed by the current certificate,
        # and the agent holds the new one, bound to the same URL, and writes it to its file
        renewed = wait_for(lambda: parts(app).credential().cert.serial != first.cert.serial
                           and parts(app).credential(), 60, "a renewed credential")
        assert controller.renewed[0] == first.cert.serial
        assert (renewed.cert.subject, renewed.cert.url) == (settings.agent_id, server.url)
        assert renewed.cert.not_after > first.cert.not_after
        assert json.loads(tuned.credential_path.read_text())["certificate"] == renewed.token
        assert stat.S_IMODE(tuned.credential_path.stat().st_mode) == 0o600
        # and what it sends next is signed with the new one: its revocation fetches (one holder for everything)
        wait_for(lambda: renewed.cert.serial in controller.revocation_callers, 60, "a fetch signed by the new one")
        # and no second renewal follows: the new certificate is young
        assert parts(app).renewer is not None and parts(app).renewer.renewed == 1
    finally:
        trust.stop()


# ---------------------------------------------------------------------------------------------- what models see


def test_no_model_environment_carries_the_join_token_or_the_credential(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.runtimes.base import DeploymentSpec
    from agent.runtimes.process import model_env
    from agent.runtimes.sandbox import sandbox_env
    from agent.runtimes.vagrant_driver import vagrant_env
    from miaas.schemas import PackageMeta

    # given an agent whose environment holds its join token and the path of its credential
    agent_env = {"PATH": "/usr/bin", "HOME": "/root", "AGENT_JOIN_TOKEN": "a.b~the-join-secret",
                 "AGENT_CREDENTIAL_FILE": "/var/lib/miaas/agent/credential.json", "MIAAS_CA_FILE": "/etc/ca.json"}
    spec = DeploymentSpec(deployment_id="dep-e", model_id="m", version=1, model_path=tmp_path, port=20001,
                          meta=PackageMeta(setup_commands=["true"], start_commands=["true"]), workdir=tmp_path)

    # then neither reaches a model, unsandboxed, sandboxed, or through the vagrant commands that make its VM
    for name, value in agent_env.items():
        monkeypatch.setenv(name, value)
    envs = [model_env(spec, Path("/venvs/v")), sandbox_env(spec, Path("/venvs/v")), vagrant_env(None)]
    for env in envs:
        assert "AGENT_JOIN_TOKEN" not in env and "AGENT_CREDENTIAL_FILE" not in env
        assert "the-join-secret" not in json.dumps(env) and "credential.json" not in json.dumps(env)


# ---------------------------------------------------------------------------------------------- settings


def test_the_identity_settings_are_validated_with_clear_errors(pki: Pki, tmp_path: Path) -> None:
    base: dict[str, Any] = {"ca_file": pki.ca_file, "state_dir": tmp_path / "state"}
    settings = AgentSettings(**base)
    assert settings.credential_path == (tmp_path / "state" / "credential.json").absolute()
    assert AgentSettings(**base, credential_file=tmp_path / "c.json").credential_path == tmp_path / "c.json"
    assert AgentSettings(**base, controller_url="http://controller:8520/").controller_url == "http://controller:8520"
    token = pki.join_token()
    assert AgentSettings(**base, join_token=token).join_token.get_secret_value() == token  # type: ignore[union-attr]
    with pytest.raises(ValidationError, match="AGENT_JOIN_TOKEN is not a join token"):
        AgentSettings(**base, join_token="not-a-join-token-at-all-really")
    for bad in ("controller:8520", "ftp://controller", "http://:80", "http://controller:99999"):
        with pytest.raises(ValidationError, match="AGENT_CONTROLLER_URL must be an http"):
            AgentSettings(**base, controller_url=bad)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{}")
    with pytest.raises(ValidationError, match="is not a credential file"):
        AgentSettings(**base, credential_file=garbage)
    assert "service_token" not in AgentSettings.model_fields
