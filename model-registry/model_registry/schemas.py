"""Wire schemas of the model registry that miaas.schemas does not hold (yet): candidates to move there.

Additive changes only; `schema_version` on the Kafka message and on the manifest that agents verify.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from miaas.schemas import ModelSummary, ModelVersion, Wire


class FetchedVersion(ModelVersion):
    """Answer of /registry/fetch-model: where a version lives, how to download it and how to verify it."""

    download_url: str = Field(description="the zip as uploaded (needs the service token)")
    manifest_sha256: str = Field(description="sha256 of MANIFEST.json in the version folder")


class ModelDetail(Wire):
    """Answer of /registry/models/<model_id>: the model and every version of it, oldest first."""

    model: ModelSummary
    versions: list[ModelVersion]


class ManifestFile(Wire):
    path: str = Field(description="relative to the version folder, '/'-separated")
    sha256: str
    size_bytes: int


class Manifest(Wire):
    """MANIFEST.json of a version folder: what an agent checks before it runs the model."""

    schema_version: Literal[1] = 1
    zip_sha256: str
    zip_size_bytes: int
    files: list[ManifestFile] = Field(description="every file of the version but MANIFEST.json, sorted by path")


class ModelEvent(Wire):
    """Message on `model-events` (key: model id): a version was created."""

    schema_version: Literal[1] = 1
    kind: Literal["version_created"] = "version_created"
    model_id: str
    name: str
    version: int
    sha256: str
    path: str
    created_by: str | None = None
    at: datetime
