"""Who may call what: every route of the registry, walked from its URL map, believes only a fresh request signed by a
certificate of this cluster's CA that is not revoked, from a role the authorisation table lets call it; only the
portal names a person, and the person (else the signing identity) is who the registry records.

The table below is the design's, written out again on purpose: a route added to the registry without an entry here
fails `test_every_route_is_in_the_authorisation_table`.
"""
# mypy: disable-error-code="index"

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.routing import Rule
from werkzeug.test import TestResponse

from miaas.bus import MODEL_EVENTS, PartitionConsumer, Received
from miaas.client import ServiceClient
from miaas.identity import (
    ROLES,
    SIGNATURE_HEADER,
    UNSIGNED_PAYLOAD,
    Credential,
    MessageChecker,
    Verifier,
    body_digest,
    sign_request,
)
from miaas.schemas import ModelEvent
from miaas.serve import Server
from miaas.testing import Pki, wait_for
from model_registry.__main__ import event_bus
from model_registry.app import create_app, registry_trust
from model_registry.settings import ModelRegistrySettings
from model_registry.testing import GOOD, Upload, make_zip, registry
from service_registry.app import create_app as create_service_registry
from service_registry.settings import ServiceRegistrySettings

READ = ("frontend", "admin", "controller", "agent")
WRITE = ("frontend", "admin")
TABLE: dict[tuple[str, str], tuple[str, ...]] = {
    ("POST", "/registry/upload-and-validate"): WRITE,
    ("GET", "/registry/fetch-model"): READ,
    ("GET", "/registry/models"): READ,
    ("GET", "/registry/models/<model_id>"): READ,
    ("GET", "/registry/models/<model_id>/versions/<int:version>/download"): READ,
    ("GET", "/registry/models/<model_id>/versions/<int:version>/files"): READ,
    ("GET", "/registry/models/<model_id>/versions/<int:version>/manifest"): READ,
    ("GET", "/registry/models/<model_id>/versions/<int:version>/files/<path:path>"): READ,
    ("GET", "/registry/models/<model_id>/aliases"): READ,
    ("DELETE", "/registry/models/<model_id>/versions/<int:version>"): WRITE,
    ("POST", "/registry/models/<model_id>/versions/<int:version>/edit"): WRITE,
    ("PUT", "/registry/models/<model_id>/aliases/<alias>"): WRITE,
    ("DELETE", "/registry/models/<model_id>/aliases/<alias>"): WRITE,
    ("GET", "/metrics"): ROLES,  # any identity; a scraper with MIAAS_METRICS_TOKEN too (tests/test_shared_metrics.py)
}
PUBLIC = {("GET", "/health"), ("GET", "/openapi.json")}
STREAMED = {("POST", "/registry/upload-and-validate")}
SAMPLE = {"model_id": "iris", "version": 1, "path": "app.py", "alias": "production", "filename": "app.py"}


@pytest.fixture
def database_url(workdir: Path) -> str:
    """Who may call what does not depend on the database: SQLite only here."""
    return f"sqlite:///{workdir / 'registry.db'}"


Route = tuple[str, str, str]
"""(method, rule, a URL of it)."""


def routes(app: Flask) -> Iterator[Route]:
    """Every (method, rule) of the app's URL map, with a URL that reaches it."""
    urls = app.url_map.bind("localhost")
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield method, rule.rule, _url(urls.build(rule.endpoint, _values(rule), method=method))


def _values(rule: Rule) -> dict[str, Any]:
    return {name: SAMPLE[name] for name in rule.arguments}


def _url(built: str) -> str:
    return built.removeprefix("http://localhost")


def guarded(app: Flask) -> list[Route]:
    return [r for r in routes(app) if (r[0], r[1]) not in PUBLIC]


def send(app: Flask, method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b"") -> TestResponse:
    """One request as sent, headers and all, by a client that does not sign."""
    return app.test_client().open(url, method=method, headers=headers or {}, data=body)


def signed(credential: Credential, method: str, url: str, body_hash: str | None = None) -> dict[str, str]:
    """The signature headers of one request to the test client's host (`localhost`) with an empty body."""
    return sign_request(credential, method, url, "localhost", body_hash or body_digest(b""), time.time())


def refusal(answer: TestResponse) -> tuple[int, str | None]:
    """Status and reason of a refusal (401: the identity reason; 403: the error code)."""
    error = (answer.json or {}).get("error") or {}
    if answer.status_code == 401:
        return 401, (error.get("details") or {}).get("reason")
    return answer.status_code, error.get("code")


def test_every_route_is_in_the_authorisation_table(app: Flask) -> None:
    found = {(method, rule) for method, rule, _ in routes(app)}
    assert found == set(TABLE) | PUBLIC  # no Flask /static route either: every route names its roles


def test_the_public_routes_answer_anyone(app: Flask) -> None:
    for method, rule in sorted(PUBLIC):
        assert send(app, method, rule).status_code == 200, rule


@pytest.mark.parametrize("name", ["app.py", "../app.py", "%2e%2e/app.py", "../../../conftest.py"])
def test_there_is_no_static_route(app: Flask, name: str) -> None:
    assert send(app, "GET", f"/static/{name}").status_code == 404


def test_every_guarded_route_refuses_a_request_without_a_signature(app: Flask) -> None:
    answers = {(m, rule): refusal(send(app, m, url)) for m, rule, url in guarded(app)}
    assert answers == {(m, rule): (401, "unsigned") for m, rule, _ in guarded(app)}


def test_every_guarded_route_refuses_a_certificate_of_another_ca(app: Flask, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other-ca")
    answers = {}
    for method, rule, url in guarded(app):
        stranger = other.credential(TABLE[method, rule][0])  # a role that may call it, from the wrong CA
        answers[method, rule] = refusal(send(app, method, url, signed(stranger, method, url)))
    assert set(answers.values()) == {(401, "bad_certificate")}, answers


def test_every_guarded_route_refuses_a_revoked_certificate(app: Flask, pki: Pki) -> None:
    revoked = {role: pki.credential(role) for role in ROLES}
    app.extensions["miaas_trust"].revocations.update(c.cert.serial for c in revoked.values())
    answers = {}
    for method, rule, url in guarded(app):
        cred = revoked[TABLE[method, rule][0]]
        answers[method, rule] = refusal(send(app, method, url, signed(cred, method, url)))
    assert set(answers.values()) == {(401, "revoked")}, answers


def test_every_guarded_route_refuses_the_same_signed_request_sent_twice(app: Flask, pki: Pki) -> None:
    admin = pki.credential("admin")
    first, again = {}, {}
    for method, rule, url in guarded(app):
        headers = signed(admin, method, url)
        first[method, rule] = send(app, method, url, headers).status_code
        again[method, rule] = refusal(send(app, method, url, headers))
    assert not {k: s for k, s in first.items() if s in (401, 403)}, "the first sending must get past the checks"
    assert set(again.values()) == {(401, "replayed")}, again


def test_every_guarded_route_refuses_each_role_the_table_does_not_allow(app: Flask, pki: Pki) -> None:
    answers = {}
    for method, rule, url in guarded(app):
        for role in sorted(set(ROLES) - set(TABLE[method, rule])):
            answers[method, rule, role] = refusal(pki.client(app, role).open(url, method=method))
    assert answers and set(answers.values()) == {(403, "forbidden_role")}, answers


def test_every_role_the_table_allows_gets_past_the_checks(app: Flask, pki: Pki) -> None:
    """An empty registry: the answers are 200s, 400s (no body) and 404s (no such model), never a refusal."""
    answers = {}
    for method, rule, url in guarded(app):
        for role in TABLE[method, rule]:
            answers[method, rule, role] = pki.client(app, role).open(url, method=method).status_code
    assert not {k: s for k, s in answers.items() if s in (401, 403)}, answers


def test_only_the_portal_may_name_a_person(app: Flask, pki: Pki) -> None:
    answers = {}
    for method, rule, url in guarded(app):
        for role in sorted(set(TABLE[method, rule]) - {"frontend"}):
            answers[method, rule, role] = refusal(pki.client(app, role, user="alice").open(url, method=method))
    assert answers and set(answers.values()) == {(403, "forbidden_user_header")}, answers


def test_only_the_upload_may_leave_its_body_unsigned(app: Flask, pki: Pki) -> None:
    admin = pki.credential("admin")
    answers = {}
    for method, rule, url in guarded(app):
        answers[method, rule] = refusal(send(app, method, url, signed(admin, method, url, UNSIGNED_PAYLOAD)))
    unsigned_ok = {k: a for k, a in answers.items() if k in STREAMED}
    assert {k: a for k, a in answers.items() if k not in STREAMED} == {
        k: (401, "bad_signature") for k in answers if k not in STREAMED}
    assert all(a[0] not in (401, 403) for a in unsigned_ok.values()), unsigned_ok


def test_every_guarded_route_refuses_a_body_other_than_the_one_signed(app: Flask, pki: Pki) -> None:
    """(The upload reads its body as it parses it: its own test follows.)"""
    admin = pki.credential("admin")
    answers = {}
    for method, rule, url in guarded(app):
        if (method, rule) in STREAMED:
            continue
        headers = signed(admin, method, url, body_digest(b'{"version": 1}'))
        answers[method, rule] = refusal(send(app, method, url, headers, body=b'{"version": 2}'))
    assert set(answers.values()) == {(401, "bad_signature")}, answers


def _multipart(name: str, package: bytes) -> tuple[bytes, str]:
    boundary = secrets.token_hex(16)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model_name\"\r\n\r\n{name}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model.zip\"\r\n"
            "Content-Type: application/zip\r\n\r\n").encode() + package + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_a_signed_upload_whose_body_was_changed_is_refused_and_stores_nothing(
    app: Flask, pki: Pki, nothing_stored: Callable[[], None]
) -> None:
    url = "/registry/upload-and-validate"
    sent, content_type = _multipart("iris", make_zip(GOOD))
    headers = signed(pki.credential("frontend"), "POST", url, body_digest(sent))
    changed = sent.replace(b"iris", b"evil")

    answer = send(app, "POST", url, {**headers, "Content-Type": content_type}, body=changed)

    assert refusal(answer) == (401, "bad_signature")
    nothing_stored()


def test_the_recorded_uploader_is_the_person_from_the_portal_else_the_signing_identity(
    app: Flask, pki: Pki
) -> None:
    def uploader(role: str, user: str | None = None) -> str:
        client = pki.client(app, role, subject=f"{role}-1", user=user)
        answer = client.post("/registry/upload-and-validate",
                             data={"model_name": "iris", "file": (io.BytesIO(make_zip(GOOD)), "m.zip")})
        assert answer.status_code == 201, answer.json
        return str(answer.json["model"]["created_by"])

    assert [uploader("frontend", "alice"), uploader("frontend"), uploader("admin")] == [
        "alice", "frontend-1", "admin-1"]


def test_a_file_streamed_over_http_by_a_service_client_is_accepted(
    app: Flask, pki: Pki, serve: Callable[[Flask], Server], tmp_path: Path
) -> None:
    server = serve(app)
    body, content_type = _multipart("iris", make_zip(GOOD))
    (tmp_path / "upload.body").write_bytes(body)
    portal = ServiceClient(server.url, pki.credential("frontend"), user="alice")
    signatures: list[str] = []
    portal.session.hooks["response"].append(lambda r, **_: signatures.append(r.request.headers[SIGNATURE_HEADER]))

    with (tmp_path / "upload.body").open("rb") as stream:
        answer = portal.post("/registry/upload-and-validate", data=stream, headers={"Content-Type": content_type})
    portal.close()

    assert (answer["model"]["name"], answer["model"]["version"], answer["model"]["created_by"]) == ("iris", 1, "alice")
    assert [f"body={UNSIGNED_PAYLOAD}" in s for s in signatures] == [True]


def test_a_route_that_is_not_streamed_refuses_a_body_streamed_unsigned_over_http(
    app: Flask, pki: Pki, serve: Callable[[Flask], Server], upload: Upload, tmp_path: Path
) -> None:
    assert upload(GOOD).status_code == 201
    server = serve(app)
    (tmp_path / "alias.json").write_text('{"version": 1}')
    portal = ServiceClient(server.url, pki.credential("frontend"))

    with (tmp_path / "alias.json").open("rb") as stream:
        answer = portal.session.put(f"{server.url}/registry/models/iris/aliases/production", data=stream,
                                    headers={"Content-Type": "application/json"}, timeout=10)
    aliases = portal.get("/registry/models/iris/aliases")
    portal.close()

    assert answer.status_code == 401
    assert answer.json()["error"]["details"]["reason"] == "bad_signature"
    assert f"body={UNSIGNED_PAYLOAD}" in answer.request.headers[SIGNATURE_HEADER]
    assert aliases == {}


def test_model_events_go_out_signed_by_the_registry(broker: str, settings: ModelRegistrySettings, pki: Pki) -> None:
    """What `python -m model_registry` publishes: its Kafka bus signs with the registry's own credential."""
    trust = registry_trust(settings)
    bus = event_bus(settings.model_copy(update={"kafka_bootstrap": broker}), trust)
    app = create_app(settings, bus, trust=trust)
    try:
        answer = pki.client(app, "frontend", user="alice").post(
            "/registry/upload-and-validate", data={"model_name": "iris", "file": (io.BytesIO(make_zip(GOOD)), "m.zip")})
        assert answer.status_code == 201, answer.json
        model_id = answer.json["model"]["model_id"]
        assert bus.flush(10) == 0
    finally:
        registry(app).store.close()
        bus.close()
    seen: list[Received] = []
    checker = MessageChecker(Verifier(pki.ca.public_key))
    consumer = PartitionConsumer(broker, [MODEL_EVENTS], seen.append, schemas={MODEL_EVENTS: ModelEvent},
                                 start="beginning", group_id="registry-signed", checker=checker).start()
    try:
        mine = wait_for(lambda: [r for r in list(seen) if r.key == model_id], 30, "the registry's model event")
    finally:
        consumer.stop()

    assert [(r.message.kind, r.message.created_by) for r in mine] == [("version_created", "alice")]  # type: ignore[union-attr]
    assert [(r.signer.subject, r.signer.role) for r in mine] == [("model-registry", "model-registry")]  # type: ignore[union-attr]


def test_a_certificate_the_controller_revokes_is_refused_once_the_registry_has_read_the_list(
    make_app: Callable[..., Flask], controller: Any, pki: Pki
) -> None:
    app = make_app(controller_url=controller.url)
    revocations = app.extensions["miaas_trust"].revocations
    stolen, other = pki.credential("frontend"), pki.credential("frontend")
    before = pki.client(app, credential=stolen).get("/registry/models").status_code
    operator = ServiceClient(controller.url, pki.credential("admin"))
    operator.post("/controller/identities/revoke", json={"serial": stolen.cert.serial, "reason": "key leaked"})
    operator.close()

    assert revocations.refresh(), revocations.last_error  # what its poller does every MIAAS_REVOCATION_INTERVAL_S

    assert before == 200
    assert refusal(pki.client(app, credential=stolen).get("/registry/models")) == (401, "revoked")
    assert pki.client(app, credential=other).get("/registry/models").status_code == 200


def test_without_a_controller_url_the_controller_is_found_through_the_service_registry(
    make_app: Callable[..., Flask], controller: Any, pki: Pki, serve: Callable[[Flask], Server],
) -> None:
    """Both what the registry asks the controller (is a version deployed?) and the revocation list it reads."""
    book = serve(create_service_registry(ServiceRegistrySettings(**pki.settings("service-registry"))))
    as_controller = ServiceClient(book.url, pki.credential("controller"))
    as_controller.post("/register", json={"name": "controller", "url": controller.url})
    as_controller.close()
    app = make_app(service_registry_url=book.url)
    stolen = pki.credential("frontend")
    operator = ServiceClient(controller.url, pki.credential("admin"))
    operator.post("/controller/identities/revoke", json={"serial": stolen.cert.serial, "reason": "key leaked"})
    operator.close()

    revocations = app.extensions["miaas_trust"].revocations
    assert revocations.refresh(), revocations.last_error
    assert refusal(pki.client(app, credential=stolen).get("/registry/models")) == (401, "revoked")
    portal = pki.client(app, "frontend")
    assert portal.post("/registry/upload-and-validate",
                       data={"model_name": "iris", "file": (io.BytesIO(make_zip(GOOD)), "m.zip")}).status_code == 201
    assert portal.delete("/registry/models/iris/versions/1").status_code == 204  # the controller said: not in use
