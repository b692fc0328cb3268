"""Accounts: the login rate limit, invitations and sign-up, user management by admins, changing one's password."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from flask import Flask

from conftest import ADMIN_PASSWORD, T0, Browser
from frontend.ratelimit import Backoff, RateLimiter
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
    return make_portal(locate, clock=clock, login_attempts=3, login_max_delay_s=30, login_window_s=60,
                       login_address_attempts=12)


def browser_of(app: Flask, address: str = "127.0.0.1") -> Browser:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return Browser(client, ADMIN_PASSWORD)


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


def test_the_backoff_doubles_the_wait_up_to_a_cap_and_forgets() -> None:
    backoff = Backoff(free=2, max_s=8, forget_s=20)
    backoff.failed("k", 0.0)
    backoff.failed("k", 0.0)
    assert backoff.retry_after("k", 0.0) == 1.0  # the free failures are used up: 1 s, then doubling
    waits = []
    for t in (1.0, 3.0, 7.0, 15.0, 23.0):
        assert backoff.retry_after("k", t) == 0
        backoff.failed("k", t)
        waits.append(backoff.retry_after("k", t))
    assert waits == [2.0, 4.0, 8.0, 8.0, 8.0]  # capped
    assert backoff.retry_after("other", 23.0) == 0  # keys are independent
    backoff.failed("k", 31.0)
    assert backoff.retry_after("k", 51.0) == 0  # 20 s after the last failure they are forgotten
    backoff.failed("k", 51.0)
    assert backoff.retry_after("k", 51.0) == 0  # counting starts afresh
    backoff.failed("k", 52.0)
    backoff.succeeded("k")
    assert backoff.retry_after("k", 52.0) == 0


def test_the_backoff_must_remember_longer_than_its_longest_wait() -> None:
    with pytest.raises(ValueError):
        Backoff(free=2, max_s=20, forget_s=20)


def test_failures_of_a_name_from_an_address_make_it_wait_longer_each_time(app: Flask, clock: Clock) -> None:
    web = browser_of(app)
    for _ in range(2):
        assert "Wrong username or password.</" in web.login(password="wrong password!!").text
    third = web.login(password="wrong password!!")
    assert third.status_code == 200 and "Wait 1 seconds before the next try." in third.text
    # while it waits, even the right password is refused (no hash is computed), and the page says for how long
    refused = web.login()
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert "Too many failed logins. Try again in 1 seconds." in refused.text
    clock.advance(1)
    assert "Wait 2 seconds" in web.login(password="wrong password!!").text
    assert web.login().headers["Retry-After"] == "2"
    clock.advance(2)
    assert web.login().status_code == 303


def test_a_flood_for_a_name_from_one_address_never_stops_that_person_from_another(app: Flask,
                                                                                  clock: Clock) -> None:
    attacker = browser_of(app, "203.0.113.7")
    for _ in range(40):
        assert attacker.login(password="guessing password").status_code in (200, 429)
        clock.advance(0.5)
    assert attacker.login().status_code == 429  # the attacker's address is held back, for this name too
    person = browser_of(app, "198.51.100.20")
    assert person.login().status_code == 303  # the name itself is not locked
    assert person.get("/models").status_code == 200


def test_one_address_failing_for_many_names_is_limited(app: Flask, clock: Clock) -> None:
    web = browser_of(app, "203.0.113.7")
    for i in range(12):  # 12 failures from one address, for 6 names: under each pair's free attempts
        assert web.login(username=f"guess{i // 2}", password="wrong password!!").status_code == 200
    refused = web.login(username="someone-else", password="wrong password!!")
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "60"
    assert browser_of(app, "198.51.100.20").login().status_code == 303  # other addresses are not affected
    clock.advance(61)
    assert web.login().status_code == 303


def test_a_success_clears_the_failures_of_the_name_from_that_address(app: Flask) -> None:
    web = browser_of(app)
    for _ in range(2):
        web.login(password="wrong password!!")
    assert web.login().status_code == 303
    web.post("/logout", page="/models")
    for _ in range(2):
        assert web.login(password="wrong password!!").status_code == 200
    assert web.login().status_code == 303


def test_forwarded_addresses_count_only_behind_trusted_proxies(make_portal: Callable[..., Flask],
                                                               locate: Callable[[str], str]) -> None:
    def flood_then_login(app: Flask) -> int:
        attacker = browser_of(app, "10.0.0.1")  # the proxy's address
        for _ in range(3):
            attacker.post("/login", {"username": "admin", "password": "wrong password!!"},
                          headers={"X-Forwarded-For": "203.0.113.7"})
        person = browser_of(app, "10.0.0.1")
        return person.post("/login", {"username": "admin", "password": ADMIN_PASSWORD},
                           headers={"X-Forwarded-For": "198.51.100.20"}).status_code

    # behind one trusted proxy, each client is told apart by the address the proxy saw
    assert flood_then_login(make_portal(locate, login_attempts=3, trusted_proxy_hops=1)) == 303
    # without one, X-Forwarded-For is the client's own word and is ignored: no dodging the limit with it
    assert flood_then_login(make_portal(locate, login_attempts=3)) == 429


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
