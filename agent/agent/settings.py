"""Settings of the agent (env prefix AGENT_)."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from agent.firewall import Endpoint, parse_endpoint
from agent.health import HealthPolicy
from miaas.settings import ServiceSettings

_RANGE = re.compile(r"^\s*(\d{1,5})\s*-\s*(\d{1,5})\s*$")
_RANGE_ANY = re.compile(r"^\s*(\d{1,10})\s*-\s*(\d{1,10})\s*$")


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_uid_range(value: str) -> tuple[int, int]:
    """'lo-hi' → (lo, hi), both inclusive, 1000 ≤ lo ≤ hi < 65534 (no system uid, never nobody)."""
    match = _RANGE_ANY.match(value)
    if match is None:
        raise ValueError(f"uid range must look like 'lo-hi' (e.g. 61000-61999), not {value!r}")
    lo, hi = int(match[1]), int(match[2])
    if not 1000 <= lo <= hi < 65534:
        raise ValueError(f"uid range {value!r} must satisfy 1000 <= lo <= hi < 65534")
    return lo, hi


def default_agent_id() -> str:
    return f"agent-{socket.gethostname()}"


def parse_port_range(value: str) -> tuple[int, int]:
    """'lo-hi' → (lo, hi), both inclusive, 1024 ≤ lo ≤ hi ≤ 65535."""
    match = _RANGE.match(value)
    if match is None:
        raise ValueError(f"port range must look like 'lo-hi' (e.g. 20000-29999), not {value!r}")
    lo, hi = int(match[1]), int(match[2])
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"port range {value!r} must satisfy 1024 <= lo <= hi <= 65535")
    return lo, hi


def check_http_url(value: str, name: str) -> str:
    """An http(s) URL with a host, without a trailing slash; a clear error naming the setting otherwise."""
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"{name} must be an http(s) URL such as http://controller:8520, not {value!r}: {exc}") \
            from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} must be an http(s) URL such as http://controller:8520, not {value!r}")
    return value.strip().rstrip("/")


class AgentSettings(ServiceSettings):
    """The agent's settings. Its identity (agent/README.md, "Identity"): `credential_file` holds its key and
    certificate once it has joined; `join_token` is exchanged for one at the controller (`controller_url`) when
    there is none yet."""

    model_config = SettingsConfigDict(env_prefix="AGENT_")

    port: int = Field(8600, ge=0, le=65535)
    credential_file: Path | None = Field(  # type: ignore[assignment]
        None, description="the agent's key and certificate (mode 0600), written when it joins; default "
                          "<state_dir>/credential.json")
    join_token: SecretStr | None = Field(
        None, description="a join token (POST /controller/join-tokens): exchanged for the agent's own credential "
                          "when it has none yet; not needed afterwards")
    controller_url: str | None = Field(
        None, description="where the agent joins, renews its certificate and fetches revocations: one URL, or "
                          "several separated by commas (the leader among them is used, else any that answers); "
                          "default: found through the service registry, which cannot be asked before the agent has "
                          "joined")
    renewal_check_s: float = Field(
        60.0, gt=0, le=86_400, description="seconds between two checks of whether the certificate is due for renewal")
    agent_id: str = Field(
        default_factory=default_agent_id,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="stable identity of this agent: its metrics key and its service-registry instance id",
    )
    state_dir: Path = Field(Path(".miaas/agent"), description="one folder per deployment, with its model.log")
    venv_cache_dir: Path = Field(Path(".miaas/venvs"), description="virtualenvs by requirements hash; shareable")
    port_range: str = Field("20000-29999", description="host ports handed to deployments, 'lo-hi' inclusive")
    advertise_host: str = Field("127.0.0.1", description="host name or address put in deployment URLs")
    metrics_interval_s: float = Field(5.0, gt=0, description="seconds between two system-metrics messages")
    extra_load_percent: float = Field(
        0.0,
        ge=0,
        le=100,
        description="TEST SETTING: added to the reported CPU % and memory % (capped at 100) to fake load",
    )
    capacity_cpus: float | None = Field(
        None, gt=0, description="CPUs offered to deployments (default: the machine's); smaller keeps some back"
    )
    capacity_memory_mb: float | None = Field(
        None, gt=0, description="memory offered to deployments in MB (default: the machine's)"
    )
    runtimes: list[str] = Field(default_factory=lambda: ["process"], min_length=1, description="JSON list")
    provision_timeout_s: float = Field(600.0, gt=0, description="bound on venv + setup + start until it answers")
    stop_grace_s: float = Field(10.0, ge=0, description="SIGTERM → SIGKILL delay when stopping a model")
    stop_deployments_on_exit: bool = True

    # ---- the health watch of running deployments (agent/README.md, "Health and restarts")
    health_interval_s: float = Field(5.0, gt=0, le=3600, description="seconds between two health probes of a "
                                                                      "running deployment")
    health_timeout_s: float = Field(2.0, gt=0, le=600, description="a health probe that takes longer fails")
    health_failures: int = Field(3, ge=1, le=1000, description="failed health probes in a row that restart a "
                                                               "deployment (a process or VM that exited: at once)")
    restart_delay_s: float = Field(1.0, ge=0, le=3600, description="wait before the first restart in place; "
                                                                   "doubles with each restart within the window")
    restart_max_delay_s: float = Field(60.0, ge=0, le=86_400, description="the longest wait before a restart")
    restart_attempts: int = Field(5, ge=0, le=1000, description="restarts in place within the window before the "
                                                                "next failure fails the deployment (0: never restart)")
    restart_window_s: float = Field(300.0, gt=0, le=86_400, description="the window restarts are counted in")

    # ---- the process runtime's sandbox (agent/README.md, "The sandbox")
    sandbox: Literal["bwrap", "none"] = Field(
        "bwrap", description="bwrap: each model in bubblewrap as a uid of its own; none: as the agent (trusted only)"
    )
    sandbox_uid_range: str = Field("61000-61999", description="uids handed to sandboxed models, 'lo-hi' inclusive")
    sandbox_allow_outbound: list[str] = Field(
        default_factory=list,
        description="JSON list of [tcp:|udp:]ADDRESS[/PREFIX][:PORT] a model may connect to (default: nowhere)",
    )
    sandbox_deny_ports: list[int] = Field(
        default_factory=lambda: [8500, 8510, 8520, 8600, 8080, 9092],
        description="TCP ports refused to models on every address even when allow-listed (the agent's own port, "
                    "the service registry's and the broker's are always added)",
    )
    sandbox_env: dict[str, str] = Field(
        default_factory=dict, description="JSON object of extra variables for every sandboxed model"
    )
    sandbox_lock_dir: Path = Field(
        Path("/run/miaas-sandbox"), description="host-wide uid locks of the sandbox (shared by a host's agents)"
    )

    # ---- logs
    logs_follow_max_s: float = Field(600.0, gt=0, description="a followed log ends after this many seconds at most")
    logs_write_timeout_s: float = Field(
        30.0, gt=0, description="a followed log ends when a client takes longer than this to take a chunk"
    )
    logs_max_follows: int = Field(8, ge=1, description="log follows at once; more are refused with 503")

    # ---- how model files reach this agent (agent/README.md, "Model files: NFS or the HTTP cache")
    model_files: Literal["nfs", "http", "auto"] = Field(
        "auto", description="nfs: the version folder on the model store mounted here (MODEL_STORE); http: pulled "
                            "from the model registry into the local model cache; auto: the store when it shows the "
                            "version, else http")
    model_cache_dir: Path | None = Field(
        None, description="the local cache of versions pulled over HTTP (read-only folders, an index); default "
                          "<state_dir>/model-cache")
    model_cache_max_bytes: int = Field(
        10 << 30, ge=1 << 20, description="bytes the model cache may hold (least recently used versions not in use "
                                          "are evicted to stay under it); at least 1 MiB")

    # ---- the vagrant runtime (agent/README.md, "The vagrant runtime")
    model_store: Path = Field(
        Path(".miaas/models"),
        validation_alias=AliasChoices("model_store", "MODEL_STORE"),
        description="the model store root as mounted here; each VM gets its version folder exported to it alone",
    )
    wheelhouse_dir: Path = Field(
        Path(".miaas/wheelhouse"), description="wheels by requirements hash, exported read-only to the VMs"
    )
    vagrant_box: str = Field("miaas/debian12", description="the box of the VMs (bootstrap/build-box.sh adds it)")
    vagrant_home: Path | None = Field(None, description="VAGRANT_HOME of vagrant commands (default ~/.vagrant.d)")
    vagrant_acceleration: Literal["kvm", "tcg"] = Field(
        "kvm", description="kvm, or tcg (software emulation) where KVM is missing or unusable (nested VMs)"
    )
    vagrant_libvirt_uri: str = Field("qemu:///system", description="libvirt connection of the VMs")
    vagrant_boot_timeout_s: int = Field(600, gt=0, description="Vagrant's boot_timeout: boot until SSH answers")
    vagrant_min_memory_mb: int = Field(512, gt=0, description="a VM gets at least this much memory")
    vagrant_forward_host_ip: str = Field("0.0.0.0", description="host address the VMs' forwarded ports listen on")
    vagrant_nfs_server: str = Field(
        "192.168.121.1",
        description="this host's nfs-ganesha as the VMs reach it (an IPv4 address: the firewall lets only it through)",
    )
    vagrant_nfs_options: str = Field("vers=4.1", description="NFS mount options in the VM (ro is always added)")
    vagrant_nfs_exports_file: Path = Field(
        Path(".miaas/nfs/vm-exports.conf"),
        description="the per-deployment EXPORT blocks the agent writes; this host's nfs-ganesha %includes it",
    )
    vagrant_nfs_pid_file: Path = Field(
        Path(".miaas/nfs/ganesha.pid"), description="nfs-ganesha's pid file: SIGHUP makes it reread the exports"
    )
    vagrant_network_name: str = Field(
        "vagrant-libvirt", pattern=r"^[A-Za-z0-9_.-]+$",
        description="the VMs' libvirt network (vagrant-libvirt's management network); the agent makes it if missing",
    )
    vagrant_network: str = Field("192.168.121.0/24", description="its IPv4 subnet; this host is its first address")
    vagrant_firewall: bool = Field(
        True, description="nftables rules: a VM reaches only the NFS server and DHCP (off: development only)"
    )
    vagrant_guest_python: str = Field(
        "3.11", pattern=r"^3\.\d+$", description="Python version of the box: wheels are made for it"
    )
    vagrant_insert_key: bool = Field(
        False, description="Vagrant replaces the box's SSH key in each VM (the box's key is made at its build)"
    )

    @field_validator("credential_file")
    @classmethod
    def _credential_is_readable(cls, value: Path | None) -> Path | None:
        """A credential file that exists must be one; a missing one is made when the agent joins."""
        from miaas.identity import Credential

        if value is not None and value.exists():
            Credential.load(value)
        return value

    @field_validator("join_token")
    @classmethod
    def _looks_like_a_join_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value().strip()
        head, sep, secret = raw.partition("~")
        if not sep or not secret or "." not in head or len(raw) < 20:
            raise ValueError("AGENT_JOIN_TOKEN is not a join token (<certificate>~<secret>, as answered by "
                             "POST /controller/join-tokens)")
        return SecretStr(raw)

    @field_validator("controller_url")
    @classmethod
    def _valid_controller_url(cls, value: str | None) -> str | None:
        """One URL, or several separated by commas (a leading controller and its standbys)."""
        if value is None:
            return None
        urls = [check_http_url(url, "AGENT_CONTROLLER_URL") for url in value.split(",") if url.strip()]
        if not urls:
            raise ValueError(f"AGENT_CONTROLLER_URL must name at least one http(s) URL, not {value!r}")
        return ",".join(urls)

    @model_validator(mode="after")
    def _delays_in_order(self) -> AgentSettings:
        if self.restart_max_delay_s < self.restart_delay_s:
            raise ValueError(f"AGENT_RESTART_MAX_DELAY_S ({self.restart_max_delay_s:g}) must be at least "
                             f"AGENT_RESTART_DELAY_S ({self.restart_delay_s:g})")
        return self

    @property
    def health_policy(self) -> HealthPolicy:
        """How running deployments are watched and restarted in place."""
        return HealthPolicy(
            interval_s=self.health_interval_s, timeout_s=self.health_timeout_s, failures=self.health_failures,
            delay_s=self.restart_delay_s, max_delay_s=self.restart_max_delay_s, attempts=self.restart_attempts,
            window_s=self.restart_window_s,
        )

    @property
    def controller_urls(self) -> list[str]:
        """The controllers AGENT_CONTROLLER_URL names (empty: none)."""
        return self.controller_url.split(",") if self.controller_url else []

    @property
    def model_cache_path(self) -> Path:
        """Where the model cache is."""
        return (self.model_cache_dir or self.state_dir / "model-cache").absolute()

    @property
    def credential_path(self) -> Path:
        """Where the agent's credential is (or is written when it joins)."""
        return (self.credential_file or self.state_dir / "credential.json").absolute()

    @field_validator("vagrant_network")
    @classmethod
    def _valid_network(cls, value: str) -> str:
        ipaddress.IPv4Network(value)
        return value

    @field_validator("port_range")
    @classmethod
    def _valid_range(cls, value: str) -> str:
        parse_port_range(value)
        return value

    @property
    def port_bounds(self) -> tuple[int, int]:
        return parse_port_range(self.port_range)

    @field_validator("sandbox_uid_range")
    @classmethod
    def _valid_uid_range(cls, value: str) -> str:
        parse_uid_range(value)
        return value

    @field_validator("sandbox_allow_outbound")
    @classmethod
    def _valid_endpoints(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_endpoint(entry)
        return value

    @field_validator("sandbox_deny_ports")
    @classmethod
    def _valid_ports(cls, value: list[int]) -> list[int]:
        bad = [p for p in value if not 1 <= p <= 65535]
        if bad:
            raise ValueError(f"ports must be 1-65535, not {bad}")
        return value

    @field_validator("sandbox_env")
    @classmethod
    def _valid_env(cls, value: dict[str, str]) -> dict[str, str]:
        bad = sorted(k for k in value if not _ENV_NAME.match(k))
        if bad:
            raise ValueError(f"variable names must look like NAME_1, not {bad}")
        return value

    @property
    def sandbox_uid_bounds(self) -> tuple[int, int]:
        return parse_uid_range(self.sandbox_uid_range)

    @property
    def sandbox_endpoints(self) -> list[Endpoint]:
        return [parse_endpoint(entry) for entry in self.sandbox_allow_outbound]

    @property
    def sandbox_denied_ports(self) -> list[int]:
        """sandbox_deny_ports plus the cluster ports this agent knows: its own, the service registry's, the
        broker's."""
        ports = set(self.sandbox_deny_ports)
        if self.port:
            ports.add(self.port)
        for url in (self.service_registry_url, self.public_url):
            if url:
                try:
                    parts = urlsplit(url)
                    ports.add(parts.port or (443 if parts.scheme == "https" else 80))
                except ValueError:
                    pass
        for server in self.kafka_bootstrap.split(","):
            _, _, port = server.strip().rpartition(":")
            if port.isdigit() and 1 <= int(port) <= 65535:
                ports.add(int(port))
        return sorted(ports)
