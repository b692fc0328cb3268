"""Flask helpers shared by the services: typed routes, OpenAPI, auth, one JSON error shape, serving.

A route declares its query and body schemas; the same pydantic models validate the request and
produce `/openapi.json`, so the document cannot drift from the code.
"""

from __future__ import annotations

import functools
import hmac
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, g, jsonify, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException

from miaas import __version__
from miaas.errors import BadRequest, MiaasError, Unauthorized

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


@dataclass
class Api:
    """A blueprint whose routes validate with pydantic and are collected into an OpenAPI document."""

    name: str
    blueprint: Blueprint = field(init=False)
    operations: list[Operation] = field(default_factory=list)
    public_endpoints: set[str] = field(default_factory=set)

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
    ) -> Callable[[F], F]:
        """Register a view; it receives `query=` and `body=` models and may return a model."""

        def decorate(view: F) -> F:
            summary = (view.__doc__ or view.__name__).strip().splitlines()[0]
            self.operations.append(
                Operation(rule, method, summary, query, body, response, status, public, content_type)
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

            if public:
                self.public_endpoints.add(f"{self.name}.{view.__name__}")
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
                entry["security"] = [{"serviceToken": []}]
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
            "securitySchemes": {"serviceToken": {"type": "http", "scheme": "bearer"}},
        },
    }


def bearer_token() -> str | None:
    """The bearer token of the current request, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the cluster's."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def error_response(exc: MiaasError) -> Response:
    response = jsonify(exc.to_body())
    response.status_code = exc.status
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="miaas"'
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


def create_service_app(
    name: str, service_token: str, apis: Iterable[Api], *, import_name: str = __name__
) -> Flask:
    """A Flask app with /health, /openapi.json, service-token auth on every other route and JSON errors."""
    apis = list(apis)
    app = Flask(import_name)
    app.config["SERVICE_NAME"] = name
    install_errors(app)
    meta = Api("meta")

    @meta.route("/health", public=True, response=None)
    def health() -> Response:
        """Liveness of the service."""
        return jsonify({"status": "ok", "service": name, "version": __version__})

    @meta.route("/openapi.json")
    def openapi() -> Response:
        """The OpenAPI document of this service."""
        return jsonify(openapi_document(f"MIaaS {name}", [meta, *apis]))

    public = set().union(*(api.public_endpoints for api in [meta, *apis]))

    @app.before_request
    def _authenticate() -> None:
        if request.endpoint in public or request.endpoint is None:
            return
        if not token_matches(bearer_token(), service_token):
            raise Unauthorized("a valid service token is required (Authorization: Bearer <token>)")
        g.caller = request.headers.get("X-MIaaS-User", "service")

    for api in [meta, *apis]:
        app.register_blueprint(api.blueprint)
    return app
