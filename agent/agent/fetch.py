"""Where a model version lives: asked of the model registry, found through the service registry."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from miaas.client import ServiceClient
from miaas.discovery import Discovery
from miaas.errors import Unavailable, UpstreamError
from miaas.identity import CredentialSource
from miaas.schemas import PackageMeta, Wire


class FetchedModel(Wire):
    """The part of the model registry's /registry/fetch-model answer the agent uses."""

    path: str
    meta: PackageMeta
    manifest_sha256: str | None = None


@dataclass(frozen=True)
class ModelSource:
    """One model version ready to run: its read-only folder and its meta.json."""

    path: Path
    meta: PackageMeta
    manifest_sha256: str | None = None
    """sha256 of the folder's MANIFEST.json as the model registry recorded it."""


FetchModel = Callable[[str, int], ModelSource]
"""(model_id, version) → ModelSource; raises MiaasError subclasses."""


class RegistryFetcher:
    """Fetches versions from the model registry, signed as the agent; no network until the first call."""

    def __init__(self, service_registry_url: str | None, credential: CredentialSource, *,
                 timeout: float = 10.0) -> None:
        self.service_registry_url = service_registry_url
        self.credential = credential
        self.timeout = timeout
        self._discovery: Discovery | None = None
        self._lock = threading.Lock()

    def __call__(self, model_id: str, version: int) -> ModelSource:
        if not self.service_registry_url:
            raise Unavailable("no service registry configured (MIAAS_SERVICE_REGISTRY_URL): cannot find models")
        with self._lock:
            if self._discovery is None:
                self._discovery = Discovery(self.service_registry_url, self.credential)
        url = self._discovery.lookup("model-registry")
        client = ServiceClient(url, self.credential, timeout=self.timeout)
        try:
            answer = client.get("/registry/fetch-model", params={"model_id": model_id, "version": version})
        finally:
            client.close()
        try:
            fetched = FetchedModel.model_validate(answer)
        except ValidationError as exc:
            raise UpstreamError(f"the model registry's answer for {model_id} v{version} is malformed: {exc}") from exc
        return local_source(Path(fetched.path), fetched.meta, fetched.manifest_sha256)


def local_source(path: Path, meta: PackageMeta, manifest_sha256: str | None = None) -> ModelSource:
    """A version folder as seen from this machine; 503 when the model store does not show it here."""
    if not path.is_absolute():
        raise UpstreamError(f"the model registry gave a relative path {str(path)!r}")
    if not path.is_dir():
        raise Unavailable(f"model folder {path} is not visible on this agent (is the model store mounted?)")
    return ModelSource(path, meta, manifest_sha256)
