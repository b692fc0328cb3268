"""Flask helpers shared by the services: typed routes, OpenAPI, authentication by identity, one JSON error shape.

A route declares its query and body schemas; the same pydantic models validate the request and
produce `/openapi.json`, so the document cannot drift from the code.

Every route that is not public names the roles that may call it (`allow=`, or its `Api`'s default). A request is
authenticated by its signature (`miaas.identity`: the caller's certificate, signed method, target, Host, time,
nonce and body hash); `g.identity` is then the caller's certificate and `g.caller` who it acts for: the person
named in `X-MIaaS-User` (accepted from the portal only) or the identity's subject.
"""

from __future__ import annotations

import functools
import hmac
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, g, jsonify, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException

from miaas import __version__, identity
from miaas.errors import BadRequest, Forbidden, MiaasError, Unauthorized
from miaas.metrics import CONTENT_TYPE_LATEST, UNMATCHED, ServiceMetrics, counter

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Operation:
    """One documented route."""

    rule: str
    method: str
    summary: str
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    public: bool = False
    content_type: str | None = None
    allow: tuple[str, ...] = ()


@dataclass
class Access:
    """Who may call one endpoint: nobody signed (public), or the listed roles; and whether its body is streamed
    (a multipart upload whose hash the caller signs as UNSIGNED-PAYLOAD)."""

    public: bool
    allow: frozenset[str]
    streamed: bool = False


@dataclass
class Api:
    """A blueprint whose routes validate with pydantic and are collected into an OpenAPI document.

    `allow` is the roles every route of it accepts unless the route names its own."""

    name: str
    allow: tuple[str, ...] = ()
    blueprint: Blueprint = field(init=False)
    operations: list[Operation] = field(default_factory=list)
    access: dict[str, Access] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.blueprint = Blueprint(self.name, __name__)

    def route(
        self,
        rule: str,
        method: str = "GET",
        *,
        query: type[BaseModel] | None = None,
        body: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        status: int = 200,
        public: bool = False,
        content_type: str | None = None,
        allow: Iterable[str] | None = None,
        streamed: bool = False,
    ) -> Callable[[F], F]:
        """Register a view; it receives `query=` and `body=` models and may return a model.

        `allow`: the roles that may call it (default: the Api's); `public`: anyone, unsigned."""
        roles = tuple(self.allow if allow is None else allow)
        unknown = set(roles) - set(identity.ROLES)
        if unknown:
            raise ValueError(f"{rule}: unknown roles {sorted(unknown)}")
        if not public and not roles:
            raise ValueError(f"{method} {rule} is neither public nor allowed to any role")

        def decorate(view: F) -> F:
            summary = (view.__doc__ or view.__name__).strip().splitlines()[0]
            self.operations.append(
                Operation(rule, method, summary, query, body, response, status, public, content_type,
                          () if public else roles)
            )

            @functools.wraps(view)
            def wrapper(**path_args: Any) -> Any:
                kwargs: dict[str, Any] = dict(path_args)
                if query is not None:
                    kwargs["query"] = parse(query, request.args.to_dict(), "query")
                if body is not None:
                    data = request.get_json(silent=True)
                    if data is None:
                        raise BadRequest("request body must be a JSON object", code="invalid_json")
                    kwargs["body"] = parse(body, data, "body")
                result = view(**kwargs)
                if isinstance(result, BaseModel):
                    return Response(result.model_dump_json(), status=status, mimetype="application/json")
                return result

            self.access[f"{self.name}.{view.__name__}"] = Access(public, frozenset(roles), streamed)
            self.blueprint.add_url_rule(rule, view.__name__, wrapper, methods=[method])
            return view

        return decorate


def parse(model: type[BaseModel], data: Any, where: str) -> Any:
    """Validate data against model; a failure is a 400 listing every field in error."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in err["loc"]) or where, "message": err["msg"]}
            for err in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise BadRequest(f"invalid {where}: {summary}", details=problems, code="validation_error") from exc


def openapi_document(title: str, apis: Iterable[Api]) -> dict[str, Any]:
    """Build the OpenAPI 3.1 document of every route from the schemas that validate it."""
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error_schema = {"schema": {"$ref": "#/components/schemas/Error"}}
    error = {"description": "error", "content": {"application/json": error_schema}}
    for api in apis:
        for op in api.operations:
            path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", op.rule)
            entry: dict[str, Any] = {"summary": op.summary, "responses": {"default": error}}
            if op.query is not None:
                query_schema = op.query.model_json_schema()
                props = query_schema.get("properties", {})
                required = set(query_schema.get("required", []))
                entry["parameters"] = [
                    {"name": n, "in": "query", "required": n in required, "schema": s} for n, s in props.items()
                ]
            if op.body is not None:
                entry["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(op.body)}}}
            if op.content_type:
                entry["requestBody"] = {"required": True, "content": {op.content_type: {"schema": {"type": "object"}}}}
            ok: dict[str, Any] = {"description": "success"}
            if op.response is not None:
                ok["content"] = {"application/json": {"schema": ref(op.response)}}
            entry["responses"][str(op.status)] = ok
            if not op.public:
                entry["security"] = [{"miaasSignature": []}]
                entry["x-miaas-roles"] = list(op.allow)
            paths.setdefault(path, {})[op.method.lower()] = entry
    schemas["Error"] = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}},
                "required": ["code", "message"],
            }
        },
        "required": ["error"],
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"miaasSignature": {
                "type": "apiKey", "in": "header", "name": identity.SIGNATURE_HEADER,
                "description": "a request signed by a cluster identity (see miaas.identity): "
                               f"{identity.CERT_HEADER} carries the certificate, {identity.SIGNATURE_HEADER} "
                               "the signature over method, target, Host, time, nonce and body hash"}},
        },
    }


def error_response(exc: MiaasError) -> Response:
    response = jsonify(exc.to_body())
    response.status_code = exc.status
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'MIaaS-Signature realm="miaas"'
    return response


def install_errors(app: Flask) -> None:
    """Render every error, ours or Flask's, as the one JSON error shape."""

    @app.errorhandler(MiaasError)
    def _ours(exc: MiaasError) -> Response:
        if exc.status >= 500:
            log.warning("%s: %s", exc.code, exc.message)
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        err = MiaasError(exc.description or exc.name, code=exc.name.lower().replace(" ", "_"))
        err.status = exc.code or 500
        return error_response(err)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(MiaasError("internal error; see the service log"))


USER_HEADER = "X-MIaaS-User"
BAD_METRICS_TOKEN = "bad_metrics_token"
METRICS_ENDPOINT = "meta.metrics_text"
MAX_USER_LENGTH = 200


class RevocationList:
    """The serials the cluster has revoked, fetched from the controller every `interval_s` by a background thread.

    `fetch` answers the current list (or raises); a failed fetch keeps the last list, so an unreachable controller
    never un-revokes anyone. `update` sets it directly (the controller itself, tests)."""

    def __init__(self, fetch: Callable[[], Iterable[str]] | None = None, *, interval_s: float = 3.0) -> None:
        self.fetch = fetch
        self.interval_s = interval_s
        self._serials: frozenset[str] = frozenset()
        self.fetched_at: float | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self) -> frozenset[str]:
        return self._serials

    def update(self, serials: Iterable[str]) -> None:
        self._serials = frozenset(serials)
        self.fetched_at = time.time()

    def refresh(self) -> bool:
        if self.fetch is None:
            return False
        try:
            self.update(self.fetch())
            self.last_error = None
            return True
        except Exception as exc:  # noqa: BLE001 - the controller may be down; the last list stays in force
            self.last_error = f"{exc.__class__.__name__}: {str(exc)[:200]}"
            return False

    def start(self) -> RevocationList:
        if self.fetch is not None and self._thread is None:
            self.refresh()
            self._thread = threading.Thread(target=self._run, name="revocations", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()


class ServiceAuth:
    """Authenticates the signed requests of one service: the CA's public key, revocations, and the nonces seen.

    Refusals are counted per reason (`refused`). `metrics_token` (MIAAS_METRICS_TOKEN), when set, is a bearer token
    that lets a scraper which cannot sign (Prometheus) read `/metrics`, and nothing else."""

    def __init__(self, verifier: identity.Verifier, *, max_skew_s: float = identity.MAX_SKEW_S,
                 metrics_token: str | None = None) -> None:
        self.verifier = verifier
        self.metrics_token = metrics_token
        self.nonces = identity.NonceCache(window_s=2 * max_skew_s)
        self.max_skew_s = max_skew_s
        self.refused: dict[str, int] = {}
        self._lock = threading.Lock()

    def authenticate(self, streamed: bool) -> identity.Certificate:
        """The certificate of the current request's signer; Unauthorized (401) when it is not genuinely signed."""
        env = request.environ
        # The path as sent (still percent-encoded) and the query: servers differ on whether REQUEST_URI holds it.
        path = (env.get("RAW_URI") or env.get("REQUEST_URI") or request.path).partition("?")[0]
        query = env.get("QUERY_STRING", "")
        target = path + (f"?{query}" if query else "")
        body: Callable[[], bytes] | None = None if streamed else (lambda: request.get_data(cache=True))
        try:
            return identity.check_request(
                self.verifier, self.nonces, cert_token=request.headers.get(identity.CERT_HEADER),
                signature=request.headers.get(identity.SIGNATURE_HEADER), method=request.method, target=target,
                host=request.headers.get("Host", ""), body=body, now=time.time(), max_skew_s=self.max_skew_s,
                user=request.headers.get(USER_HEADER))
        except identity.Refused as exc:
            with self._lock:
                self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            raise Unauthorized(f"request refused ({exc.reason}): {exc}", code="unauthenticated",
                               details={"reason": exc.reason}) from exc

    def scraper(self) -> bool:
        """Whether the current request is a scraper's: it carries `Authorization: Bearer <MIAAS_METRICS_TOKEN>`.

        False without a bearer header, or when no token is set (the request must then be signed); a wrong token is
        refused (401, reason `bad_metrics_token`), compared in constant time."""
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if self.metrics_token is None or scheme.lower() != "bearer":
            return False
        if hmac.compare_digest(given.strip().encode(), self.metrics_token.encode()):
            return True
        with self._lock:
            self.refused[BAD_METRICS_TOKEN] = self.refused.get(BAD_METRICS_TOKEN, 0) + 1
        raise Unauthorized("request refused (bad_metrics_token): the bearer token is not this service's "
                           "MIAAS_METRICS_TOKEN", code="unauthenticated", details={"reason": BAD_METRICS_TOKEN})


def create_service_app(
    name: str, auth: ServiceAuth, apis: Iterable[Api], *, import_name: str = __name__
) -> Flask:
    """A Flask app with public /health and /openapi.json, /metrics, every other route signed by an allowed role,
    JSON errors.

    `/metrics` (Prometheus' text format) answers any signed identity, or a scraper with the bearer token
    `auth.metrics_token` when one is set; `app.extensions["miaas_metrics"]` is the app's `ServiceMetrics`, to
    which a service adds its own metrics."""
    apis = list(apis)
    app = Flask(import_name, static_folder=None)  # no /static route: every route of a service names its roles
    app.config["SERVICE_NAME"] = name
    app.extensions["miaas_auth"] = auth
    metrics = ServiceMetrics(name)
    app.extensions["miaas_metrics"] = metrics
    install_errors(app)
    meta = Api("meta")

    # Measured first and answered last, so a refused request (401, 403) is counted as well.
    @app.before_request
    def _start_clock() -> None:
        g.miaas_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        started = g.get("miaas_started")
        if started is not None:
            route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
            metrics.observe_request(route, request.method, response.status_code, time.perf_counter() - started)
        return response

    @meta.route("/health", public=True, response=None)
    def health() -> Response:
        """Liveness of the service."""
        return jsonify({"status": "ok", "service": name, "version": __version__})

    @meta.route("/openapi.json", public=True)
    def openapi() -> Response:
        """The OpenAPI document of this service."""
        return jsonify(openapi_document(f"MIaaS {name}", [meta, *apis]))

    @meta.route("/metrics", allow=identity.ROLES)
    def metrics_text() -> Response:
        """This service's metrics in Prometheus' text format (any identity, or the scrapers' bearer token)."""
        return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)

    access: dict[str, Access] = {}
    for api in [meta, *apis]:
        access.update(api.access)

    @app.before_request
    def _authenticate() -> None:
        rule = access.get(request.endpoint or "")
        if rule is None or rule.public:
            return  # an unknown route answers 404 by itself
        if request.endpoint == METRICS_ENDPOINT and auth.scraper():
            return
        cert = auth.authenticate(rule.streamed)
        if cert.role not in rule.allow:
            raise Forbidden(f"{cert.role} {cert.subject} may not call {request.method} {request.path} "
                            f"(allowed: {', '.join(sorted(rule.allow))})", code="forbidden_role")
        user = request.headers.get(USER_HEADER)
        if user is not None:
            if cert.role != identity.FRONTEND:
                raise Forbidden(f"only the portal may act for a person ({USER_HEADER}); {cert.subject} may not",
                                code="forbidden_user_header")
            if not user.strip() or len(user) > MAX_USER_LENGTH:
                raise BadRequest(f"{USER_HEADER} must be 1 to {MAX_USER_LENGTH} characters", code="invalid_user")
        g.identity = cert
        g.caller = user if user is not None else cert.subject

    def refusals() -> list[Any]:
        with auth._lock:
            counts: dict[tuple[str, ...], float] = {(name, reason): n for reason, n in auth.refused.items()}
        return [counter("miaas_http_refused", "Requests refused as not genuinely signed (or a wrong metrics token), "
                        "by reason", ["service", "reason"], counts)]

    metrics.collect_with("refusals", refusals)
    for api in [meta, *apis]:
        app.register_blueprint(api.blueprint)
    return app
