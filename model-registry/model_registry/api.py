"""HTTP routes of the model registry (seed 002 names kept: /registry/upload-and-validate, /registry/fetch-model)."""

from __future__ import annotations

from flask import Response, current_app, g, request, send_file

from miaas.errors import BadRequest
from miaas.schemas import FetchedVersion, FetchModelQuery, ModelDetail, ModelList, UploadResult
from miaas.web import Api
from model_registry.registry import ModelRegistry
from model_registry.settings import ModelRegistrySettings
from model_registry.uploads import receive_upload

MAX_CALLER_LENGTH = 256


def build_api(registry: ModelRegistry, settings: ModelRegistrySettings) -> Api:
    api = Api("model_registry")

    @api.route("/registry/upload-and-validate", "POST", response=UploadResult, status=201,
               content_type="multipart/form-data")
    def upload_and_validate() -> UploadResult:
        """Validate a model zip (multipart: model_name, file) and store it as the model's next version."""
        name, spooled = receive_upload(settings.max_upload_bytes)
        published = registry.upload(name, spooled.received(), created_by=_caller())
        spooled.published = True
        return UploadResult(model=registry.to_wire(published.version), warnings=list(published.warnings))

    @api.route("/registry/fetch-model", query=FetchModelQuery, response=FetchedVersion)
    def fetch_model(query: FetchModelQuery) -> FetchedVersion:
        """Where a version lives (path, checksums, download URL); model_id is an id or a name, version the latest."""
        record = registry.fetch(query.model_id, query.version)
        download = f"/registry/models/{record.model_id}/versions/{record.version}/download"
        return FetchedVersion.model_validate({
            **registry.to_wire(record).model_dump(),
            "download_url": _base_url(settings) + download,
            "manifest_sha256": record.manifest_sha256,
        })

    @api.route("/registry/models", response=ModelList)
    def list_models() -> ModelList:
        """Every model with its versions, by name."""
        return ModelList(models=registry.summaries())

    @api.route("/registry/models/<model_id>", response=ModelDetail)
    def get_model(model_id: str) -> ModelDetail:
        """One model (by id or name) and all its versions."""
        summary, versions = registry.versions(model_id)
        return ModelDetail(model=summary, versions=versions)

    @api.route("/registry/models/<model_id>/versions/<int:version>/download")
    def download_version(model_id: str, version: int) -> Response:
        """The zip of a version as it was uploaded (conditional and range requests supported)."""
        record = registry.fetch(model_id, version)
        return send_file(
            registry.zip_of(record), mimetype="application/zip", as_attachment=True,
            download_name=f"{record.name}-v{record.version}.zip", conditional=True, etag=record.sha256,
        )

    return api


def _caller() -> str:
    caller = str(g.caller)
    if len(caller) > MAX_CALLER_LENGTH:
        raise BadRequest(f"X-MIaaS-User is over {MAX_CALLER_LENGTH} characters", code="invalid_user")
    return caller


def _base_url(settings: ModelRegistrySettings) -> str:
    """This service's URL as other machines reach it: settings, else what run_service found, else this request."""
    return str(settings.public_url or current_app.config.get("PUBLIC_URL") or request.host_url).rstrip("/")
