"""Accounts: the login rate limit, invitations and sign-up, user management by admins, changing one's password."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from flask import Flask

from conftest import ADMIN_PASSWORD, T0, Browser
from frontend.ratelimit import RateLimiter
from frontend.store import Role


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(make_portal: Callable[..., Flask], locate: Callable[[str], str], clock: Clock) -> Flask:
    return make_portal(locate, clock=clock, login_attempts=3, login_window_s=60)


def browser_of(app: Flask) -> Browser:
    return Browser(app.test_client(), ADMIN_PASSWORD)


# ---------------------------------------------------------------------------------------------------- rate limit


def test_the_limiter_counts_failures_in_a_sliding_window() -> None:
    limiter = RateLimiter(limit=2, window_s=10)
    limiter.failed("k", 0.0)
    assert limiter.retry_after("k", 1.0) == 0
    limiter.failed("k", 5.0)
    assert limiter.retry_after("k", 6.0) == 4.0  # the first failure leaves the window at 10
    assert limiter.retry_after("k", 10.0) == 0
    limiter.succeeded("k")
    assert limiter.retry_after("k", 6.0) == 0


def test_failed_logins_are_limited_per_name(app: Flask, clock: Clock) -> None:
    web = browser_of(app)
    for _ in range(3):
        assert web.login(password="wrong password!!").status_code == 200
    # when the limit is reached, even the right password is refused, and the page says for how long
    refused = web.login()
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "60"
    assert "Too many failed logins. Try again in 60 seconds." in refused.text
    assert web.get("/models").status_code == 302
    # when the window has passed, the right password works again
    clock.advance(61)
    assert web.login().status_code == 303


def test_another_name_from_the_same_address_is_limited_later(app: Flask, clock: Clock) -> None:
    web = browser_of(app)
    for i in range(12):  # 3 per name x 4 names: the address limit (4 x 3)
        web.login(username=f"guess{i // 3}", password="wrong password!!")
    assert web.login(username="someone-else", password="wrong password!!").status_code == 429
    clock.advance(61)
    assert web.login().status_code == 303


def test_a_success_clears_the_names_failures(app: Flask) -> None:
    web = browser_of(app)
    for _ in range(2):
        web.login(password="wrong password!!")
    assert web.login().status_code == 303
    web.post("/logout", page="/models")
    for _ in range(2):
        assert web.login(password="wrong password!!").status_code == 200
    assert web.login().status_code == 303


# ---------------------------------------------------------------------------------------------------- sign-up


def invitation_link(admin: Browser, role: str) -> str:
    page = admin.post("/users/invitations", {"role": role}, page="/users")
    assert page.status_code == 201, page.text
    found = re.search(r'<code class="select-all" id="invitation-link">([^<]+)</code>', page.text)
    assert found
    return found.group(1).replace("http://localhost", "").replace("&amp;", "&")


def test_an_invitation_creates_an_account_with_the_role_the_admin_chose(app: Flask, clock: Clock) -> None:
    admin = browser_of(app)
    admin.login()
    link = invitation_link(admin, "developer")
    assert link.startswith("/signup?invite=")
    guest = browser_of(app)
    form = guest.get(link).text
    assert 'You are invited as a\n    <span class="badge">developer</span>' in form
    token = link.split("invite=", 1)[1]
    answer = guest.post("/signup", {"invite": token, "username": "dev", "password": "a long password 1",
                                    "confirm": "a long password 1", "role": "admin"}, page=link)
    assert answer.status_code == 303
    assert "Your role is developer." in guest.get("/models").text  # a role field in the form is ignored
    store = app.extensions["frontend.store"]
    assert {u.username: u.role for u in store.users()} == {"admin": Role.ADMIN, "dev": Role.DEVELOPER}
    # the invitation is used up
    assert browser_of(app).get(link).status_code == 404


def test_an_expired_invitation_is_refused(app: Flask, clock: Clock) -> None:
    admin = browser_of(app)
    admin.login()
    link = invitation_link(admin, "viewer")
    clock.advance(73 * 3600)
    assert "not valid any more" in browser_of(app).get(link).text


def test_without_an_invitation_sign_up_is_closed_by_default(app: Flask) -> None:
    guest = browser_of(app)
    page = guest.get("/signup")
    assert page.status_code == 404 and "Sign-up is by invitation only." in page.text
    posted = guest.post("/signup", {"username": "eve", "password": "a long password 1", "confirm": "a long password 1"})
    assert posted.status_code == 404
    assert [u.username for u in app.extensions["frontend.store"].users()] == ["admin"]


def test_open_sign_up_makes_viewers(make_portal: Callable[..., Flask], locate: Callable[[str], str]) -> None:
    app = make_portal(locate, open_signup=True)
    guest = browser_of(app)
    assert "Sign up</a> (as a viewer)" in guest.get("/login").text
    answer = guest.post("/signup", {"username": "vera", "password": "a long password 1",
                                    "confirm": "a long password 1"}, page="/signup")
    assert answer.status_code == 303
    [vera] = [u for u in app.extensions["frontend.store"].users() if u.username == "vera"]
    assert vera.role is Role.VIEWER


@pytest.mark.parametrize(("username", "password", "confirm", "message"), [
    ("vera", "short", "short", "At least 12 characters"),
    ("vera", "a long password 1", "another password", "The two passwords differ."),
    ("ve ra", "a long password 1", "a long password 1", "a username is 1 to 64 letters"),
    ("admin", "a long password 1", "a long password 1", "user &#39;admin&#39; already exists"),
])
def test_sign_up_checks_the_name_and_password(make_portal: Callable[..., Flask], locate: Callable[[str], str],
                                              username: str, password: str, confirm: str, message: str) -> None:
    app = make_portal(locate, open_signup=True)
    answer = browser_of(app).post("/signup", {"username": username, "password": password, "confirm": confirm},
                                  page="/signup")
    assert answer.status_code in (400, 409)
    assert message.lower() in answer.text.lower()


# ---------------------------------------------------------------------------------------------------- user admin


def test_an_admin_changes_roles_and_removes_users(app: Flask) -> None:
    store = app.extensions["frontend.store"]
    dev = store.create_user("dev", "a long password 1", Role.DEVELOPER, T0)
    admin = browser_of(app)
    admin.login()
    page = admin.get("/users").text
    assert 'aria-label="Save the role of dev"' in page
    assert admin.post(f"/users/{dev.id}/role", {"role": "viewer"}, page="/users").status_code == 303
    assert store.get(dev.id).role is Role.VIEWER
    assert admin.post(f"/users/{dev.id}/delete", page="/users").status_code == 303
    assert store.get(dev.id) is None


def test_the_last_admin_stays_an_admin(app: Flask) -> None:
    admin = browser_of(app)
    admin.login()
    [me] = app.extensions["frontend.store"].users()
    demoted = admin.post(f"/users/{me.id}/role", {"role": "viewer"}, page="/users")
    assert demoted.status_code == 409 and "the last admin cannot stop being an admin" in demoted.text
    removed = admin.post(f"/users/{me.id}/delete", page="/users")
    assert removed.status_code == 409 and "the last admin cannot be removed" in removed.text


def test_only_admins_manage_users(app: Flask) -> None:
    store = app.extensions["frontend.store"]
    store.create_user("dev", "a long password 1", Role.DEVELOPER, T0)
    dev = browser_of(app)
    dev.login("dev", "a long password 1")
    assert ">Users</a>" not in dev.get("/models").text
    assert dev.get("/users").status_code == 403
    assert dev.post("/users/invitations", {"role": "admin"}, page="/models").status_code == 403
    [admin] = [u for u in store.users() if u.username == "admin"]
    assert dev.post(f"/users/{admin.id}/role", {"role": "viewer"}, page="/models").status_code == 403
    assert store.get(admin.id).role is Role.ADMIN


def test_invitation_tokens_are_stored_hashed(app: Flask) -> None:
    admin = browser_of(app)
    admin.login()
    token = invitation_link(admin, "viewer").split("invite=", 1)[1]
    with app.extensions["frontend.store"].engine.connect() as db:
        stored = db.exec_driver_sql("SELECT token_sha256 FROM invitations").scalar()
    assert stored != token and len(stored) == 64


def test_a_user_changes_their_password(app: Flask) -> None:
    web = browser_of(app)
    web.login()
    wrong = web.post("/account/password", {"current": "nope", "password": "a new long password",
                                           "confirm": "a new long password"}, page="/account")
    assert wrong.status_code == 400 and "The current password is wrong." in wrong.text
    ok = web.post("/account/password", {"current": ADMIN_PASSWORD, "password": "a new long password",
                                        "confirm": "a new long password"}, page="/account")
    assert ok.status_code == 303
    store = app.extensions["frontend.store"]
    assert store.authenticate("admin", "a new long password") is not None
    assert store.authenticate("admin", ADMIN_PASSWORD) is None


def test_user_forms_need_the_csrf_token(app: Flask) -> None:
    admin = browser_of(app)
    admin.login()
    for path in ("/users/invitations", "/users/1/role", "/users/1/delete", "/account/password"):
        answer = admin.client.post(path, data={"role": "viewer"})
        assert answer.status_code == 400 and "CSRF token missing or invalid" in answer.text
    assert app.extensions["frontend.store"].invitations(T0) == []
