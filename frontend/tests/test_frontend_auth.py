"""Logging in and out, sessions, the first admin, and the settings that guard them."""

from __future__ import annotations

import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from pydantic import ValidationError
from sqlalchemy import create_engine, text

from frontend.settings import FrontendSettings
from frontend.store import Role
from miaas.testing import Pki

PAGES = ["/", "/models", "/models/m-iris", "/upload", "/deployments", "/agents"]


def test_the_admin_from_the_settings_can_log_in(admin: Any) -> None:
    page = admin.get("/models")
    assert page.status_code == 200
    assert "admin" in page.text
    assert "Log out" in page.text


def test_a_wrong_password_fails_with_a_message(browser: Any) -> None:
    answer = browser.login(password="not the password at all")
    assert answer.status_code == 200
    assert "Wrong username or password." in answer.text
    assert browser.get("/models").status_code == 302


def test_an_unknown_user_gets_the_same_message(browser: Any) -> None:
    answer = browser.login(username="mallory", password="whatever-password")
    assert "Wrong username or password." in answer.text


@pytest.mark.parametrize("path", PAGES)
def test_pages_redirect_to_login_when_logged_out(browser: Any, path: str) -> None:
    answer = browser.get(path)
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith("/login?next=")


def test_after_login_the_browser_goes_back_to_the_page_it_asked_for(browser: Any) -> None:
    sent_to = browser.get("/agents?x=1").headers["Location"]
    form = browser.get(sent_to).text
    assert 'name="next" value="/agents?x=1"' in form
    answer = browser.post("/login", {"username": "admin", "password": browser.admin_password, "next": "/agents?x=1"})
    assert answer.headers["Location"] == "/agents?x=1"


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example/", "/\\evil.example", "/\t/evil.example", "/\n/evil.example"]
)
def test_login_never_sends_the_browser_to_another_site(browser: Any, target: str) -> None:
    answer = browser.post("/login", {"username": "admin", "password": browser.admin_password, "next": target})
    assert answer.headers["Location"] == "/models"


def test_health_and_static_assets_are_public(browser: Any) -> None:
    health = browser.get("/health")
    assert health.status_code == 200
    assert health.json["status"] == "ok"
    assert health.json["service"] == "frontend"
    css = browser.get("/static/style.css")
    assert css.status_code == 200
    assert "--bg" in css.text
    css.close()


def test_logout_clears_the_session(admin: Any) -> None:
    token = admin.csrf("/models")
    answer = admin.client.post("/logout", data={"csrf_token": token})
    assert answer.status_code == 303
    assert admin.get("/models").status_code == 302
    with admin.client.session_transaction() as session:
        assert "sid" not in session
    assert admin.client.application.extensions["frontend.store"].sessions_of(1, datetime.now(UTC)) == []


def test_the_session_cookie_is_httponly_and_samesite_lax(browser: Any) -> None:
    answer = browser.login()
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("miaas_session=")
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie


def test_cookies_are_secure_behind_https(make_portal: Callable[..., Flask]) -> None:
    app = make_portal(secure_cookies=True)
    page = app.test_client().get("/login")
    assert "Secure" in page.headers["Set-Cookie"]


def test_cookies_are_secure_over_https(make_portal: Callable[..., Flask]) -> None:
    app = make_portal()
    assert "Secure" in app.test_client().get("/login", base_url="https://portal.example").headers["Set-Cookie"]
    assert "Secure" not in app.test_client().get("/login").headers["Set-Cookie"]


def test_the_password_is_stored_as_an_scrypt_hash(portal: Flask, settings: FrontendSettings) -> None:
    engine = create_engine(settings.database_url)
    with engine.connect() as db:
        rows = db.execute(text("SELECT username, password_hash, role FROM users")).all()
    engine.dispose()
    assert len(rows) == 1
    username, stored, role = rows[0]
    assert (username, role) == ("admin", "admin")
    assert stored.startswith("scrypt:")
    assert settings.admin_password.get_secret_value() not in stored
    db_file = Path(settings.database_url.removeprefix("sqlite:///"))
    assert stat.S_IMODE(db_file.stat().st_mode) == 0o600


def test_the_admin_is_created_once_and_never_overwritten(
    make_portal: Callable[..., Flask], settings: FrontendSettings
) -> None:
    first = make_portal()
    second = make_portal(admin_password="a brand new password from the environment")
    store = second.extensions["frontend.store"]
    assert store.count() == 1
    assert store.authenticate("admin", settings.admin_password.get_secret_value()) is not None
    assert store.authenticate("admin", "a brand new password from the environment") is None
    assert first.extensions["frontend.store"].count() == 1


def test_a_viewer_may_look_but_not_deploy(portal: Flask, browser: Any, registry: Any, controller: Any) -> None:
    model_id = registry.add_model("iris")
    when = datetime(2026, 1, 2, tzinfo=UTC)
    portal.extensions["frontend.store"].create_user("vera", "viewer password 123", Role.VIEWER, when)
    assert browser.login("vera", "viewer password 123").status_code == 303
    page = browser.get(f"/models/{model_id}")
    assert page.status_code == 200
    assert "Deploy</button>" not in page.text
    refused = browser.post(f"/models/{model_id}/deploy", {"version": "1"}, page="/models")
    assert refused.status_code == 403
    assert controller.received == []


def test_a_deleted_user_loses_their_session(portal: Flask, admin: Any) -> None:
    store = portal.extensions["frontend.store"]
    with store.engine.begin() as db:
        db.execute(text("DELETE FROM users"))
    assert admin.get("/models").status_code == 302


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("secret_key", "change-me"),
        ("secret_key", "short"),
        ("admin_password", "password"),
        ("admin_password", "short-pw"),
        ("admin_password", "change-me-please-now"),
    ],
)
def test_settings_refuse_placeholder_and_short_secrets(settings: FrontendSettings, field: str, value: str) -> None:
    values = {**settings.model_dump(), field: value}
    with pytest.raises(ValidationError, match=field.upper() if field == "secret_key" else "ADMIN_PASSWORD"):
        FrontendSettings(**values)


def test_secret_key_and_admin_password_are_required(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRONTEND_SECRET_KEY", raising=False)
    monkeypatch.delenv("FRONTEND_ADMIN_PASSWORD", raising=False)
    with pytest.raises(ValidationError) as caught:
        FrontendSettings(**pki.settings("frontend"))  # type: ignore[call-arg]
    missing = {e["loc"][0] for e in caught.value.errors() if e["type"] == "missing"}
    assert missing == {"secret_key", "admin_password"}
