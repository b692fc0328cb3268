"""Where a model version lives: asked of the model registry, found through the service registry; and, for an agent
without the model store (AGENT_MODEL_FILES=http, or auto without it), pulled over HTTP into the local model cache.

`nfs`: the version folder on the model store as mounted here (the production path). `http`: the version is pulled
from the registry into agent.cache.ModelCache while the deployment provisions. `auto`: the store when it shows the
version here, else `http`. With a cache, a cached version still starts while the registry is unreachable: its
fetch-model answer is kept beside its files.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, TypeVar
from urllib.parse import quote

import requests
from pydantic import ValidationError

from agent.cache import CHUNK, ModelCache, PullFailed
from agent.verify import MANIFEST
from miaas.client import ServiceClient, SignedSession
from miaas.discovery import Discovery
from miaas.errors import Unavailable, UpstreamError
from miaas.identity import CredentialSource
from miaas.schemas import FetchedVersion, PackageMeta, Wire

log = logging.getLogger(__name__)

W = TypeVar("W", bound=Wire)

ModelFiles = Literal["nfs", "http", "auto"]
"""How model files reach this agent (AGENT_MODEL_FILES)."""


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
    pull: Callable[[], Path] | None = None
    """Set when the files come over HTTP: called while provisioning, it returns the folder pulled and verified in
    the model cache (`path`, where it will be). Without it, `path` is there already and is verified before use."""


FetchModel = Callable[[str, int], ModelSource]
"""(model_id, version) → ModelSource; raises MiaasError subclasses."""


class RegistryFetcher:
    """Fetches versions from the model registry, signed as the agent; no network until the first call.

    With a `cache` it also pulls versions (agent.cache.VersionSource) for `files` http or auto."""

    def __init__(self, service_registry_url: str | None, credential: CredentialSource, *,
                 timeout: float = 10.0, files: ModelFiles = "nfs", cache: ModelCache | None = None,
                 read_timeout: float = 60.0) -> None:
        if files != "nfs" and cache is None:
            raise ValueError(f"model files over {files} need a model cache")
        self.service_registry_url = service_registry_url
        self.credential = credential
        self.timeout = timeout
        self.read_timeout = read_timeout
        self.files = files
        self.cache = cache
        self._discovery: Discovery | None = None
        self._lock = threading.Lock()

    def __call__(self, model_id: str, version: int) -> ModelSource:
        try:
            answer = self._ask(model_id, version)
        except (Unavailable, UpstreamError) as exc:
            kept = self.cache.cached_answer(model_id, version) if self.cache is not None else None
            if kept is None:
                raise
            log.warning("the model registry cannot be asked for %s v%d (%s): starting it from the model cache",
                        model_id, version, exc.message)
            return self._pulled(model_id, version, kept)
        fetched = _parse(FetchedModel, answer, model_id, version)
        path = Path(fetched.path)
        if self.files == "nfs" or (self.files == "auto" and path.is_absolute() and (path / MANIFEST).is_file()):
            return local_source(path, fetched.meta, fetched.manifest_sha256)
        return self._pulled(model_id, version, _parse(FetchedVersion, answer, model_id, version))

    def _pulled(self, model_id: str, version: int, answer: FetchedVersion) -> ModelSource:
        cache = self.cache
        assert cache is not None
        return ModelSource(cache.folder_of(answer), answer.meta, answer.manifest_sha256,
                           pull=lambda: cache.get(model_id, version, answer))

    def _registry_url(self) -> str:
        if not self.service_registry_url:
            raise Unavailable("no service registry configured (MIAAS_SERVICE_REGISTRY_URL): cannot find models")
        with self._lock:
            if self._discovery is None:
                self._discovery = Discovery(self.service_registry_url, self.credential)
        return self._discovery.lookup("model-registry")

    def _ask(self, model_id: str, version: int) -> object:
        client = ServiceClient(self._registry_url(), self.credential, timeout=self.timeout)
        try:
            return client.get("/registry/fetch-model", params={"model_id": model_id, "version": version})
        finally:
            client.close()

    # ------------------------------------------------------------------ agent.cache.VersionSource

    def read_manifest(self, answer: FetchedVersion, limit: int) -> bytes:
        out = io.BytesIO()
        self._stream(answer, "manifest", out, limit)
        return out.getvalue()

    def download_zip(self, answer: FetchedVersion, out: BinaryIO, limit: int) -> None:
        self._stream(answer, "download", out, limit)

    def _stream(self, answer: FetchedVersion, what: str, out: BinaryIO, limit: int) -> None:
        """GET a version's manifest or zip into `out`, refused past `limit` bytes (before reading when the
        length is announced)."""
        path = f"/registry/models/{quote(answer.model_id, safe='')}/versions/{answer.version}/{what}"
        url = self._registry_url() + path
        session = SignedSession(self.credential)
        try:
            with session.get(url, stream=True, timeout=(self.timeout, self.read_timeout)) as resp:
                if resp.status_code >= 400:
                    raise UpstreamError(f"GET {url} answered {resp.status_code}: {resp.text[:200]}")
                announced = resp.headers.get("Content-Length", "")
                if announced.isdigit() and int(announced) > limit:
                    raise PullFailed(f"its {what} announces {announced} bytes, more than the {limit} its "
                                     "manifest allows: refusing it")
                received = 0
                for chunk in resp.iter_content(CHUNK):
                    received += len(chunk)
                    if received > limit:
                        raise PullFailed(f"its {what} is longer than the {limit} bytes its manifest allows: "
                                         "refusing it")
                    out.write(chunk)
        except requests.RequestException as exc:
            raise UpstreamError(f"GET {url} failed: {exc.__class__.__name__}: {exc}") from exc
        finally:
            session.close()


def _parse(schema: type[W], answer: object, model_id: str, version: int) -> W:
    try:
        return schema.model_validate(answer)
    except ValidationError as exc:
        raise UpstreamError(f"the model registry's answer for {model_id} v{version} is malformed: {exc}") from exc


def local_source(path: Path, meta: PackageMeta, manifest_sha256: str | None = None) -> ModelSource:
    """A version folder as seen from this machine; 503 when the model store does not show it here."""
    if not path.is_absolute():
        raise UpstreamError(f"the model registry gave a relative path {str(path)!r}")
    if not path.is_dir():
        raise Unavailable(f"model folder {path} is not visible on this agent (is the model store mounted?)")
    return ModelSource(path, meta, manifest_sha256)
