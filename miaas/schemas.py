"""Wire schemas: every HTTP body and Kafka message, defined once and shared by all services.

Changes are additive only. Every Kafka message carries `schema_version`.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Percent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]


class Wire(BaseModel):
    """Base of every wire schema: immutable, unknown fields ignored (additive evolution)."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class Request(BaseModel):
    """Base of request bodies: unknown fields are refused so typos surface as a 400."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- deployments


class DeploymentStatus(enum.StrEnum):
    """States of a deployment (DESIGN §2)."""

    PENDING = "pending"
    SCHEDULED = "scheduled"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    LOST = "lost"

    @property
    def is_terminal(self) -> bool:
        return self in (DeploymentStatus.STOPPED, DeploymentStatus.FAILED)


PriorityName = Literal["low", "normal", "high", "critical"]
PRIORITIES: tuple[PriorityName, ...] = ("low", "normal", "high", "critical")
"""Priorities of deployments, lowest first: a name's index is its rank (0-3)."""


def priority_name(value: object) -> object:
    """A priority given as a name (any case) or a rank 0-3, as its name; anything else is left to validation."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and 0 <= value < len(PRIORITIES):
        return PRIORITIES[value]
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit() and int(text) < len(PRIORITIES):
            return PRIORITIES[int(text)]
        return text
    return value


def priority_rank(name: PriorityName) -> int:
    """0 (low) to 3 (critical)."""
    return PRIORITIES.index(name)


# --------------------------------------------------------------------------- model package


class Resources(Wire):
    """What one deployment of a model needs."""

    cpus: float = Field(1.0, gt=0, allow_inf_nan=False)
    memory_mb: int = Field(512, gt=0)
    gpus: int = Field(0, ge=0)


class PackageMeta(Wire):
    """meta.json of a model package: its commands, ports and resources."""

    setup_commands: list[str] = Field(min_length=1)
    start_commands: list[str] = Field(min_length=1)
    description: str = ""
    ports: dict[str, Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    health_path: str | None = None
    artifacts: list[str] = Field(default_factory=lambda: ["model.pth"])

    @field_validator("setup_commands", "start_commands")
    @classmethod
    def _commands_not_blank(cls, value: list[str]) -> list[str]:
        if any(not c.strip() for c in value):
            raise ValueError("commands must be non-empty strings")
        return value

    @field_validator("health_path")
    @classmethod
    def _path_starts_with_slash(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("health_path must start with '/'")
        return value


# --------------------------------------------------------------------------- Kafka: system-metrics


class GpuMetrics(Wire):
    index: int = Field(ge=0)
    name: str = ""
    utilization_percent: Percent = 0.0
    memory_used_mb: NonNegative = 0.0
    memory_total_mb: NonNegative = 0.0


class AgentCapacity(Wire):
    cpus: float = Field(gt=0, allow_inf_nan=False)
    memory_mb: NonNegative
    disk_mb: NonNegative = 0.0
    gpus: int = Field(0, ge=0)


class AgentLoad(Wire):
    cpu_percent: Percent
    memory_percent: Percent
    disk_percent: Percent = 0.0
    gpus: list[GpuMetrics] = Field(default_factory=list)


class DeploymentReport(Wire):
    """One deployment as its agent sees it, carried in every metrics message."""

    deployment_id: str
    status: DeploymentStatus
    url: str | None = None
    generation: int | None = Field(None, ge=0, description="the placement this copy belongs to (see Deployment)")
    restarts: int = Field(0, ge=0, description="restarts in place by its agent's health watch")
    last_restart_reason: str | None = Field(None, description="why its agent restarted it last")
    health: Literal["passing", "failing", "unknown"] = Field(
        "unknown", description="its agent's last health probe: passing, failing, unknown (not running or not yet)")


class AgentMetrics(Wire):
    """Message on `system-metrics` (key: agent id): who the agent is, its capacity, its load, what it runs."""

    schema_version: Literal[1] = 1
    agent_id: str = Field(min_length=1, max_length=128)
    url: str
    runtimes: list[str] = Field(default_factory=lambda: ["process"])
    capacity: AgentCapacity
    load: AgentLoad
    deployments: list[DeploymentReport] = Field(default_factory=list)
    interval_s: float = Field(5.0, gt=0, le=3600, allow_inf_nan=False, description="seconds to the next message")
    sent_at: AwareDatetime


# --------------------------------------------------------------------------- Kafka: deployment-events


class DeploymentEvent(Wire):
    """Message on `deployment-events` (key: deployment id): one state change of one deployment."""

    schema_version: Literal[1] = 1
    deployment_id: str
    agent_id: str | None = None
    status: DeploymentStatus
    url: str | None = None
    reason: str | None = None
    source: str = Field(description="the service that made the change: agent or controller")
    at: datetime
    generation: int | None = Field(None, ge=0, description="the placement the change belongs to (see Deployment)")


# --------------------------------------------------------------------------- Kafka: consumers


class ConsumerStats(Wire):
    """What one consumer of the bus has handled, and the poison messages it skipped, per reason."""

    topics: list[str]
    consumed: int = Field(description="messages handed to the service")
    superseded: int = Field(0, description="snapshots passed over unread: a later one of the same key came with them")
    skipped: int = Field(description="messages passed over: too large, bad JSON, unknown schema version, invalid...")
    skipped_by_reason: dict[str, int] = Field(
        default_factory=dict,
        description="too_large, bad_json, schema_version, not_finite, out_of_range, invalid, handler_error",
    )
    last_skipped: str | None = Field(None, description="reason, topic[partition]@offset and why, of the latest")


class BrokerState(Wire):
    """What the controller's own metadata requests to the broker found (every few seconds)."""

    bootstrap: str
    answering: bool = Field(description="the broker answered lately, every topic exists, every consumer follows them")
    problem: str | None = Field(None, description="what is wrong when not answering")
    answered_at: datetime | None = Field(None, description="the latest answer of the broker")
    topics: dict[str, int] = Field(default_factory=dict, description="partitions of each platform topic found")
    topics_recreated: int = Field(0, description="times missing topics were created again (a broker restarted empty)")


class LivenessState(Wire):
    """Whether the controller may declare agents lost now: silence counts only while the bus works."""

    suspended: bool = Field(description="no agent becomes lost while true")
    cause: Literal["bus", "disruption"] | None = Field(
        None, description="bus: the broker does not answer, a topic is missing or a consumer is not assigned yet; "
                          "disruption: every agent (two or more) fell silent at once while the broker answers")
    since: datetime | None = Field(None, description="when the suspension began")
    why: str | None = None
    grace_from: datetime = Field(description="no silence counts before this: the start, or the last suspension's end")
    grace_until: datetime = Field(description="no agent is lost before this (grace_from + lost_after_s)")


class BusStats(Wire):
    consumers: list[ConsumerStats]
    broker: BrokerState | None = Field(None, description="the controller's own look at the broker (None: no Kafka)")
    liveness: LivenessState | None = None


# --------------------------------------------------------------------------- service registry


class RegisterRequest(Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")
    url: str = Field(min_length=1, max_length=512, pattern=r"^https?://")
    metadata: dict[str, Any] = Field(default_factory=dict)
    instance_id: str | None = Field(
        None, min_length=1, max_length=128, description="stable id to renew; generated when omitted"
    )


class HeartbeatRequest(Request):
    instance_id: str = Field(min_length=1, max_length=128)


class ServiceInstance(Wire):
    instance_id: str
    name: str
    url: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    registered_at: datetime
    last_heartbeat: datetime
    expires_at: datetime


class ServiceList(Wire):
    services: dict[str, list[ServiceInstance]]


class ServiceQuery(Request):
    name: str = Field(min_length=1, max_length=64)


# --------------------------------------------------------------------------- model registry


class ModelVersion(Wire):
    model_id: str
    name: str
    version: int
    path: str
    meta: PackageMeta
    sha256: str
    size_bytes: int
    created_at: datetime
    created_by: str | None = None


class ModelSummary(Wire):
    model_id: str
    name: str
    latest_version: int
    versions: list[int]
    created_at: datetime


class ModelList(Wire):
    models: list[ModelSummary]
    total: int | None = Field(None, description="models matching the query, before offset and limit")


class FetchModelQuery(Request):
    model_id: str = Field(min_length=1, max_length=128)
    version: int | None = Field(None, ge=1, description="latest when omitted")
    alias: str | None = Field(None, min_length=1, max_length=32, description="resolve through this alias")


class UploadResult(Wire):
    model: ModelVersion
    warnings: list[str] = Field(default_factory=list)


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


class VersionFiles(Wire):
    """The files of a version, as listed in its MANIFEST.json."""

    model_id: str
    version: int
    files: list[ManifestFile]


class EditRequest(Request):
    """Text files to replace or add in a copy of a version; the result is uploaded as the next version."""

    files: dict[str, str] = Field(min_length=1, max_length=64, description="path -> new UTF-8 text")


class AliasRequest(Request):
    version: int = Field(ge=1)


class ModelEvent(Wire):
    """Message on `model-events` (key: model id): a version was created or deleted, or an alias moved."""

    schema_version: Literal[1] = 1
    kind: Literal["version_created", "version_deleted", "alias_moved"] = "version_created"
    model_id: str
    name: str
    version: int
    sha256: str
    path: str
    created_by: str | None = None
    at: datetime
    alias: str | None = Field(None, description="the alias that moved (kind alias_moved)")


# --------------------------------------------------------------------------- controller


class DeployRequest(Request):
    model_id: str = Field(min_length=1, max_length=128, description="model id or model name")
    version: int | None = Field(None, ge=1, description="latest when omitted")
    alias: str | None = Field(None, min_length=1, max_length=32, description="a version alias, e.g. production")
    runtime: str | None = Field(None, min_length=1, max_length=32, description="controller's default when omitted")
    priority: PriorityName = Field(
        "normal", description="low | normal | high | critical (or 0-3): queue order, and who may preempt whom"
    )

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_by_name_or_rank(cls, value: object) -> object:
        return priority_name(value)


class DeployQuery(Request):
    wait: float = Field(0.0, ge=0, le=600, description="seconds to wait for running or failed")


class StopRequest(Request):
    deployment_id: str = Field(min_length=1, max_length=64)


Strategy = Literal["spread", "binpack"]


class CandidateExplanation(Wire):
    """One agent in a placement explanation: its load score when it fits, or why it was turned away.

    `free_cpus_after` and `free_memory_mb_after` are what binpack ranks by (lower wins), so a reader sees why
    a busier agent was chosen; spread ranks by `score` and leaves them out.
    """

    agent_id: str
    score: float | None = None
    rejected: str | None = None
    free_cpus_after: float | None = None
    free_memory_mb_after: float | None = None


class RejectionCount(Wire):
    """Agents turned away for one reason: how many, and a few of them (the ones shortest of what was asked)."""

    code: Literal["state", "runtime", "cpus", "memory_mb", "gpus", "gpu_memory_mb"]
    reason: str = Field(description="reads after the count: '9,000 with fewer than 2 CPUs free'")
    count: int = Field(ge=1)
    examples: list[str]


class PlacementExplanation(Wire):
    """Why placement chose an agent, or none, in a size that does not grow with the cluster.

    Small snapshots (`complete`) list every agent: the fitting ones best first, then the rejected ones by id.
    Larger ones list the chosen agent and the next best few. `rejections` always counts every agent turned away:
    states and runtime partition the agents; each resource counts, among the live agents offering the runtime,
    those short of it, so an agent short of several resources is counted under each.
    """

    strategy: Strategy
    agents: int = Field(description="agents in the snapshot")
    eligible: int = Field(description="live agents offering the runtime: those the resource filters judged")
    chosen: str | None = None
    candidates: list[CandidateExplanation] = Field(default_factory=list)
    complete: bool = Field(description="candidates lists every agent of the snapshot")
    rejections: list[RejectionCount] = Field(default_factory=list)
    decided_at: datetime | None = None


class Deployment(Wire):
    deployment_id: str
    model_id: str
    model_name: str
    version: int
    status: DeploymentStatus
    agent_id: str | None = None
    url: str | None = None
    reason: str | None = None
    runtime: str = "process"
    placement: list[CandidateExplanation] = Field(default_factory=list)
    placement_explanation: PlacementExplanation | None = Field(
        None, description="the whole explanation (with rejection counts); `placement` repeats its candidates"
    )
    priority: PriorityName = "normal"
    generation: int = Field(0, ge=0, description="how many times it was placed; commands and reports carry it")
    attempts: int = Field(0, ge=0, description="commands to its agent that failed since it was last placed")
    created_at: datetime
    updated_at: datetime


class DeploymentList(Wire):
    deployments: list[Deployment]


class AgentView(Wire):
    agent_id: str
    url: str
    state: Literal["alive", "suspect", "lost"]
    last_seen: datetime
    runtimes: list[str]
    capacity: AgentCapacity
    load: AgentLoad
    score: float
    deployments: list[DeploymentReport]


class AgentList(Wire):
    agents: list[AgentView]
    liveness: LivenessState | None = Field(None, description="whether agents may be declared lost now, and why not")


# --------------------------------------------------------------------------- agent


FENCE_DOC = ("the epoch of the leader lease of the controller that sends the command; an agent refuses one lower "
             "than it accepted before, or none once it accepted one (409 stale_leader)")


class CreateVmRequest(Request):
    deployment_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    model_id: str
    version: int = Field(ge=1)
    runtime: str = "process"
    generation: int = Field(
        0, ge=0, description="the controller's placement number: a repeat (same or older) is answered with what is "
        "held; a newer one restarts a copy that was stopped or failed here"
    )
    fence: int | None = Field(None, ge=1, le=2**63 - 1, description=FENCE_DOC)


class StopVmRequest(Request):
    deployment_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    generation: int | None = Field(
        None, ge=0, description="stop only a copy of this placement or older; a newer copy is left running"
    )
    fence: int | None = Field(None, ge=1, le=2**63 - 1, description=FENCE_DOC)


class AgentDeployment(Wire):
    deployment_id: str
    model_id: str
    version: int
    runtime: str
    status: DeploymentStatus
    url: str | None = None
    port: int | None = None
    reason: str | None = None
    generation: int = 0


class HealthResponse(Wire):
    status: Literal["ok"] = "ok"
    service: str
    version: str



# --------------------------------------------------------------------------- identities (controller)


class JoinRequest(Request):
    """An agent asks for its own certificate with a join token (`POST /controller/join`, unsigned)."""

    join_token: str = Field(min_length=20, max_length=4096)
    agent_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    url: str = Field(min_length=8, max_length=512, description="where the agent serves: commands go only there")
    public_key: str = Field(min_length=40, max_length=64, description="base64url raw Ed25519 public key")


class RenewRequest(Request):
    """An agent (signed by its current certificate) asks for a new one for a new key (`POST /controller/renew`)."""

    public_key: str = Field(min_length=40, max_length=64)


class IssuedCertificate(Wire):
    certificate: str = Field(description="the certificate token (see miaas.identity)")
    subject: str
    role: str
    serial: str
    not_after: datetime
    url: str | None = None


class JoinTokenRequest(Request):
    ttl_s: float = Field(3600.0, gt=0, le=7 * 24 * 3600, allow_inf_nan=False)
    uses: int = Field(1, ge=1, le=10_000)


class JoinTokenIssued(Wire):
    join_token: str = Field(description="shown once: give it to the agents that are to join")
    serial: str
    uses: int
    expires_at: datetime


class RevokeRequest(Request):
    """Revoke a certificate or join token by serial, or every certificate of a subject (an agent id)."""

    serial: str | None = Field(None, min_length=16, max_length=64)
    subject: str | None = Field(None, min_length=1, max_length=128)
    reason: str = Field("", max_length=500)


class Revocation(Wire):
    serial: str
    subject: str | None = None
    reason: str = ""
    revoked_at: datetime


class RevokeResult(Wire):
    revoked: list[Revocation]


class RevokedList(Wire):
    """Every revoked serial; every service fetches this every few seconds."""

    serials: list[str]


class IdentityView(Wire):
    """A certificate the controller issued (agents) and whether it is revoked."""

    serial: str
    subject: str
    role: str
    url: str | None = None
    issued_at: datetime
    not_after: datetime
    revoked_at: datetime | None = None


class IdentityList(Wire):
    identities: list[IdentityView]
