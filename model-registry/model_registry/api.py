"""HTTP routes of the model registry (seed 002 names kept: /registry/upload-and-validate, /registry/fetch-model)."""

from __future__ import annotations

from flask import Response, current_app, g, jsonify, request, send_file
from pydantic import Field

from miaas.errors import BadRequest
from miaas.identity import ADMIN, AGENT, CONTROLLER, FRONTEND
from miaas.schemas import (
    AliasRequest,
    EditRequest,
    FetchedVersion,
    FetchModelQuery,
    ModelDetail,
    ModelList,
    Request,
    UploadResult,
    VersionFiles,
)
from miaas.web import Api
from model_registry.registry import ModelRegistry
from model_registry.settings import ModelRegistrySettings
from model_registry.uploads import receive_upload
from model_registry.validation import MANIFEST

MAX_CALLER_LENGTH = 256

# Who may call what. Reading a version is for whoever deploys or runs it (the controller, agents) and for people
# (through the portal, or an operator); changing the registry is for people only.
READERS = (FRONTEND, ADMIN, CONTROLLER, AGENT)
WRITERS = (FRONTEND, ADMIN)


class ModelListQuery(Request):
    q: str = Field("", max_length=128, description="part of a model name or id, any case")
    offset: int = Field(0, ge=0, description="models to skip")
    limit: int | None = Field(None, ge=1, le=1000, description="most models to answer; every match when omitted")


def build_api(registry: ModelRegistry, settings: ModelRegistrySettings) -> Api:
    api = Api("model_registry")  # no default roles: a route that does not name its own makes the app refuse to build

    # streamed: a caller sending the zip as it reads it cannot sign its hash in advance (UNSIGNED-PAYLOAD)
    @api.route("/registry/upload-and-validate", "POST", response=UploadResult, status=201,
               content_type="multipart/form-data", allow=WRITERS, streamed=True)
    def upload_and_validate() -> UploadResult:
        """Validate a model zip (multipart: model_name, file) and store it as the model's next version."""
        name, spooled = receive_upload(settings.max_upload_bytes)
        published = registry.upload(name, spooled.received(), created_by=_caller())
        spooled.published = True
        return UploadResult(model=registry.to_wire(published.version), warnings=list(published.warnings))

    @api.route("/registry/fetch-model", query=FetchModelQuery, response=FetchedVersion, allow=READERS)
    def fetch_model(query: FetchModelQuery) -> FetchedVersion:
        """Where a version lives (path, checksums, download URL); model_id is an id or a name, version the latest."""
        record = registry.resolve(query.model_id, query.version, query.alias)
        download = f"/registry/models/{record.model_id}/versions/{record.version}/download"
        return FetchedVersion.model_validate({
            **registry.to_wire(record).model_dump(),
            "download_url": _base_url(settings) + download,
            "manifest_sha256": record.manifest_sha256,
        })

    @api.route("/registry/models", query=ModelListQuery, response=ModelList, allow=READERS)
    def list_models(query: ModelListQuery) -> Response:
        """Models with their versions, by name; `q` filters by part of the name or id, `offset`/`limit` page
        (a paged or filtered answer carries `total`, the number of matches)."""
        found, total = registry.search(query.q, query.offset, query.limit)
        paged = bool(query.q) or query.offset > 0 or query.limit is not None
        body = ModelList(models=found, total=total if paged else None)
        return Response(body.model_dump_json(exclude_none=True), mimetype="application/json")

    @api.route("/registry/models/<model_id>", response=ModelDetail, allow=READERS)
    def get_model(model_id: str) -> ModelDetail:
        """One model (by id or name) and all its versions."""
        summary, versions = registry.versions(model_id)
        return ModelDetail(model=summary, versions=versions)

    @api.route("/registry/models/<model_id>/versions/<int:version>/download", allow=READERS)
    def download_version(model_id: str, version: int) -> Response:
        """The zip of a version as it was uploaded (conditional and range requests supported)."""
        record = registry.fetch(model_id, version)
        return send_file(
            registry.zip_of(record), mimetype="application/zip", as_attachment=True,
            download_name=f"{record.name}-v{record.version}.zip", conditional=True, etag=record.sha256,
        )

    @api.route("/registry/models/<model_id>/versions/<int:version>/manifest", allow=READERS)
    def get_manifest(model_id: str, version: int) -> Response:
        """The version's MANIFEST.json byte for byte (its sha256 is fetch-model's `manifest_sha256`): what an agent
        pulling the version over HTTP checks the zip and every file against."""
        record = registry.fetch(model_id, version)
        return send_file(registry.path_of(record) / MANIFEST, mimetype="application/json", conditional=True,
                         etag=record.manifest_sha256, max_age=0)

    @api.route("/registry/models/<model_id>/versions/<int:version>", "DELETE", status=204, allow=WRITERS)
    def delete_version(model_id: str, version: int) -> Response:
        """Delete a version for good (409 while an alias points at it or a deployment uses it; its number is
        never reused)."""
        registry.delete_version(model_id, version, by=_caller())
        return Response(status=204)

    @api.route("/registry/models/<model_id>/versions/<int:version>/files", response=VersionFiles,
               allow=READERS)
    def list_files(model_id: str, version: int) -> VersionFiles:
        """The files of a version (path, size, sha256), from its MANIFEST.json."""
        record = registry.fetch(model_id, version)
        return VersionFiles(model_id=record.model_id, version=record.version, files=registry.manifest(record).files)

    @api.route("/registry/models/<model_id>/versions/<int:version>/files/<path:path>", allow=READERS)
    def get_file(model_id: str, version: int, path: str) -> Response:
        """One file of a version, looked up in its manifest: text/plain for text, application/octet-stream else."""
        record = registry.fetch(model_id, version)
        target, entry, text = registry.file_of(record, path)
        return send_file(target, mimetype="text/plain" if text else "application/octet-stream",
                         conditional=True, etag=entry.sha256, max_age=0)

    @api.route("/registry/models/<model_id>/versions/<int:version>/edit", "POST", body=EditRequest,
               response=UploadResult, status=201, allow=WRITERS)
    def edit_version(model_id: str, version: int, body: EditRequest) -> UploadResult:
        """A new version: a copy of this one with some text files replaced or added, validated like an upload."""
        published = registry.edit(model_id, version, dict(body.files), created_by=_caller())
        return UploadResult(model=registry.to_wire(published.version), warnings=list(published.warnings))

    @api.route("/registry/models/<model_id>/aliases", allow=READERS)
    def list_aliases(model_id: str) -> Response:
        """The aliases of a model: {alias: version}."""
        return jsonify(registry.aliases(model_id))

    @api.route("/registry/models/<model_id>/aliases/<alias>", "PUT", body=AliasRequest, allow=WRITERS)
    def set_alias(model_id: str, alias: str, body: AliasRequest) -> Response:
        """Point an alias at an existing version (creates or moves it); answers all the aliases."""
        return jsonify(registry.set_alias(model_id, alias, body.version, by=_caller()))

    @api.route("/registry/models/<model_id>/aliases/<alias>", "DELETE", status=204, allow=WRITERS)
    def delete_alias(model_id: str, alias: str) -> Response:
        """Remove an alias."""
        registry.delete_alias(model_id, alias)
        return Response(status=204)

    return api


def _caller() -> str:
    """Who is recorded as having made a change: the person the portal acts for (X-MIaaS-User), else the identity
    that signed the request (an operator's subject, e.g. `admin`)."""
    caller = str(g.caller)
    if len(caller) > MAX_CALLER_LENGTH:
        raise BadRequest(f"X-MIaaS-User is over {MAX_CALLER_LENGTH} characters", code="invalid_user")
    return caller


def _base_url(settings: ModelRegistrySettings) -> str:
    """This service's URL as other machines reach it: settings, else what run_service found, else this request."""
    return str(settings.public_url or current_app.config.get("PUBLIC_URL") or request.host_url).rstrip("/")
