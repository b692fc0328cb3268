"""The venv cache: one venv per requirements.txt content, shared by deployments, built once, never half-published."""

from __future__ import annotations

from pathlib import Path

import requests

from agent.app import parts
from agent.runtimes.venvs import VenvCache
from agent.settings import AgentSettings
from miaas.identity import CONTROLLER
from miaas.testing import Pki


def published(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_symlink())


def test_the_venv_key_follows_the_requirements_content(tmp_path: Path) -> None:
    cache = VenvCache(tmp_path)
    assert cache.key(b"numpy==2.0\n") == cache.key(b"numpy==2.0\n")
    assert cache.key(b"numpy==2.0\n") != cache.key(b"numpy==2.1\n")


def test_two_deployments_with_identical_requirements_share_one_venv(  # type: ignore[no-untyped-def]
    make_agent, settings: AgentSettings, store, workdir: Path, eventually, pki: Pki
) -> None:
    # given an empty venv cache and two different models whose requirements.txt are the same
    cache = workdir / "venvs"
    app = make_agent(settings.model_copy(update={"venv_cache_dir": cache}))
    client = pki.client(app, CONTROLLER)
    store.add("alpha", requirements="# shared\n")
    store.add("beta", requirements="# shared\n")

    # when both are deployed at the same time (their provisioning races for the venv)
    urls = [client.post("/create-vm", json={"deployment_id": f"dep-{m}", "model_id": m, "version": 1}).json["url"]
            for m in ("alpha", "beta")]
    for m in ("alpha", "beta"):
        eventually(lambda m=m: client.get(f"/deployments/dep-{m}").json["status"] == "running", 60, f"dep-{m}")

    # then both models run in the one venv, which was built once and reused once
    prefixes = {requests.get(url, timeout=5).json()["prefix"] for url in urls}
    [venv] = published(cache)
    assert prefixes == {str(venv.resolve())}
    assert len(list((cache / ".builds").iterdir())) == 1
    logs = [client.get(f"/deployments/dep-{m}/logs?tail=100").text for m in ("alpha", "beta")]
    assert sorted("built virtualenv" in log for log in logs) == [False, True]
    assert sorted("reusing virtualenv" in log for log in logs) == [False, True]
    assert parts(app).manager.ports.held().keys() == {int(u.rsplit(":", 1)[1]) for u in urls}


def test_a_failed_venv_build_fails_the_deployment_and_leaves_nothing_behind(  # type: ignore[no-untyped-def]
    make_agent, settings: AgentSettings, store, workdir: Path, eventually, pki: Pki
) -> None:
    cache = workdir / "venvs"
    app = make_agent(settings.model_copy(update={"venv_cache_dir": cache}))
    client = pki.client(app, CONTROLLER)
    store.add("needy", requirements="./no-such-local-package\n")

    client.post("/create-vm", json={"deployment_id": "dep-n", "model_id": "needy", "version": 1})
    failed = eventually(lambda: (d := client.get("/deployments/dep-n").json)["status"] != "provisioning" and d, 120,
                        "dep-n to fail")

    assert failed["status"] == "failed"
    assert "installing requirements.txt failed" in failed["reason"]
    assert published(cache) == []
    assert list((cache / ".builds").iterdir()) == []
