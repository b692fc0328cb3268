"""App factory of the portal."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from flask import Flask, g, has_request_context, jsonify, redirect, render_template, request, url_for
from flask import Request as FlaskRequest
from flask import Response as FlaskResponse
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionMixin
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wrappers import Response

from frontend.agents import build_agents, build_bus
from frontend.api import api_error, bearer_token, build_api, is_api_request
from frontend.auth import build_auth
from frontend.backends import CONTROLLER, Backends, Locate, discover
from frontend.busview import BusInspector
from frontend.deployments import StreamSlots, build_deployments, is_web_url
from frontend.files import build_files
from frontend.live import BusFollower, LiveFeed, LoadHistory
from frontend.models import build_models, wants_json
from frontend.passwords import SCRYPT_N, PasswordHasher
from frontend.security import TOUCH_EVERY, Sessions, check_csrf, csrf_token
from frontend.settings import FrontendSettings
from frontend.store import UserStore
from frontend.users import build_users
from miaas import __version__, identity
from miaas.errors import MiaasError, Unauthorized
from miaas.trust import Trust, trust_from_settings

log = logging.getLogger(__name__)
# Pages anyone may see; every other page needs a logged-in session.
PUBLIC_ENDPOINTS = {"auth.login_form", "auth.login", "auth.signup_form", "auth.signup", "health", "static"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
FORM_OVERHEAD_BYTES = 1 << 20  # the model name, the CSRF token and the multipart framing around the zip
SMALL_BODY_BYTES = 64 << 10  # most forms are a few short fields
EDIT_BODY_BYTES = 6 << 20  # the editor: up to five text files of up to 1 MiB each
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(
    settings: FrontendSettings, locate: Locate | None = None, clock: Callable[[], datetime] = utcnow
) -> Flask:
    """The portal; `locate(name) -> base URL` finds other services (the service registry by default).

    With `consume_bus` it follows the bus in a background thread from here on; `close_app(app)` stops it.
    Pages authenticate by a server-side session (its id in the cookie); `/api/v1` only by a personal API token.
    The portal calls other services as its own identity (FRONTEND_CREDENTIAL_FILE), for the person logged in, and
    believes only signed bus messages. No other service calls it, so the only routes not for people are public
    (`/health`).
    """
    credential = identity.CredentialFile(settings.credential_file)
    find = locate or discover(settings.service_registry_url, credential)
    # Revocations (for the bus messages it believes) come from the controller, found where the pages find it.
    trust = trust_from_settings(settings, credential=credential, controller_url=lambda: find(CONTROLLER))
    app = Flask(__name__)
    app.config.update(
        SERVICE_NAME="frontend",
        SECRET_KEY=settings.secret_key.get_secret_value(),
        SESSION_COOKIE_NAME="miaas_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies or (settings.public_url or "").lower().startswith("https:"),
        PERMANENT_SESSION_LIFETIME=timedelta(hours=settings.session_hours),
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
        MAX_UPLOAD_BYTES=settings.max_upload_bytes,
    )

    app.session_interface = _SessionCookies()
    if settings.trusted_proxy_hops:  # the client's address and scheme as the proxies in front of the portal saw them
        hops = settings.trusted_proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    if settings.password_scrypt_n < SCRYPT_N:
        log.warning("password hashes use scrypt N=%d, below OWASP's minimum: for tests only",
                    settings.password_scrypt_n)
    store = UserStore(settings.database_url, PasswordHasher(n=settings.password_scrypt_n))
    sessions = Sessions(store, timedelta(hours=settings.session_hours),
                        timedelta(minutes=settings.session_idle_minutes), clock)
    admin = store.ensure_admin(settings.admin_username, settings.admin_password.get_secret_value(), clock())
    if admin is not None:
        log.warning(
            "created the first admin user %r from FRONTEND_ADMIN_USERNAME / FRONTEND_ADMIN_PASSWORD; "
            "the password in the settings is not read again",
            admin.username,
        )
    backends = Backends(
        find,
        trust.credential,
        timeout_s=settings.backend_timeout_s,
        upload_timeout_s=settings.upload_timeout_s,
    )
    feed = LiveFeed()
    history = LoadHistory(settings.metrics_history_s)
    follower = BusFollower(settings.kafka_bootstrap, feed, history, time.monotonic,
                           checker=trust.message_checker()) if settings.consume_bus else None
    inspector = BusInspector(settings.kafka_bootstrap, time.monotonic)
    app.extensions.update({
        "miaas_trust": trust,
        "frontend.store": store, "frontend.sessions": sessions, "frontend.backends": backends, "frontend.feed": feed,
        "frontend.history": history, "frontend.follower": follower, "frontend.bus": inspector,
    })
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.globals["kafka_ui_url"] = settings.kafka_ui_url
    app.jinja_env.filters["when"] = _when
    app.jinja_env.filters["size"] = _size
    app.jinja_env.filters["ago"] = lambda value: _ago(value, clock())
    app.jinja_env.tests["web_url"] = is_web_url

    @app.before_request
    def _guard() -> Response | None:
        # Only the upload takes a large body, and only from a logged-in user: the login check below reads the
        # cookie (or the token), not the body, so nobody else can make the portal spool gigabytes to disk.
        if request.endpoint == "files.edit":
            request.max_content_length = EDIT_BODY_BYTES
        elif request.endpoint not in ("models.upload", "api.upload"):
            request.max_content_length = SMALL_BODY_BYTES
        if is_api_request():
            # A personal API token, and nothing else: the cookie is not even read here (see _SessionCookies), so
            # a page of another site cannot make a browser act through the API, and CSRF does not apply.
            given = bearer_token()
            found = store.token_user(given, clock(), TOUCH_EVERY) if given else None
            if found is None:
                raise Unauthorized("a valid personal API token is required (Authorization: Bearer <token>); "
                                   "create one on your Account page")
            g.user, g.token = found
            return None
        g.user = sessions.load()
        if g.user is None and request.endpoint is not None and request.endpoint not in PUBLIC_ENDPOINTS:
            return redirect(url_for("auth.login_form", next=_here() if request.method == "GET" else None))
        if request.method not in SAFE_METHODS:
            check_csrf()
        return None

    @app.context_processor
    def _user() -> dict[str, object]:
        return {"user": g.get("user")}

    @app.after_request
    def _harden(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.endpoint != "static":
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.get("/health")
    def health() -> Response:
        """Liveness of the portal."""
        return jsonify({"status": "ok", "service": "frontend", "version": __version__})

    app.register_blueprint(build_auth(store, sessions, settings, clock))
    app.register_blueprint(build_users(store, settings, clock))
    app.register_blueprint(build_models(backends))
    app.register_blueprint(build_files(backends))
    app.register_blueprint(build_deployments(backends, feed, StreamSlots(settings.max_event_streams),
                                             follows_bus=follower is not None, max_stream_s=settings.stream_max_s,
                                             session_alive=lambda sid: sessions.find(sid) is not None))
    app.register_blueprint(build_api(backends))
    app.register_blueprint(build_agents(backends, history, time.monotonic))
    app.register_blueprint(build_bus(inspector, settings, feed, follower))
    _install_error_pages(app)
    if follower is not None:
        follower.start()
    return app


class _SessionCookies(SecureCookieSessionInterface):
    """The signed session cookie (the session id, the CSRF token, the next page's notices), `Secure` whenever the
    request came over HTTPS (or the portal's URL is https, or FRONTEND_SECURE_COOKIES says it sits behind an HTTPS
    proxy, where it sees plain HTTP). On /api/v1 the cookie is neither read nor set."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or (has_request_context() and request.is_secure)

    def open_session(self, app: Flask, request: FlaskRequest) -> SecureCookieSession | None:
        if is_api_request(request):
            return self.session_class()
        return super().open_session(app, request)

    def save_session(self, app: Flask, session: SessionMixin, response: FlaskResponse) -> None:
        if is_api_request():
            return
        super().save_session(app, session, response)


def close_app(app: Flask) -> None:
    """End the live streams, stop following the bus and close the database."""
    app.extensions["frontend.feed"].close()
    follower: BusFollower | None = app.extensions.get("frontend.follower")
    if follower is not None:
        follower.stop()
    app.extensions["frontend.bus"].close()
    app.extensions["frontend.store"].close()
    trust: Trust = app.extensions["miaas_trust"]
    trust.stop()


def _install_error_pages(app: Flask) -> None:
    """Every error is a page of the portal with a sentence a person can read, never a traceback."""

    def page(status: int, title: str, message: str, code: str, details: object = None
             ) -> tuple[str | Response, int]:
        if is_api_request():  # the API answers the platform's one error shape
            return api_error(status, code, message, details), status
        if wants_json():  # the upload script shows the message itself
            return jsonify({"ok": False, "message": message, "problems": []}), status
        return render_template("error.html", status=status, title=title, message=message), status

    @app.errorhandler(MiaasError)
    def _ours(exc: MiaasError) -> tuple[str | Response, int]:
        return page(exc.status, "Request refused" if exc.status < 500 else "Service problem", exc.message,
                    exc.code, exc.details)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> tuple[str | Response, int]:
        status = exc.code or 500
        code = exc.name.lower().replace(" ", "_")
        if status == 413 and request.endpoint in ("models.upload", "api.upload"):
            limit = app.config["MAX_UPLOAD_BYTES"]
            return page(413, "Upload too large", f"The portal accepts uploads of up to {_size(limit)}.", code)
        return page(status, exc.name, exc.description or exc.name, code)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[str | Response, int]:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return page(500, "Something went wrong", "The portal hit an unexpected error; it has been logged.",
                    "internal_error")


def _here() -> str:
    query = request.query_string.decode("latin-1")
    return f"{request.path}?{query}" if query else request.path


def _when(value: datetime | None) -> str:
    if value is None:
        return "—"
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M UTC")


def _ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "—"
    seconds = (now - value).total_seconds()
    if seconds < 1:
        return "just now"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return _when(value)


def _size(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
