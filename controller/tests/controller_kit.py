"""Helpers of the controller's tests (importable by name: `from controller_kit import ...`; conftest.py
is not importable by name when several test folders run in one pytest call)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
from flask import Flask, Response, jsonify, request
from pydantic import BaseModel

from agent.app import create_app as create_agent
from agent.app import parts
from agent.fetch import ModelSource
from agent.runtimes.base import DeploymentSpec, RuntimeState
from agent.settings import AgentSettings
from controller.service import Controller
from miaas import identity
from miaas.bus import DEPLOYMENT_EVENTS, SYSTEM_METRICS, MemoryBus
from miaas.client import Signer
from miaas.errors import NotFound
from miaas.schemas import AgentMetrics, DeploymentEvent, DeploymentStatus, PackageMeta
from miaas.serve import Server
from miaas.testing import Pki, SigningClient
from miaas.testing import wait_for as poll
from miaas.web import Api, ServiceAuth, create_service_app

T = TypeVar("T")

# model id -> CPUs it asks for (256 MB each)
MODELS = {"small": 1.0, "half": 0.5, "big": 2.0}


def meta_of(model_id: str) -> PackageMeta:
    return PackageMeta.model_validate({
        "setup_commands": ["true"], "start_commands": ["true"],
        "resources": {"cpus": MODELS[model_id], "memory_mb": 256, "gpus": 0},
    })


def wait_for(check: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
    return poll(check, timeout, what, interval=0.02)


class InstantRuntime:
    """A runtime whose models start and stop at once: what the controller sees is the agent's real behaviour."""

    name = "process"

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.started: list[str] = []
        self._lock = threading.Lock()

    def start(self, spec: DeploymentSpec) -> None:
        with self._lock:
            self.running.add(spec.deployment_id)
            self.started.append(spec.deployment_id)

    def stop(self, deployment_id: str) -> None:
        with self._lock:
            self.running.discard(deployment_id)

    def status(self, deployment_id: str) -> RuntimeState:
        with self._lock:
            up = deployment_id in self.running
        return RuntimeState(DeploymentStatus.RUNNING if up else DeploymentStatus.STOPPED)

    def logs(self, deployment_id: str, tail: int) -> list[str]:
        return []


class Loopback:
    """The bus between agents and the controller, in process: what an agent publishes, the controller folds."""

    def __init__(self) -> None:
        self.controller: Controller | None = None
        self.paused: set[str] = set()  # agents whose messages are dropped (a network partition)

    def bus_for(self, agent_id: str) -> Any:
        loop = self

        class AgentBus(MemoryBus):
            def publish(self, topic: str, key: str, message: BaseModel) -> None:
                super().publish(topic, key, message)
                c = loop.controller
                if c is None or agent_id in loop.paused:
                    return
                if topic == SYSTEM_METRICS and isinstance(message, AgentMetrics):
                    c.observe_metrics(message)
                elif topic == DEPLOYMENT_EVENTS and isinstance(message, DeploymentEvent):
                    c.observe_event(message)

        return AgentBus()


@dataclass
class Agent:
    agent_id: str
    app: Flask
    server: Server
    runtime: InstantRuntime
    credential: identity.Credential
    client: SigningClient  # signs as the controller

    @property
    def url(self) -> str:
        return self.server.url

    def deployments(self) -> dict[str, dict[str, Any]]:
        """What the agent itself says it holds, by deployment id."""
        body = self.client.get("/deployments").json
        return {d["deployment_id"]: d for d in body["deployments"]}


@dataclass
class Cluster:
    """A controller (reconcile loop running, no Kafka) and the agents a test adds; `client` calls the controller
    as an operator (role admin), `http` is a requests session signed as one."""

    controller: Controller
    app: Flask
    pki: Pki
    loop: Loopback
    tmp: Path
    serve: Callable[[Flask], Server]
    client: SigningClient
    http: requests.Session
    agents: dict[str, Agent] = field(default_factory=dict)

    def add_agent(self, agent_id: str, cpus: float = 2, memory_mb: float = 4096, create_delay_s: float = 0) -> Agent:
        """A real agent over HTTP; `create_delay_s` holds each /create-vm that long before the agent sees it."""
        runtime = InstantRuntime()
        first_port = 30000 + 100 * len(self.agents)
        settings = AgentSettings(
            ca_file=self.pki.ca_file, agent_id=agent_id, state_dir=self.tmp / agent_id,
            venv_cache_dir=self.tmp / "venvs", metrics_interval_s=0.1, capacity_cpus=cpus,
            capacity_memory_mb=memory_mb, port_range=f"{first_port}-{first_port + 99}",
        )
        # The agent's certificate binds the URL of its server, known once served: the holder is filled then.
        holder: dict[str, identity.Credential] = {}
        app = create_agent(settings, self.loop.bus_for(agent_id), credential=lambda: holder["credential"],
                           runtimes={"process": runtime},
                           fetch_model=lambda model_id, version: ModelSource(self.tmp, meta_of(model_id)))
        if create_delay_s:
            app.wsgi_app = _delayed(app.wsgi_app, "/create-vm", create_delay_s)  # type: ignore[method-assign]
        server = self.serve(app)
        credential = holder["credential"] = self.pki.credential(agent_id, identity.AGENT, url=server.url)
        agent = self.agents[agent_id] = Agent(agent_id, app, server, runtime, credential,
                                              self.pki.client(app, identity.CONTROLLER))
        parts(app).start_metrics(server.url)
        return agent

    def session(self, role: str) -> requests.Session:
        """A requests session signed as a new identity of `role` (close it after use)."""
        return signed_session(self.pki.credential(role))

    def silence(self, agent_id: str) -> None:
        """The agent's messages stop reaching the controller (it looks dead); it keeps running."""
        self.loop.paused.add(agent_id)

    def resume(self, agent_id: str) -> None:
        self.loop.paused.discard(agent_id)

    def deploy(self, model_id: str, priority: object = "normal", wait: float = 0) -> requests.Response:
        resp = self.client.post(f"/controller/deploy?wait={wait}", json={"model_id": model_id, "priority": priority})
        return resp  # type: ignore[return-value]

    def stop(self, deployment_id: str) -> Any:
        return self.client.post("/controller/stop", json={"deployment_id": deployment_id})

    def events(self, deployment_id: str) -> list[DeploymentEvent]:
        """What the controller published about a deployment, in order."""
        bus = self.controller.bus
        assert isinstance(bus, MemoryBus)
        return [e for e in bus.on(DEPLOYMENT_EVENTS) if isinstance(e, DeploymentEvent)
                and e.deployment_id == deployment_id]

    def get(self, deployment_id: str) -> dict[str, Any]:
        resp = self.client.get(f"/controller/deployments/{deployment_id}")
        return resp.json  # type: ignore[no-any-return]

    def until(self, deployment_id: str, check: Callable[[dict[str, Any]], bool], what: str,
              timeout: float = 30) -> dict[str, Any]:
        return wait_for(lambda: (d := self.get(deployment_id)) and check(d) and d, timeout, f"{deployment_id} {what}")


def _delayed(wsgi: Any, path: str, delay_s: float) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == path:
            time.sleep(delay_s)
        return wsgi(environ, start_response)

    return app


def fake_registry(pki: Pki) -> Flask:
    """The model registry's fetch-model, for the models of MODELS, answering only requests the controller signed."""
    api = Api("fake-registry", allow=(identity.CONTROLLER,))

    @api.route("/registry/fetch-model")
    def fetch() -> Response:
        """A version of one of MODELS."""
        model_id = request.args["model_id"]
        if model_id not in MODELS:
            raise NotFound(f"model '{model_id}' not found")
        return jsonify({"model_id": model_id, "name": model_id, "version": 1,
                        "meta": meta_of(model_id).model_dump(mode="json")})

    auth = ServiceAuth(identity.Verifier(identity.load_ca_public(pki.ca_file)))
    return create_service_app("model-registry", auth, [api])


def signed_session(credential: identity.Credential) -> requests.Session:
    """A requests session whose every request is signed by `credential`, as ServiceClient signs."""
    session = requests.Session()
    session.auth = Signer(identity.fixed(credential))
    session.trust_env = False
    return session
