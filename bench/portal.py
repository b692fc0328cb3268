"""Portal page speed: the models page with 10,000 models and the agents page with 1,000 agents. Prints figures;
never fails.

Everything is real but the bus: the model registry (its SQLite database filled with 10,000 models and 20,000
versions), the controller (its live view fed 1,000 agents' metrics through `observe_metrics`, as its consumer
would) and the portal, each in a process of its own and served by cheroot on loopback, the portal calling the
other two over HTTP as in production. The portal's load history holds 10 minutes of samples every 5 s for every
agent, so each agents page draws its sparklines. One logged-in client asks for each page in turn; latency is the
whole HTTP round trip. The agents pages share the controller's list for 2 s and refresh it in the background
(frontend/README.md); the "cold path" row drops it before every request, so each page waits for the controller.

Goal (issue 6): p99 <= 100 ms for both pages.
Run: .venv/bin/python bench/portal.py [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import re
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import requests
from sqlalchemy import insert

from controller.app import create_app as create_controller
from controller.settings import ControllerSettings
from frontend.app import close_app
from frontend.app import create_app as create_portal
from frontend.settings import FrontendSettings
from miaas.bus import MemoryBus
from miaas.client import SignedSession
from miaas.cluster import Pki
from miaas.schemas import AgentCapacity, AgentLoad, AgentMetrics, DeploymentReport, DeploymentStatus
from miaas.serve import Server
from model_registry.app import create_app as create_registry
from model_registry.settings import ModelRegistrySettings
from model_registry.store import ModelRow, VersionRow
from model_registry.testing import META, registry

MODELS = 10_000
AGENTS = 1_000
HISTORY_S, INTERVAL_S = 600, 5
GOAL_MS = 100.0
WORDS = ["iris", "mnist", "resnet", "bert", "yolo", "whisper", "llama", "gpt", "unet", "vit"]


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    """p50, p99 and max in milliseconds."""
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1e3, p99 * 1e3, ordered[-1] * 1e3


def fill_registry(app: object, n: int) -> None:
    """n models with two versions each, written straight into the registry's database."""
    store = registry(app).store  # type: ignore[arg-type]
    now = datetime.now(UTC)
    meta = json.dumps(META)
    models, versions = [], []
    for i in range(n):
        model_id = f"m-{i:012x}"
        models.append({"id": model_id, "name": f"{WORDS[i % len(WORDS)]}-{i:05d}", "created_at": now,
                       "last_version": 2})
        for v in (1, 2):
            versions.append({"model_id": model_id, "version": v, "path": f"{model_id}/v{v}", "sha256": "ab" * 32,
                             "size_bytes": 1 << 20, "manifest_sha256": "cd" * 32, "meta_json": meta,
                             "created_by": "bench", "created_at": now - timedelta(days=v)})
    with store.engine.begin() as db:
        db.execute(insert(ModelRow), models)
        db.execute(insert(VersionRow), versions)


def fill_controller(app: object, n: int, rnd: random.Random) -> None:
    controller = app.extensions["controller"]  # type: ignore[attr-defined]
    now = datetime.now(UTC)
    for i in range(n):
        controller.observe_metrics(AgentMetrics(
            agent_id=f"agent-{i:04d}", url=f"http://10.0.{i // 250}.{i % 250}:8600", runtimes=["process"],
            capacity=AgentCapacity(cpus=rnd.choice([4, 8, 16]), memory_mb=rnd.choice([8192, 16384]), disk_mb=1e5,
                                   gpus=rnd.choice([0, 0, 1])),
            load=AgentLoad(cpu_percent=rnd.uniform(0, 100), memory_percent=rnd.uniform(0, 100)),
            deployments=[DeploymentReport(deployment_id=f"d-{i:04d}-{k}", status=DeploymentStatus.RUNNING,
                                          url=f"http://10.0.{i // 250}.{i % 250}:{20000 + k}")
                         for k in range(rnd.choice([0, 1, 2]))],
            interval_s=INTERVAL_S, sent_at=now,
        ))


def fill_history(portal: object, n: int, rnd: random.Random) -> None:
    history = portal.extensions["frontend.history"]  # type: ignore[attr-defined]
    now = time.monotonic()
    for i in range(n):
        for k in range(HISTORY_S // INTERVAL_S, 0, -1):
            history.observe(AgentMetrics(
                agent_id=f"agent-{i:04d}", url="http://x", capacity=AgentCapacity(cpus=4, memory_mb=8192),
                load=AgentLoad(cpu_percent=rnd.uniform(0, 100), memory_percent=rnd.uniform(0, 100)),
                sent_at=datetime.now(UTC),
            ), now - k * INTERVAL_S)


def measure(get: Callable[[], requests.Response], n: int) -> tuple[list[float], int]:
    for _ in range(10):  # warm connections, caches and Jinja's compiled templates
        get()
    latencies, size = [], 0
    for _ in range(n):
        started = time.perf_counter()
        answer = get()
        latencies.append(time.perf_counter() - started)
        if answer.status_code != 200:
            raise SystemExit(f"{answer.url} answered {answer.status_code}: {answer.text[:300]}")
        size = len(answer.content)
    return latencies, size


def serve_registry(pki: Pki, root: Path, ready: Queue[str], stop: Event) -> None:
    """The model registry with 10,000 models, in a process of its own as in production."""
    app = create_registry(ModelRegistrySettings(
        ca_file=pki.ca_file, credential_file=pki.credentials["model-registry"], model_store=root / "models",
        database_url=f"sqlite:///{root / 'registry.db'}"),
        MemoryBus())
    fill_registry(app, MODELS)
    run_until(Server(app).start(), ready, stop)


def serve_controller(pki: Pki, root: Path, ready: Queue[str], stop: Event) -> None:
    """The controller with 1,000 agents in its view, in a process of its own."""
    app = create_controller(ControllerSettings(ca_file=pki.ca_file, credential_file=pki.credentials["controller"],
                                               database_url=f"sqlite:///{root / 'controller.db'}"),
                            locate=lambda name: "http://127.0.0.1:9")
    fill_controller(app, AGENTS, random.Random(6))
    run_until(Server(app).start(), ready, stop)


def run_until(server: Server, ready: Queue[str], stop: Event) -> None:
    ready.put(server.url)
    stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per page")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-portal-") as tmp:
        root = Path(tmp)
        pki = Pki.ensure(root / "pki")
        started = time.perf_counter()
        mp = multiprocessing.get_context("fork")
        stop = mp.Event()
        urls: dict[str, str] = {}
        children = []
        for name, target in (("model-registry", serve_registry), ("controller", serve_controller)):
            ready: Queue[str] = mp.Queue()
            child = mp.Process(target=target, args=(pki, root, ready, stop), daemon=True)
            child.start()
            children.append(child)
            urls[name] = ready.get(timeout=120)
        password = secrets.token_urlsafe(16)
        portal = create_portal(FrontendSettings(
            ca_file=pki.ca_file, credential_file=pki.credentials["frontend"], secret_key=secrets.token_hex(32),
            admin_password=password,
            database_url=f"sqlite:///{root / 'portal.db'}", service_registry_url=None, consume_bus=False,
        ), urls.__getitem__)
        fill_history(portal, AGENTS, random.Random(6))
        server = Server(portal, threads=16).start()
        base = server.url
        backends = portal.extensions["frontend.backends"]

        def uncached(get: Callable[..., requests.Response], url: str) -> requests.Response:
            """The page as when the shared agent list is too old: it waits for the controller's answer."""
            backends._agents = None
            return get(url, timeout=30)

        print(f"set up {MODELS:,} models, {AGENTS:,} agents and their history in {time.perf_counter() - started:.1f}s;"
              " registry, controller and portal each run in a process of their own")
        try:
            with requests.Session() as web:
                form = web.get(f"{base}/login", timeout=10).text
                csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
                web.post(f"{base}/login", data={"username": "admin", "password": password, "csrf_token": csrf},
                         timeout=30).raise_for_status()
                operator = SignedSession(pki.admin())
                pages: list[tuple[str, Callable[[], requests.Response]]] = [
                    ("models, page 1", lambda: web.get(f"{base}/models", timeout=30)),
                    ("models, page 150", lambda: web.get(f"{base}/models?page=150", timeout=30)),
                    ("models, search", lambda: web.get(f"{base}/models?q=whisper-0", timeout=30)),
                    ("agents, page 1", lambda: web.get(f"{base}/agents", timeout=30)),
                    ("agents, page 15", lambda: web.get(f"{base}/agents?page=15", timeout=30)),
                    ("agents, search", lambda: web.get(f"{base}/agents?q=agent-07", timeout=30)),
                    ("agents, page 1, list not shared (cold path)", lambda: uncached(web.get, f"{base}/agents")),
                    ("(registry GET /registry/models?limit=50)",
                     lambda: operator.get(f"{urls['model-registry']}/registry/models?limit=50&q=", timeout=30)),
                    ("(controller GET /controller/agents)",
                     lambda: operator.get(f"{urls['controller']}/controller/agents", timeout=30)),
                ]
                print(f"{args.requests} requests each, one client, loopback; milliseconds")
                print(f"{'page':46} {'p50':>7} {'p99':>7} {'max':>7} {'bytes':>9}  goal p99 <= {GOAL_MS:.0f} ms")
                for name, get in pages:
                    latencies, size = measure(get, args.requests)
                    p50, p99, worst = percentiles(latencies)
                    verdict = "" if name.startswith("(") else ("ok" if p99 <= GOAL_MS else "over")
                    print(f"{name:46} {p50:7.1f} {p99:7.1f} {worst:7.1f} {size:9,}  {verdict}")
        finally:
            server.close()
            close_app(portal)
            stop.set()
            for child in children:
                child.join(timeout=10)


if __name__ == "__main__":
    main()
