"""Server-side sessions (logout and password changes end them for good), and password hashes at OWASP's cost."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from pydantic import ValidationError
from sqlalchemy import text
from werkzeug.security import generate_password_hash

from conftest import ADMIN, ADMIN_PASSWORD, TEST_SCRYPT_N, Browser
from frontend.passwords import SCRYPT_N, PasswordHasher
from frontend.settings import FrontendSettings
from frontend.store import Role, UserStore

COOKIE = "miaas_session"
DEV_PASSWORD = "a long password 1"


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
    return make_portal(locate, clock=clock, session_hours=8, session_idle_minutes=30)


def store_of(app: Flask) -> UserStore:
    store: UserStore = app.extensions["frontend.store"]
    return store


def logged_in(app: Flask, username: str = ADMIN, password: str = ADMIN_PASSWORD) -> Browser:
    web = Browser(app.test_client(), ADMIN_PASSWORD)
    answer = web.login(username, password)
    assert answer.status_code == 303, answer.text
    return web


def saved_cookie(web: Browser) -> str:
    cookie = web.client.get_cookie(COOKIE)
    assert cookie is not None
    return cookie.value


def with_cookie(app: Flask, value: str) -> Browser:
    """Another browser holding a copy of a saved cookie."""
    client = app.test_client()
    client.set_cookie(COOKIE, value)
    return Browser(client, ADMIN_PASSWORD)


def session_id_of(web: Browser) -> str:
    with web.client.session_transaction() as session:
        sid = session["sid"]
    assert isinstance(sid, str)
    return sid


def sessions_table(app: Flask) -> list[Any]:
    with store_of(app).engine.connect() as db:
        return list(db.execute(text("SELECT * FROM sessions")).mappings())


def add_developer(app: Flask) -> int:
    return store_of(app).create_user("dev", DEV_PASSWORD, Role.DEVELOPER, datetime(2026, 1, 1, tzinfo=UTC)).id


# ---------------------------------------------------------------------------------------------------- sessions


def test_a_saved_cookie_stops_working_after_logout(app: Flask) -> None:
    web = logged_in(app)
    copy = saved_cookie(web)
    assert with_cookie(app, copy).get("/models").status_code == 200  # the copy is as good as the original
    assert web.post("/logout", page="/models").status_code == 303
    assert web.get("/models").status_code == 302
    replayed = with_cookie(app, copy).get("/models")
    assert replayed.status_code == 302 and replayed.headers["Location"].startswith("/login")
    assert sessions_table(app) == []


def test_a_password_change_ends_the_other_sessions_but_not_this_one(app: Flask) -> None:
    here, elsewhere = logged_in(app), logged_in(app)
    copy_of_here, copy_of_elsewhere = saved_cookie(here), saved_cookie(elsewhere)
    changed = here.post("/account/password", {"current": ADMIN_PASSWORD, "password": "a new long password",
                                              "confirm": "a new long password"}, page="/account")
    assert changed.status_code == 303
    assert "1 other session(s) ended." in here.get("/account").text
    assert here.get("/models").status_code == 200
    assert with_cookie(app, copy_of_here).get("/models").status_code == 200
    assert elsewhere.get("/models").status_code == 302
    assert with_cookie(app, copy_of_elsewhere).get("/models").status_code == 302
    assert len(sessions_table(app)) == 1


def test_an_admin_setting_a_password_ends_every_session_of_that_user(app: Flask) -> None:
    dev_id = add_developer(app)
    dev = logged_in(app, "dev", DEV_PASSWORD)
    copy = saved_cookie(dev)
    admin = logged_in(app)
    short = admin.post(f"/users/{dev_id}/password", {"password": "short"}, page="/users")
    assert short.status_code == 400 and dev.get("/models").status_code == 200
    answer = admin.post(f"/users/{dev_id}/password", {"password": "set by the admin 1"}, page="/users")
    assert answer.status_code == 303
    assert "1 session(s) of theirs ended" in admin.get("/users").text
    assert dev.get("/models").status_code == 302
    assert with_cookie(app, copy).get("/models").status_code == 302
    assert admin.get("/models").status_code == 200  # the admin's own session is another user's
    assert logged_in(app, "dev", "set by the admin 1").get("/models").status_code == 200


def test_removing_a_user_ends_their_sessions(app: Flask) -> None:
    dev_id = add_developer(app)
    dev = logged_in(app, "dev", DEV_PASSWORD)
    copy = saved_cookie(dev)
    admin = logged_in(app)
    assert admin.post(f"/users/{dev_id}/delete", page="/users").status_code == 303
    assert with_cookie(app, copy).get("/models").status_code == 302
    assert all(row["user_id"] != dev_id for row in sessions_table(app))


def test_log_out_everywhere_else(app: Flask) -> None:
    here, elsewhere = logged_in(app), logged_in(app)
    page = here.get("/account").text
    assert page.count("<tr>") >= 3 and "(this one)" in page
    assert here.post("/account/sessions/end-others", page="/account").status_code == 303
    assert elsewhere.get("/models").status_code == 302
    assert here.get("/models").status_code == 200


def test_the_session_id_is_random_and_stored_only_as_its_sha256(app: Flask, clock: Clock) -> None:
    first, second = logged_in(app), logged_in(app)
    sid = session_id_of(first)
    assert len(sid) >= 43 and sid != session_id_of(second)
    [row] = [r for r in sessions_table(app) if r["token_sha256"] == hashlib.sha256(sid.encode()).hexdigest()]
    assert sid not in {str(v) for r in sessions_table(app) for v in r.values()}
    assert row["user_id"] == store_of(app).users()[0].id
    assert row["idle_timeout_s"] == 30 * 60
    created = datetime.fromisoformat(str(row["created_at"]))
    expires = datetime.fromisoformat(str(row["expires_at"]))
    assert expires - created == timedelta(hours=8)


def test_a_fresh_session_id_at_every_login_and_the_old_one_ends(app: Flask) -> None:
    web = logged_in(app)
    before, copy = session_id_of(web), saved_cookie(web)
    web.post("/login", {"username": ADMIN, "password": ADMIN_PASSWORD}, page="/models")
    assert session_id_of(web) != before
    assert with_cookie(app, copy).get("/models").status_code == 302
    assert len(sessions_table(app)) == 1


def test_a_session_ends_after_its_idle_timeout(app: Flask, clock: Clock) -> None:
    web = logged_in(app)
    clock.advance(minutes=29)
    assert web.get("/models").status_code == 200  # activity moves last_seen on
    clock.advance(minutes=29)
    assert web.get("/models").status_code == 200
    clock.advance(minutes=31)
    assert web.get("/models").status_code == 302
    assert sessions_table(app) == []


def test_a_session_ends_at_its_expiry_however_active(app: Flask, clock: Clock) -> None:
    web = logged_in(app)
    for _ in range(16):  # a request every 29 minutes: never idle for 30
        clock.advance(minutes=29)
        assert web.get("/models").status_code == 200
    clock.advance(minutes=20)  # 8 h 4 min after the login
    assert web.get("/models").status_code == 302


def test_last_seen_is_written_at_most_once_a_minute(app: Flask, clock: Clock) -> None:
    web = logged_in(app)
    [before] = sessions_table(app)
    clock.advance(seconds=30)
    web.get("/models")
    assert sessions_table(app)[0]["last_seen_at"] == before["last_seen_at"]
    clock.advance(seconds=31)
    web.get("/models")
    assert sessions_table(app)[0]["last_seen_at"] != before["last_seen_at"]


def test_the_cookie_carries_no_user_id(app: Flask) -> None:
    web = logged_in(app)
    with web.client.session_transaction() as session:
        assert set(session) <= {"sid", "_csrf", "_flashes", "_permanent"}


def test_cookie_flags(make_portal: Callable[..., Flask], locate: Callable[[str], str]) -> None:
    plain = Browser(make_portal(locate).test_client(), ADMIN_PASSWORD).login().headers["Set-Cookie"]
    assert plain.startswith(f"{COOKIE}=") and "HttpOnly" in plain and "SameSite=Lax" in plain
    assert "Secure" not in plain
    https = make_portal(locate, public_url="https://portal.example")
    assert "Secure" in Browser(https.test_client(), ADMIN_PASSWORD).login().headers["Set-Cookie"]


def test_proxy_hops_tell_https_from_the_forwarded_scheme(make_portal: Callable[..., Flask]) -> None:
    behind = make_portal(trusted_proxy_hops=1).test_client()
    assert "Secure" in behind.get("/login", headers={"X-Forwarded-Proto": "https"}).headers["Set-Cookie"]
    alone = make_portal().test_client()
    assert "Secure" not in alone.get("/login", headers={"X-Forwarded-Proto": "https"}).headers["Set-Cookie"]


def test_a_wrong_current_password_is_slowed_down_too(app: Flask) -> None:
    web = logged_in(app)
    statuses = [web.post("/account/password", {"current": "not it at all", "password": "a new long password",
                                               "confirm": "a new long password"}, page="/account").status_code
                for _ in range(7)]
    assert statuses[:5] == [400] * 5 and 429 in statuses[5:]


# ---------------------------------------------------------------------------------------------------- hashes


def stored_hash(app: Flask, username: str) -> str:
    with store_of(app).engine.connect() as db:
        value = db.execute(text("SELECT password_hash FROM users WHERE username = :u"), {"u": username}).scalar()
    assert isinstance(value, str)
    return value


def put_hash(app: Flask, username: str, password_hash: str) -> None:
    with store_of(app).engine.begin() as db:
        db.execute(text("UPDATE users SET password_hash = :h WHERE username = :u"),
                   {"h": password_hash, "u": username})


def test_real_cost_hashes_and_old_hashes_are_rehashed_at_login(make_portal: Callable[..., Flask],
                                                                settings: FrontendSettings) -> None:
    # the one test at the real parameters (the others run with the test-only cheap setting)
    values = {**dict(settings), "password_scrypt_n": SCRYPT_N, "weak_password_hashes_for_tests": False}
    real = FrontendSettings(**values)
    assert real.password_scrypt_n == 2**17
    app = make_portal(password_scrypt_n=SCRYPT_N, weak_password_hashes_for_tests=False)
    assert stored_hash(app, ADMIN).startswith("scrypt:131072:8:1$")
    # a hash of werkzeug's default parameters (N=2^15) still verifies, and is replaced at the next login
    old = generate_password_hash(ADMIN_PASSWORD, method="scrypt")
    assert old.startswith("scrypt:32768:8:1$")
    put_hash(app, ADMIN, old)
    assert Browser(app.test_client(), ADMIN_PASSWORD).login().status_code == 303
    fresh = stored_hash(app, ADMIN)
    assert fresh.startswith("scrypt:131072:8:1$") and fresh != old
    assert store_of(app).authenticate(ADMIN, ADMIN_PASSWORD) is not None
    assert stored_hash(app, ADMIN) == fresh  # a current hash is left as it is


def test_a_pbkdf2_hash_verifies_and_is_rehashed(app: Flask) -> None:
    put_hash(app, ADMIN, generate_password_hash(ADMIN_PASSWORD, method="pbkdf2"))
    assert logged_in(app).get("/models").status_code == 200
    assert stored_hash(app, ADMIN).startswith(f"scrypt:{TEST_SCRYPT_N}:8:1$")


def test_a_wrong_password_leaves_an_old_hash_as_it_is(app: Flask) -> None:
    old = generate_password_hash(ADMIN_PASSWORD, method="scrypt")
    put_hash(app, ADMIN, old)
    assert store_of(app).authenticate(ADMIN, "not the password") is None
    assert stored_hash(app, ADMIN) == old


def test_the_hasher_refuses_unusable_parameters() -> None:
    for n in (3, 2**21, 1000):
        with pytest.raises(ValueError):
            PasswordHasher(n=n)
    hasher = PasswordHasher(n=2**4)
    assert not hasher.verify("scrypt:16:8:1$salt$00", "pw")
    assert not hasher.verify("scrypt:x:8:1$salt$00", "pw")
    assert not hasher.verify(f"scrypt:{2**22}:8:1$salt$00", "pw")  # too costly to even try


@pytest.mark.parametrize("n", [2**16, 2**10, 100_000])
def test_settings_refuse_a_weaker_or_odd_cost(settings: FrontendSettings, n: int) -> None:
    values = {**dict(settings), "password_scrypt_n": n, "weak_password_hashes_for_tests": False}
    with pytest.raises(ValidationError, match="SCRYPT_N"):
        FrontendSettings(**values)


def test_the_settings_default_is_owasps_minimum(settings: FrontendSettings) -> None:
    values = {k: v for k, v in dict(settings).items()
              if k not in ("password_scrypt_n", "weak_password_hashes_for_tests")}
    assert FrontendSettings(**values).password_scrypt_n == 2**17


def test_settings_refuse_a_window_shorter_than_the_longest_wait(settings: FrontendSettings) -> None:
    with pytest.raises(ValidationError, match="LOGIN_WINDOW_S"):
        FrontendSettings(**{**dict(settings), "login_window_s": 60, "login_max_delay_s": 60})
