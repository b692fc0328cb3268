"""The model cache: versions pulled over HTTP from a real model registry (found through a real service registry),
verified as hostile input, read-only, evicted least recently used under a byte limit, kept across restarts, and
served while the registry is down; and a deployment of an agent with AGENT_MODEL_FILES=http end to end."""
# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from agent_kit import REQUIREMENTS, TINY_APP
from flask import Flask, request
from sqlalchemy import text

from agent.app import create_app, parts
from agent.cache import CacheFull, ModelCache, PullFailed
from agent.fetch import RegistryFetcher
from agent.runtimes.vagrant import VagrantRuntime, VmGuard
from agent.runtimes.vagrantfile import VagrantConfig
from agent.runtimes.wheelhouse import Wheelhouse
from agent.settings import AgentSettings
from miaas.bus import MemoryBus
from miaas.client import ServiceClient
from miaas.errors import UpstreamError
from miaas.identity import AGENT, CONTROLLER, fixed
from miaas.schemas import FetchedVersion, Manifest
from miaas.serve import Server
from miaas.testing import Pki
from model_registry.app import create_app as create_registry
from model_registry.settings import ModelRegistrySettings
from model_registry.testing import Entry, make_zip, registry
from service_registry.app import create_app as create_service_registry
from service_registry.settings import ServiceRegistrySettings

META = {"setup_commands": ["echo setting up"], "start_commands": ["python app.py"], "health_path": "/health",
        "resources": {"cpus": 0.1, "memory_mb": 64}}


def package(weights: bytes = b"not really weights", **extra: bytes | str) -> dict[str, bytes | str]:
    """The tiny test model as a package: it really runs (standard library only)."""
    return {"meta.json": json.dumps(META), "app.py": TINY_APP, "requirements.txt": REQUIREMENTS,
            "model.pth": weights, **extra}


@dataclass
class Cluster:
    """A real model registry and service registry over HTTP, the registry's downloads counted."""

    app: Flask
    server: Server
    book: Server
    pki: Pki
    downloads: list[str]

    def upload(self, files: dict[str, Any], name: str = "tiny") -> str:
        portal = self.pki.client(self.app, "frontend")
        sent = portal.post("/registry/upload-and-validate", data={
            "model_name": name, "file": (io.BytesIO(make_zip(files)), "model.zip", "application/zip")})
        assert sent.status_code == 201, sent.json
        return str(sent.json["model"]["model_id"])

    def answer(self, model_id: str, version: int = 1) -> FetchedVersion:
        found = self.pki.client(self.app, AGENT).get("/registry/fetch-model",
                                                     query_string={"model_id": model_id, "version": version})
        assert found.status_code == 200, found.json
        return FetchedVersion.model_validate(found.json)

    def serve_instead(self, model_id: str, zipped: bytes, files: list[dict[str, Any]] | None = None,
                      version: int = 1) -> None:
        """Make the registry serve another zip for a version, consistently: its MANIFEST.json then records that
        zip (and `files`, or the files it listed) and the registry's database that MANIFEST.json: a hostile or
        broken registry whose answers agree with each other."""
        reg = registry(self.app)
        record = reg.fetch(model_id, version)
        archive, folder = reg.zip_of(record), reg.path_of(record)
        old = Manifest.model_validate_json((folder / "MANIFEST.json").read_bytes())
        manifest = {"schema_version": 1, "zip_sha256": hashlib.sha256(zipped).hexdigest(),
                    "zip_size_bytes": len(zipped),
                    "files": files if files is not None else [f.model_dump() for f in old.files]}
        raw = json.dumps(manifest, indent=2).encode()
        for path, data in ((archive, zipped), (folder / "MANIFEST.json", raw)):
            os.chmod(path.parent, 0o755)
            path.unlink()
            path.write_bytes(data)
        with reg.store.engine.begin() as conn:
            conn.execute(text("UPDATE versions SET manifest_sha256 = :h WHERE model_id = :m AND version = :v"),
                         {"h": hashlib.sha256(raw).hexdigest(), "m": model_id, "v": version})


@pytest.fixture
def cluster(pki: Pki, workdir: Path, serve: Callable[[Flask], Server]) -> Iterator[Cluster]:
    app = create_registry(ModelRegistrySettings(**pki.settings("model-registry"), model_store=workdir / "models",
                                                database_url=f"sqlite:///{workdir / 'registry.db'}"), MemoryBus())
    downloads: list[str] = []

    @app.before_request
    def count() -> None:  # after the registry's own check of the caller: only answered downloads count
        if request.path.endswith("/download"):
            downloads.append(request.path)

    server = serve(app)
    book = serve(create_service_registry(ServiceRegistrySettings(**pki.settings("service-registry"))))
    as_registry = ServiceClient(book.url, pki.credential("model-registry"))
    as_registry.post("/register", json={"name": "model-registry", "url": server.url})
    as_registry.close()
    yield Cluster(app, server, book, pki, downloads)
    registry(app).store.close()


@pytest.fixture
def fetcher_for(cluster: Cluster, pki: Pki) -> Callable[[ModelCache], RegistryFetcher]:
    """A fetcher over HTTP signed as an agent, pulling into the given cache (which it becomes the source of)."""

    def make(cache: ModelCache) -> RegistryFetcher:
        fetcher = RegistryFetcher(cluster.book.url, fixed(pki.credential("agent-test-1", AGENT)), files="http",
                                  cache=cache)
        cache.source = fetcher
        return fetcher

    return make


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def make_cache(workdir: Path, fetcher_for: Callable[[ModelCache], RegistryFetcher]) -> Callable[..., ModelCache]:
    def make(max_bytes: int = 1 << 30, **kw: Any) -> ModelCache:
        cache = ModelCache(workdir / "cache", max_bytes=max_bytes, clock=kw.pop("clock", Clock()), **kw)
        fetcher_for(cache)
        return cache.open()

    return make


def left_in(cache: ModelCache) -> list[str]:
    """Every path under the cache's root but the index, relative to it."""
    return sorted(p.relative_to(cache.root).as_posix() for p in cache.root.rglob("*") if p.name != "index.json")


# --------------------------------------------------------------------------- pulling


def test_a_version_is_pulled_once_verified_and_read_only(cluster: Cluster, make_cache: Callable[..., ModelCache],
                                                         fetcher_for: Callable[[ModelCache], RegistryFetcher]) -> None:
    # given a version in the registry and an agent's empty cache
    model_id = cluster.upload(package(sub=b"", **{"data/table.csv": "a,b\n1,2\n"}))
    cache = make_cache()
    fetcher = fetcher_for(cache)

    # when the agent fetches it over HTTP
    source = fetcher(model_id, 1)
    assert source.pull is not None and not source.path.exists()  # nothing is pulled until provisioning
    folder = source.pull()

    # then the folder holds exactly the package's files and the registry's MANIFEST.json, read-only
    assert folder == source.path == cache.root / model_id / "1" / "model"
    assert (folder / "model.pth").read_bytes() == b"not really weights"
    assert (folder / "data" / "table.csv").read_text() == "a,b\n1,2\n"
    assert hashlib.sha256((folder / "MANIFEST.json").read_bytes()).hexdigest() == source.manifest_sha256
    modes = {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}
    assert modes == {"meta.json": 0o444, "app.py": 0o444, "requirements.txt": 0o444, "model.pth": 0o444,
                     "sub": 0o444, "data": 0o555, "data/table.csv": 0o444, "MANIFEST.json": 0o444}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o555
    assert cluster.downloads == [f"/registry/models/{model_id}/versions/1/download"]
    # and its answer is kept beside it, and the index and the usage say what it holds
    assert FetchedVersion.model_validate_json((folder.parent / "answer.json").read_bytes()).model_id == model_id
    usage = cache.usage()
    assert (usage.entries, usage.pulls, usage.hits) == (1, 1, 0)
    assert usage.used_bytes == sum(p.stat().st_size for p in folder.parent.rglob("*") if p.is_file())
    index = json.loads((cache.root / "index.json").read_text())
    assert [(e["model_id"], e["version"]) for e in index["entries"]] == [(model_id, 1)]
    assert list((cache.root / ".tmp").iterdir()) == []

    # when it is fetched again, by name
    again = fetcher("tiny", 1)
    assert again.pull is not None and again.pull() == folder

    # then it comes from the cache: no second download
    assert len(cluster.downloads) == 1
    assert cache.usage().hits == 1


def test_concurrent_gets_of_one_version_download_it_once(cluster: Cluster,
                                                         make_cache: Callable[..., ModelCache]) -> None:
    model_id = cluster.upload(package(weights=random.Random(1).randbytes(300_000)))
    cache = make_cache()
    answer = cluster.answer(model_id)
    start = threading.Barrier(8)
    got: list[Path] = []

    def get() -> None:
        start.wait()
        got.append(cache.get(model_id, 1, answer))

    threads = [threading.Thread(target=get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and set(got) == {cache.root / model_id / "1" / "model"}
    assert len(cluster.downloads) == 1
    assert (cache.usage().pulls, cache.usage().hits) == (1, 7)


# --------------------------------------------------------------------------- hostile downloads


def test_a_zip_that_is_not_the_one_the_manifest_records_is_refused_and_leaves_nothing(
    cluster: Cluster, make_cache: Callable[..., ModelCache]
) -> None:
    # given a registry whose stored zip was changed after the upload (the manifest still records the original)
    model_id = cluster.upload(package())
    reg = registry(cluster.app)
    archive = reg.zip_of(reg.fetch(model_id, 1))
    original = archive.read_bytes()
    os.chmod(archive.parent, 0o755)
    cache = make_cache()
    for changed, reason in (
        (original[:100] + bytes([original[100] ^ 1]) + original[101:],
         "the zip downloaded .* is not the one its MANIFEST.json records"),
        (original + b"more", f"pulling model tiny \\({model_id}\\) v1 from the model registry failed: its download "
                             "announces .* bytes, more than the .* its manifest allows"),
    ):
        archive.unlink()
        archive.write_bytes(changed)
        with pytest.raises(PullFailed, match=reason):
            cache.get(model_id, 1, cluster.answer(model_id))
        assert left_in(cache) == [".tmp"]
        assert cache.usage().entries == 0


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "a changed file": (lambda: make_zip(package(weights=b"not really weightz")),
                       "'model.pth' does not match its MANIFEST.json entry"),
    "an extra file": (lambda: make_zip(package(**{"evil.py": "print('hi')"})),
                      "the zip holds 'evil.py', which MANIFEST.json does not list"),
    "a missing file": (lambda: make_zip({k: v for k, v in package().items() if k != "model.pth"}),
                       "files of MANIFEST.json missing from the zip: model.pth"),
    "a zip slip": (lambda: make_zip({**package(), "../../escaped.py": "print('out')"}), "goes up with '..'"),
    "an absolute path": (lambda: make_zip({**package(), "/tmp/escaped.py": "x"}), "absolute path"),
    "a symlink": (lambda: make_zip({**package(), "link": Entry("/etc/passwd", mode=stat.S_IFLNK | 0o777)}),
                  "symbolic links are not allowed"),
    "a fifo": (lambda: make_zip({**package(), "fifo": Entry("", mode=stat.S_IFIFO | 0o644)}),
               "only regular files and folders are allowed"),
    "a bomb": (lambda: make_zip(package(weights=bytes(20 << 20))),
               "'model.pth' inflates past the 18 bytes MANIFEST.json lists"),
    "not a zip": (lambda: b"PK\x03\x04 this is no zip at all", "not a zip file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_download_is_refused_with_a_clear_error_and_leaves_nothing(
    cluster: Cluster, make_cache: Callable[..., ModelCache], workdir: Path, case: str
) -> None:
    # given a registry that serves a hostile zip whose size and sha256 its MANIFEST.json records
    model_id = cluster.upload(package())
    zipped, reason = HOSTILE[case]
    cluster.serve_instead(model_id, zipped())
    cache = make_cache()

    # when the agent pulls it, then it is refused naming the problem
    with pytest.raises(PullFailed) as refused:
        cache.get(model_id, 1, cluster.answer(model_id))
    assert reason in refused.value.message
    assert f"model tiny ({model_id}) v1" in refused.value.message

    # and nothing is left: no entry, no partial folder, nothing outside the cache
    assert left_in(cache) == [".tmp"]
    assert cache.usage().entries == 0
    assert not list(workdir.rglob("escaped.py"))
    assert not Path("/tmp/escaped.py").exists()


def test_a_manifest_that_lists_a_path_out_of_the_folder_is_refused(cluster: Cluster,
                                                                   make_cache: Callable[..., ModelCache]) -> None:
    model_id = cluster.upload(package())
    files = package(**{"../up.py": "x"})
    cluster.serve_instead(model_id, make_zip(files), files=[
        {"path": name, "sha256": hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest(),
         "size_bytes": len(data)} for name, data in sorted(files.items())])
    cache = make_cache()
    with pytest.raises(PullFailed, match=r"MANIFEST.json lists '../up.py', which cannot be a file of a version"):
        cache.get(model_id, 1, cluster.answer(model_id))
    assert left_in(cache) == [".tmp"]


def test_a_manifest_other_than_the_recorded_one_is_refused(cluster: Cluster,
                                                           make_cache: Callable[..., ModelCache]) -> None:
    # given a version, and a fetch-model answer whose manifest_sha256 is not its MANIFEST.json's
    model_id = cluster.upload(package())
    cache = make_cache()
    forged = cluster.answer(model_id).model_copy(update={"manifest_sha256": "0" * 64})

    with pytest.raises(PullFailed, match="the MANIFEST.json served by the model registry is not the one it recorded"):
        cache.get(model_id, 1, forged)
    assert left_in(cache) == [".tmp"] and cluster.downloads == []  # refused before the zip is downloaded

    # and so is a MANIFEST.json changed on the registry's disk after it was recorded
    reg = registry(cluster.app)
    manifest = reg.path_of(reg.fetch(model_id, 1)) / "MANIFEST.json"
    os.chmod(manifest.parent, 0o755)
    data = manifest.read_bytes()
    manifest.unlink()
    manifest.write_bytes(data.replace(b'"files"', b'"files" ', 1))
    with pytest.raises(PullFailed, match="not the one it recorded"):
        cache.get(model_id, 1, cluster.answer(model_id))
    assert left_in(cache) == [".tmp"]


def test_an_answer_for_another_version_or_with_an_unsafe_model_id_is_refused(
    cluster: Cluster, make_cache: Callable[..., ModelCache]
) -> None:
    model_id = cluster.upload(package())
    cache = make_cache()
    answer = cluster.answer(model_id)
    with pytest.raises(PullFailed, match=rf"answered for tiny \({model_id}\) v1 when asked for {model_id} v2"):
        cache.get(model_id, 2, answer)
    with pytest.raises(PullFailed, match="a model id that cannot name a folder"):
        cache.get("..", 1, answer.model_copy(update={"model_id": ".."}))
    assert left_in(cache) == [".tmp"] and cluster.downloads == []


# --------------------------------------------------------------------------- eviction


def three_versions(cluster: Cluster) -> str:
    """One model with three versions of 200 kB of incompressible weights each."""
    model_id = cluster.upload(package(weights=random.Random(1).randbytes(200_000)))
    for seed in (2, 3):
        assert cluster.upload(package(weights=random.Random(seed).randbytes(200_000))) == model_id
    return model_id


def test_the_least_recently_used_version_is_evicted_to_make_room(cluster: Cluster,
                                                                 make_cache: Callable[..., ModelCache]) -> None:
    # given a cache with room for two versions (and the zip of a third while it is pulled)
    model_id = three_versions(cluster)
    cache = make_cache(max_bytes=700_000)
    v1, v2, v3 = (cluster.answer(model_id, v) for v in (1, 2, 3))
    cache.get(model_id, 1, v1)
    cache.get(model_id, 2, v2)
    cache.get(model_id, 1, v1)  # v1 is now the most recently used

    # when a third version is pulled
    cache.get(model_id, 3, v3)

    # then v2, the least recently used, was evicted (its folder removed), v1 and v3 remain
    assert [e.version for e in cache.usage().versions] == [3, 1]
    assert sorted(left for left in left_in(cache) if left.count("/") == 1) == [f"{model_id}/1", f"{model_id}/3"]
    assert cache.usage().evictions == 1 and cache.usage().used_bytes <= 700_000
    assert list((cache.root / ".tmp").iterdir()) == []

    # and getting v2 again pulls it again and evicts v1 (now the least recently used)
    cache.get(model_id, 2, v2)
    assert [e.version for e in cache.usage().versions] == [2, 3]
    assert len(cluster.downloads) == 4


def test_a_version_in_use_is_never_evicted(cluster: Cluster, make_cache: Callable[..., ModelCache]) -> None:
    model_id = three_versions(cluster)
    in_use: set[tuple[str, int]] = {("tiny", 1)}  # as the manager says it: the model id or name as deployed
    cache = make_cache(max_bytes=700_000, in_use=lambda: in_use)
    v1, v2, v3 = (cluster.answer(model_id, v) for v in (1, 2, 3))
    cache.get(model_id, 1, v1)
    cache.get(model_id, 2, v2)

    # when v3 needs room while v1 (the least recently used) is in use, then v2 goes instead
    cache.get(model_id, 3, v3)
    assert sorted(e.version for e in cache.usage().versions) == [1, 3]

    # and when every cached version is in use, the pull is refused saying why, and nothing is evicted
    in_use |= {(model_id, 3)}
    with pytest.raises(CacheFull, match="held by versions in use or being pulled.*AGENT_MODEL_CACHE_MAX_BYTES"):
        cache.get(model_id, 2, v2)
    assert sorted(e.version for e in cache.usage().versions) == [1, 3]
    assert (cache.root / model_id / "1" / "model" / "model.pth").is_file()
    assert list((cache.root / ".tmp").iterdir()) == []


def test_a_version_bigger_than_the_whole_cache_is_refused_before_its_download(
    cluster: Cluster, make_cache: Callable[..., ModelCache]
) -> None:
    model_id = cluster.upload(package(weights=random.Random(1).randbytes(200_000)))
    cache = make_cache(max_bytes=100_000)
    with pytest.raises(CacheFull, match=r"needs \d+ bytes in the model cache, more than it may hold"):
        cache.get(model_id, 1, cluster.answer(model_id))
    assert cluster.downloads == [] and left_in(cache) == [".tmp"]


# --------------------------------------------------------------------------- restarts and outages


def test_a_restart_keeps_the_index_and_removes_partial_or_corrupt_entries(
    cluster: Cluster, make_cache: Callable[..., ModelCache]
) -> None:
    # given two cached versions, and the leftovers of a crash: a pull in progress, an entry missing a file
    model_id = three_versions(cluster)
    cache = make_cache()
    for v in (1, 2):
        cache.get(model_id, v, cluster.answer(model_id, v))
    before = {e.version: e for e in cache.usage().versions}
    (cache.root / ".tmp" / "pull-crashed").mkdir()
    damaged = cache.root / model_id / "2" / "model"
    os.chmod(damaged, 0o755)
    (damaged / "model.pth").unlink()

    # when the agent starts again
    again = make_cache()

    # then the intact entry is kept with its last use, the damaged one and the leftovers are gone
    assert [(e.version, e.last_used) for e in again.usage().versions] == [(1, before[1].last_used)]
    assert [p.name for p in (again.root / model_id).iterdir()] == ["1"]
    assert list((again.root / ".tmp").iterdir()) == []
    # and the kept one is served without a download
    downloads = len(cluster.downloads)
    again.get(model_id, 1, cluster.answer(model_id, 1))
    assert len(cluster.downloads) == downloads


def test_an_unreadable_index_is_rebuilt_from_the_entries(cluster: Cluster,
                                                         make_cache: Callable[..., ModelCache]) -> None:
    model_id = cluster.upload(package())
    cache = make_cache()
    cache.get(model_id, 1, cluster.answer(model_id))
    (cache.root / "index.json").write_text('{"entries": [{"model_id": ')
    again = make_cache()
    assert [(e.model_id, e.version) for e in again.usage().versions] == [(model_id, 1)]
    assert json.loads((again.root / "index.json").read_text())["entries"][0]["model_id"] == model_id


def test_a_cached_version_damaged_on_disk_is_set_aside_and_pulled_again(cluster: Cluster,
                                                                        make_cache: Callable[..., ModelCache]) -> None:
    model_id = cluster.upload(package())
    cache = make_cache()
    answer = cluster.answer(model_id)
    weights = cache.get(model_id, 1, answer) / "model.pth"
    os.chmod(weights, 0o644)
    weights.write_bytes(b"not really weightz")  # same size: only the sha256 tells

    assert (cache.get(model_id, 1, answer) / "model.pth").read_bytes() == b"not really weights"
    assert len(cluster.downloads) == 2
    assert [p.name.startswith(f"{model_id}-v1-") for p in (cache.root / ".damaged").iterdir()] == [True]


def test_a_cached_version_is_served_while_the_registry_is_down(
    cluster: Cluster, make_cache: Callable[..., ModelCache], fetcher_for: Callable[[ModelCache], RegistryFetcher]
) -> None:
    # given one cached version and one that is not
    model_id = cluster.upload(package())
    assert cluster.upload(package(weights=b"second")) == model_id
    cache = make_cache()
    fetcher = fetcher_for(cache)
    source = fetcher(model_id, 1)
    assert source.pull is not None
    folder = source.pull()

    # when the model registry goes down
    cluster.server.close()

    # then the cached version is still fetched, from the answer kept beside it (by id and by name)
    for ref in (model_id, "tiny"):
        offline = fetcher(ref, 1)
        assert offline.pull is not None and offline.pull() == folder
        assert offline.manifest_sha256 == source.manifest_sha256 and offline.meta == source.meta
    # and the other one fails saying the registry cannot be reached
    with pytest.raises(UpstreamError, match="fetch-model"):
        fetcher(model_id, 2)


# --------------------------------------------------------------------------- the agent


def test_an_agent_with_http_model_files_runs_a_deployment_from_its_cache(
    cluster: Cluster, make_agent: Callable[..., Flask], settings: AgentSettings, pki: Pki, eventually: Any,
    workdir: Path,
) -> None:
    # given an agent that pulls model files over HTTP, and a version in the registry (not on any store it sees)
    model_id = cluster.upload(package())
    agent_app = make_agent(settings.model_copy(update={
        "model_files": "http", "service_registry_url": cluster.book.url, "model_cache_max_bytes": 1 << 20,
        "model_store": workdir / "no-store"}), fetch_model=None)
    agent = parts(agent_app)
    controller = pki.client(agent_app, CONTROLLER)

    def deploy(deployment_id: str) -> dict[str, Any]:
        created = controller.post("/create-vm", json={"deployment_id": deployment_id, "model_id": model_id,
                                                      "version": 1})
        assert created.status_code == 202, created.json
        eventually(lambda: controller.get(f"/deployments/{deployment_id}").json["status"] in ("running", "failed"),
                   60, f"{deployment_id} settled")
        found = controller.get(f"/deployments/{deployment_id}").json
        assert found["status"] == "running", found
        return dict(found)

    # when the controller deploys it
    first = deploy("dep-http-1")

    # then the model answers, run from the cached folder, which is in use while it runs
    answer = requests.get(f"{first['url']}/predict", timeout=5).json()
    assert answer["model"] == "tiny"
    assert agent.model_cache is not None
    assert agent.manager.versions_in_use() == {(model_id, 1)}
    usage = controller.get("/model-cache").json
    assert (usage["entries"], usage["pulls"], usage["max_bytes"]) == (1, 1, 1 << 20)
    assert usage["versions"][0]["model_id"] == model_id
    assert "setting up" in "\n".join(agent.manager.logs("dep-http-1", 50))

    # when it is stopped, the registry goes down, and the version is deployed again
    assert controller.post("/stop-vm", json={"deployment_id": "dep-http-1"}).json["status"] == "stopped"
    assert agent.manager.versions_in_use() == set()
    cluster.server.close()
    second = deploy("dep-http-2")

    # then it runs from the cache, with no second download
    assert requests.get(f"{second['url']}/predict", timeout=5).json()["deployment"] == "dep-http-2"
    assert len(cluster.downloads) == 1
    assert controller.get("/model-cache").json["hits"] == 1
    controller.post("/stop-vm", json={"deployment_id": "dep-http-2"})


def test_a_pull_that_fails_fails_the_deployment_with_its_reason(
    cluster: Cluster, make_agent: Callable[..., Flask], settings: AgentSettings, pki: Pki, eventually: Any,
) -> None:
    model_id = cluster.upload(package())
    cluster.serve_instead(model_id, make_zip(package(**{"evil.py": "x"})))
    agent_app = make_agent(settings.model_copy(update={
        "model_files": "http", "service_registry_url": cluster.book.url}), fetch_model=None)
    controller = pki.client(agent_app, CONTROLLER)
    controller.post("/create-vm", json={"deployment_id": "dep-bad", "model_id": model_id, "version": 1})
    failed = eventually(lambda: (d := controller.get("/deployments/dep-bad").json)["status"] == "failed" and d,
                        60, "dep-bad failed")
    assert "which MANIFEST.json does not list" in failed["reason"]
    assert controller.get("/model-cache").json["entries"] == 0


def test_the_model_files_settings_are_validated(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_files"):
        AgentSettings(ca_file=pki.ca_file, model_files="ftp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_cache_max_bytes"):
        AgentSettings(ca_file=pki.ca_file, model_cache_max_bytes=1000)
    defaults = AgentSettings(ca_file=pki.ca_file, state_dir=tmp_path / "state")
    assert (defaults.model_files, defaults.model_cache_max_bytes) == ("auto", 10 << 30)
    assert defaults.model_cache_path == (tmp_path / "state" / "model-cache").absolute()


def test_extract_refuses_two_entries_of_one_name(tmp_path: Path) -> None:
    """Defence in depth below the registry's own checks: a duplicate name never overwrites a file."""
    from agent.cache import extract_version

    data = b"x"
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("a.txt", data)
        zf.writestr("a.txt", data)
    manifest = Manifest(zip_sha256="0" * 64, zip_size_bytes=1, files=[
        {"path": "a.txt", "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": 1}])  # type: ignore[list-item]
    with pytest.raises(PullFailed, match="the zip holds 'a.txt' twice"):
        extract_version(archive, manifest, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_vm_on_http_model_files_is_exported_its_cached_folder(
    cluster: Cluster, settings: AgentSettings, pki: Pki, eventually: Any, workdir: Path,
) -> None:
    """For a VM the cached folder is what this host's NFS server exports to it (the store is not mounted here)."""
    from test_agent_vagrant_runtime import FakeDriver, FakeFirewall  # noqa: PLC0415 - helpers of those tests

    model_id = cluster.upload(package())
    vm_settings = settings.model_copy(update={
        "runtimes": ["vagrant"], "model_files": "http", "service_registry_url": cluster.book.url,
        "model_store": workdir / "no-store", "wheelhouse_dir": workdir / "wheels", "port_range": "27100-27199"})
    driver = FakeDriver()
    runtime = VagrantRuntime(
        VagrantConfig(acceleration="tcg"), driver=driver, wheelhouse=Wheelhouse(vm_settings.wheelhouse_dir),
        model_store=vm_settings.model_store, state_dir=vm_settings.state_dir.absolute(), provision_timeout_s=20,
        guard=VmGuard(FakeFirewall(), nfs_servers=("192.168.121.1",)),  # type: ignore[arg-type]
        model_cache=vm_settings.model_cache_path,
    )
    cred = pki.credential(vm_settings.agent_id, AGENT)
    app = create_app(vm_settings, MemoryBus(), credential=lambda: cred, runtimes={"vagrant": runtime})
    controller = pki.client(app, CONTROLLER)
    try:
        controller.post("/create-vm", json={"deployment_id": "dep-vm", "model_id": model_id, "version": 1,
                                            "runtime": "vagrant"})
        found = eventually(lambda: (d := controller.get("/deployments/dep-vm").json)["status"] != "provisioning"
                           and d, 30, "dep-vm settled")
        assert found["status"] == "running", found
        exports = (vm_settings.state_dir.absolute() / ".vm-exports.conf").read_text()
        cached = vm_settings.model_cache_path / model_id / "1" / "model"
        assert f'Path = "{cached.resolve()}";' in exports and 'Pseudo = "/miaas/dep-vm/app";' in exports
        controller.post("/stop-vm", json={"deployment_id": "dep-vm"})
    finally:
        parts(app).shutdown()
        runtime.close()
        driver.close()
