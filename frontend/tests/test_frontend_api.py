"""Personal API tokens (Account page) and the JSON API under /api/v1 that they authenticate."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from conftest import ADMIN_PASSWORD, T0, Browser, FakeController, FakeRegistry
from frontend.store import Role, UserStore

DEV_PASSWORD = "developer password 1"
VIEWER_PASSWORD = "viewer password 123"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(make_portal: Callable[..., Flask], locate: Callable[[str], str], clock: Clock) -> Flask:
    app = make_portal(locate, clock=clock)
    store_of(app).create_user("dev", DEV_PASSWORD, Role.DEVELOPER, T0)
    store_of(app).create_user("vera", VIEWER_PASSWORD, Role.VIEWER, T0)
    return app


def store_of(app: Flask) -> UserStore:
    store: UserStore = app.extensions["frontend.store"]
    return store


def user_id(app: Flask, name: str) -> int:
    return next(u.id for u in store_of(app).users() if u.username == name)


def browser(app: Flask, name: str, password: str) -> Browser:
    web = Browser(app.test_client(), ADMIN_PASSWORD)
    assert web.login(name, password).status_code == 303
    return web


def create_token(web: Browser, name: str = "ci", expires_days: str = "") -> str:
    page = web.post("/account/tokens", {"name": name, "expires_days": expires_days}, page="/account")
    assert page.status_code == 201, page.text
    found = re.search(r'<code class="select-all" id="new-token">([^<]+)</code>', page.text)
    assert found
    return found.group(1)


def token_of(app: Flask, name: str, password: str) -> str:
    return create_token(browser(app, name, password))


class Api:
    """A script calling /api/v1 with a token (and no cookies)."""

    def __init__(self, app: Flask, token: str | None) -> None:
        self.client: FlaskClient = app.test_client(use_cookies=False)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(f"/api/v1{path}", headers=self.headers, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.client.post(f"/api/v1{path}", headers=self.headers, **kw)


def assert_error(answer: Any, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.mimetype == "application/json"
    body = answer.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    error: dict[str, Any] = body["error"]
    return error


# ---------------------------------------------------------------------------------------------------- tokens


def test_a_token_is_shown_once_and_listed_by_name_and_prefix(app: Flask) -> None:
    web = browser(app, "dev", DEV_PASSWORD)
    token = create_token(web, "deploy-bot", "30")
    assert token.startswith("miaas_pat_") and len(token) >= 50
    page = web.get("/account").text
    assert token not in page  # shown only once
    assert "deploy-bot" in page and f"<code>{token[:16]}…</code>" in page
    assert "2026-03-31 09:00 UTC" in page  # its expiry


def test_the_token_is_never_stored_in_clear(app: Flask) -> None:
    token = token_of(app, "dev", DEV_PASSWORD)
    assert Api(app, token).get("/whoami").status_code == 200
    with store_of(app).engine.connect() as db:
        rows = list(db.execute(text("SELECT * FROM api_tokens")).mappings())
        dump = "\n".join(str(v) for table in ("api_tokens", "sessions", "users")
                         for row in db.execute(text(f"SELECT * FROM {table}")) for v in row)
    assert token not in dump and token[16:] not in dump
    [row] = rows
    assert row["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert row["prefix"] == token[:16]


def test_whoami_tells_the_owner_and_role(app: Flask, clock: Clock) -> None:
    token = token_of(app, "dev", DEV_PASSWORD)
    answer = Api(app, token).get("/whoami")
    assert answer.status_code == 200
    body = answer.get_json()
    assert (body["username"], body["role"], body["can_change"]) == ("dev", "developer", True)
    assert body["token"]["name"] == "ci" and body["token"]["prefix"] == token[:16]
    assert "Set-Cookie" not in answer.headers
    [listed] = store_of(app).tokens(user_id(app, "dev"))
    assert listed.last_used_at == clock.now


def test_a_developer_token_reads_uploads_deploys_and_stops(app: Flask, registry: FakeRegistry,
                                                         controller: FakeController) -> None:
    api = Api(app, token_of(app, "dev", DEV_PASSWORD))
    model_id = registry.add_model("iris", versions=2)
    listed = api.get("/models?q=ir&limit=10")
    assert listed.status_code == 200
    assert [m["model_id"] for m in listed.get_json()["models"]] == [model_id] and listed.get_json()["total"] == 1
    one = api.get(f"/models/{model_id}").get_json()
    assert [v["version"] for v in one["versions"]] == [1, 2] and one["aliases"] == {}
    # upload, streamed through like the upload page
    body = b"PK\x03\x04" + b"z" * 100_000
    uploaded = api.post("/models", data={"model_name": "digits", "file": (io.BytesIO(body), "digits.zip")},
                        content_type="multipart/form-data")
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.get_json()["model"]["model_id"] == "m-digits"
    assert uploaded.headers["Location"] == "/api/v1/models/m-digits"
    sent = registry.received[-1]
    assert sent.files["file"] == ("digits.zip", body) and sent.user == "dev" and not sent.chunked
    # deploy (no CSRF token: a bearer call), then read and stop
    deployed = api.post("/deployments", json={"model_id": model_id, "version": 2, "priority": "high"})
    assert deployed.status_code == 202, deployed.text
    d = deployed.get_json()
    assert controller.received[-1].json == {"model_id": model_id, "version": 2, "priority": "high"}
    assert controller.received[-1].user == "dev"
    assert deployed.headers["Location"] == f"/api/v1/deployments/{d['deployment_id']}"
    assert api.get(f"/deployments/{d['deployment_id']}").get_json()["status"] == "pending"
    assert [x["deployment_id"] for x in api.get("/deployments").get_json()["deployments"]] == [d["deployment_id"]]
    stopped = api.post(f"/deployments/{d['deployment_id']}/stop")
    assert stopped.status_code == 200 and stopped.get_json()["status"] == "stopping"


def test_a_viewer_token_reads_but_cannot_change_anything(app: Flask, registry: FakeRegistry,
                                                         controller: FakeController) -> None:
    api = Api(app, token_of(app, "vera", VIEWER_PASSWORD))
    model_id = registry.add_model("iris")
    controller.add_deployment("d1", "running")
    controller.add_agent("agent-1", 10, 20)
    assert api.get("/models").status_code == 200
    assert api.get("/deployments/d1").status_code == 200
    assert [a["agent_id"] for a in api.get("/agents").get_json()["agents"]] == ["agent-1"]
    received = len(controller.received)
    assert_error(api.post("/deployments", json={"model_id": model_id, "version": 1}), 403, "forbidden")
    assert_error(api.post("/deployments/d1/stop"), 403, "forbidden")
    uploads = len(registry.received)
    assert_error(api.post("/models", data={"model_name": "x", "file": (io.BytesIO(b"PK"), "x.zip")},
                          content_type="multipart/form-data"), 403, "forbidden")
    assert len(controller.received) == received and len(registry.received) == uploads


def test_a_token_carries_its_owners_role_at_the_time_of_use(app: Flask, registry: FakeRegistry) -> None:
    api = Api(app, token_of(app, "dev", DEV_PASSWORD))
    model_id = registry.add_model("iris")
    store_of(app).set_role(user_id(app, "dev"), Role.VIEWER)
    assert api.get("/whoami").get_json()["role"] == "viewer"
    assert_error(api.post("/deployments", json={"model_id": model_id, "version": 1}), 403, "forbidden")


def test_a_revoked_token_gets_401(app: Flask) -> None:
    web = browser(app, "dev", DEV_PASSWORD)
    token = create_token(web)
    api = Api(app, token)
    assert api.get("/whoami").status_code == 200
    [listed] = store_of(app).tokens(user_id(app, "dev"))
    assert web.post(f"/account/tokens/{listed.id}/revoke", page="/account").status_code == 303
    refused = api.get("/whoami")
    assert_error(refused, 401, "unauthorized")
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert store_of(app).tokens() == []


def test_the_token_of_a_removed_user_gets_401(app: Flask) -> None:
    api = Api(app, token_of(app, "dev", DEV_PASSWORD))
    assert api.get("/whoami").status_code == 200
    admin = browser(app, "admin", ADMIN_PASSWORD)
    assert admin.post(f"/users/{user_id(app, 'dev')}/delete", page="/users").status_code == 303
    assert_error(api.get("/whoami"), 401, "unauthorized")
    assert_error(api.get("/models"), 401, "unauthorized")
    with store_of(app).engine.connect() as db:
        assert db.execute(text("SELECT count(*) FROM api_tokens")).scalar() == 0


def test_an_expired_token_gets_401(app: Flask, clock: Clock) -> None:
    api = Api(app, create_token(browser(app, "dev", DEV_PASSWORD), expires_days="1"))
    clock.advance(hours=23)
    assert api.get("/whoami").status_code == 200
    clock.advance(hours=1)
    assert_error(api.get("/whoami"), 401, "unauthorized")


def test_a_password_change_leaves_tokens_working(app: Flask) -> None:
    web = browser(app, "dev", DEV_PASSWORD)
    api = Api(app, create_token(web))
    assert web.post("/account/password", {"current": DEV_PASSWORD, "password": "another long password",
                                          "confirm": "another long password"}, page="/account").status_code == 303
    assert api.get("/whoami").status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer not-a-token", "Basic YWRtaW46eA==",
                                    "Bearer miaas_pat_guessed-but-unknown"])
def test_without_a_valid_token_the_api_answers_401(app: Flask, header: str | None) -> None:
    client = app.test_client(use_cookies=False)
    answer = client.get("/api/v1/models", headers={"Authorization": header} if header else {})
    assert_error(answer, 401, "unauthorized")
    assert_error(client.get("/api/v1/no-such-route"), 401, "unauthorized")  # no route is told to strangers


def test_a_session_cookie_does_not_authenticate_the_api(app: Flask, controller: FakeController) -> None:
    web = browser(app, "admin", ADMIN_PASSWORD)
    assert web.get("/models").status_code == 200
    assert_error(web.client.get("/api/v1/whoami"), 401, "unauthorized")
    csrf = web.csrf("/models")
    refused = web.client.post("/api/v1/deployments", json={"model_id": "m-iris", "version": 1},
                              headers={"X-CSRF-Token": csrf})
    assert_error(refused, 401, "unauthorized")
    assert "Set-Cookie" not in refused.headers
    assert controller.received == []


def test_tokens_do_not_open_the_pages(app: Flask) -> None:
    token = token_of(app, "dev", DEV_PASSWORD)
    page = app.test_client(use_cookies=False).get("/models", headers={"Authorization": f"Bearer {token}"})
    assert page.status_code == 302 and page.headers["Location"].startswith("/login")


def test_api_errors_have_the_one_shape(app: Flask, registry: FakeRegistry) -> None:
    api = Api(app, token_of(app, "dev", DEV_PASSWORD))
    assert_error(api.get("/models/m-nothing"), 404, "not_found")  # the registry's answer, passed on
    assert_error(api.get("/models/..%2f"), 404, "not_found")
    assert_error(api.get("/no-such-route"), 404, "not_found")
    assert_error(api.get("/models?limit=100000"), 400, "validation_error")
    invalid = assert_error(api.post("/deployments", json={"model_id": "m-iris"}), 400, "validation_error")
    assert invalid["details"] and "version or an alias" in str(invalid["details"])
    extra = assert_error(api.post("/deployments", json={"model_id": "m-iris", "version": 1, "role": "admin"}),
                         400, "validation_error")
    assert "role" in str(extra["details"])
    assert_error(api.post("/deployments", data="not json", content_type="text/plain"), 400, "bad_request")
    assert_error(api.post("/models", data={"model_name": "x"}, content_type="multipart/form-data"),
                 400, "validation_error")
    assert_error(api.client.delete("/api/v1/models", headers=api.headers), 405, "method_not_allowed")


def test_a_backend_down_is_a_json_502(make_portal: Callable[..., Flask], dead_url: str) -> None:
    app = make_portal(lambda name: dead_url)
    api = Api(app, token_of(app, "admin", ADMIN_PASSWORD))
    error = assert_error(api.get("/models"), 502, "backend_unavailable")
    assert "cannot be reached" in error["message"]


def test_an_admin_sees_and_revokes_anyones_token_but_others_cannot(app: Flask) -> None:
    dev_token = token_of(app, "dev", DEV_PASSWORD)
    [listed] = store_of(app).tokens(user_id(app, "dev"))
    vera = browser(app, "vera", VIEWER_PASSWORD)
    vera.post(f"/account/tokens/{listed.id}/revoke", page="/account")
    assert "no such token" in vera.get("/account").text
    assert vera.post(f"/users/tokens/{listed.id}/revoke", page="/account").status_code == 403
    assert Api(app, dev_token).get("/whoami").status_code == 200
    admin = browser(app, "admin", ADMIN_PASSWORD)
    users_page = admin.get("/users").text
    assert "Revoke the token ci of dev" in users_page and listed.prefix in users_page
    assert admin.post(f"/users/tokens/{listed.id}/revoke", page="/users").status_code == 303
    assert_error(Api(app, dev_token).get("/whoami"), 401, "unauthorized")


def test_token_forms_check_their_fields_and_need_csrf(app: Flask) -> None:
    web = browser(app, "dev", DEV_PASSWORD)
    assert web.post("/account/tokens", {"name": "", "expires_days": ""}, page="/account").status_code == 400
    assert web.post("/account/tokens", {"name": "x", "expires_days": "0"}, page="/account").status_code == 400
    assert web.post("/account/tokens", {"name": "x", "expires_days": "soon"}, page="/account").status_code == 400
    assert web.post("/account/tokens", {"name": "x" * 65}, page="/account").status_code == 400
    no_csrf = web.client.post("/account/tokens", data={"name": "x"})
    assert no_csrf.status_code == 400 and "CSRF token missing or invalid" in no_csrf.text
    assert store_of(app).tokens() == []
