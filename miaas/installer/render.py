"""What each host gets: its units, their settings, its identities and configuration files, as plain data.

Rendering is pure: the same cluster file, secrets and identities give byte-identical files, so a second run finds
nothing to change and the supervisor restarts nothing. A unit's settings live in its own env file
(`/etc/miaas/env/<unit>.env`): a change to one service's settings restarts that service only.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field

from miaas.installer.config import PREFIXES, ClusterConfig, Host

ETC = "/etc/miaas"
VAR = "/var/lib/miaas"
PG_DATA = f"{VAR}/postgresql/data"
PG_SOCKET = f"{VAR}/postgresql/run"
MODEL_STORE = f"{VAR}/models"
NFS_STORE = "/srv/miaas/models"  # with an nfs host: the export, and the mount point on the registry and every agent
SCRIPTS = "/opt/miaas/bootstrap"
SERVICE_USER = "miaas"
# The order hosts are started in: each wave healthy before the next starts.
WAVES = (("broker", "database", "nfs"), ("service-registry",), ("model-registry", "controller"), ("portal",),
         ("agent",))
MODULES = {"service-registry": "service_registry", "model-registry": "model_registry", "controller": "controller",
           "portal": "frontend", "agent": "agent"}
UNIT_NAMES = {"broker": "broker", "database": "postgresql", "service-registry": "service-registry",
              "model-registry": "model-registry", "controller": "controller", "portal": "portal", "agent": "agent"}
DATABASES = {"controller": "miaas_controller", "model-registry": "miaas_model_registry", "portal": "miaas_portal"}
DB_USERS = {"controller": "miaas_controller", "model-registry": "miaas_model_registry", "portal": "miaas_portal"}


@dataclass
class File:
    path: str
    content: bytes
    mode: int = 0o644
    owner: str | None = None
    group: str | None = None

    def job(self) -> dict[str, object]:
        return {"path": self.path, "content": base64.b64encode(self.content).decode(), "mode": self.mode,
                "owner": self.owner, "group": self.group}


@dataclass
class Unit:
    role: str
    name: str
    command: list[str]
    user: str
    env: dict[str, str]
    health: str  # the URL whose /health answers when it is up, or tcp://host:port
    kill_mode: str = "group"
    stop_timeout_s: int = 20

    def files(self, inputs: list[File]) -> list[File]:
        env_path = f"{ETC}/env/{self.name}.env"
        env_text = "".join(f"{k}={v}\n" for k, v in sorted(self.env.items()))
        # The unit's identity (what the supervisor compares) follows every file it reads: a renewed credential or a
        # changed configuration restarts it; nothing else does.
        digest = hashlib.sha256(b"".join(f.path.encode() + b"\0" + f.content for f in inputs)).hexdigest()[:16]
        unit = {
            "command": self.command, "env_file": env_path, "env": {"MIAAS_UNIT_INPUTS": digest},
            "user": self.user, "cwd": f"{VAR}/{self.name}", "restart": "on-failure",
            "stop_timeout_s": self.stop_timeout_s, "kill_mode": self.kill_mode,
        }
        return [File(env_path, env_text.encode(), 0o600),
                File(f"{ETC}/units/{self.name}.json", (json.dumps(unit, indent=2, sort_keys=True) + "\n").encode())]


@dataclass
class HostPlan:
    host: Host
    units: list[Unit] = field(default_factory=list)
    files: dict[str, list[File]] = field(default_factory=dict)  # unit name → its files (identities, config)
    common: list[File] = field(default_factory=list)
    dirs: list[dict[str, object]] = field(default_factory=list)
    nfs: list[dict[str, object]] = field(default_factory=list)  # hostside `nfs` steps: the export, or its mount

    def unit_files(self, unit: Unit) -> list[File]:
        inputs = self.files.get(unit.name, [])
        return [*inputs, *unit.files(inputs)]

    def roles_in(self, wave: tuple[str, ...]) -> list[Unit]:
        return [u for u in self.units if u.role in wave]


@dataclass
class Inputs:
    """Everything rendering needs besides the cluster file."""

    release_python: str  # the release's interpreter on every host
    ca_public: bytes
    ca_key: bytes
    credentials: dict[str, bytes]  # service subject → credential file content
    secrets: dict[str, str]
    join_tokens: dict[str, str]  # host name → the token its agent's env file carries ("" = none)
    supervisor_source: bytes
    scripts: dict[str, bytes] = field(default_factory=dict)  # bootstrap/*.sh the nfs steps run, by name


def database_url(config: ClusterConfig, role: str, secrets: dict[str, str]) -> str:
    db = config.one("database")
    return (f"postgresql+psycopg://{DB_USERS[role]}:{secrets[f'PG_{DB_USERS[role].upper()}_PASSWORD']}"
            f"@{db.address}:{config.ports['database']}/{DATABASES[role]}")


def settings_for(config: ClusterConfig, prefix: str) -> dict[str, str]:
    """The cluster file's settings a service takes: its own prefix, the shared MIAAS_, and PIP_ for agents."""
    wanted = (f"{prefix}_", "MIAAS_") + (("PIP_",) if prefix == "AGENT" else ())
    return {k: v for k, v in config.settings.items() if k.startswith(wanted)}


def plan(config: ClusterConfig, inputs: Inputs) -> dict[str, HostPlan]:
    broker = config.one("broker")
    registry = config.one("service-registry")
    py = inputs.release_python
    common_env = {
        "MIAAS_CA_FILE": f"{ETC}/pki/ca.json",
        "MIAAS_KAFKA_BOOTSTRAP": f"{broker.address}:{config.ports['broker']}",
        "MIAAS_SERVICE_REGISTRY_URL": config.url("service-registry", registry),
        "PYTHONUNBUFFERED": "1",
    }
    controllers = ",".join(config.url("controller", h) for h in config.with_role("controller"))
    has_nfs = bool(config.with_role("nfs"))
    store = NFS_STORE if has_nfs else MODEL_STORE
    plans: dict[str, HostPlan] = {}
    for host in config.hosts.values():
        p = HostPlan(host)
        plans[host.name] = p
        p.common = [File(f"{ETC}/pki/ca.json", inputs.ca_public),
                    File("/opt/miaas/bin/miaas-supervise.py", inputs.supervisor_source, 0o755)]
        if has_nfs and (host.has("nfs") or host.has("model-registry") or host.has("agent")):
            p.common += [File(f"{SCRIPTS}/{n}", c, 0o755) for n, c in sorted(inputs.scripts.items())]
            p.nfs = _nfs_step(config, host)
        p.dirs = [{"path": d, "mode": 0o755} for d in (ETC, f"{ETC}/pki", f"{ETC}/env", f"{ETC}/units", VAR,
                                                       "/opt/miaas", "/opt/miaas/bin", "/opt/miaas/releases")]
        p.dirs[2]["mode"] = 0o700  # env files hold secrets
        for role in host.roles:
            if role == "nfs":
                continue  # the NFS server is set up by bootstrap/nfs-server.sh (see bootstrap/README.md)
            name = UNIT_NAMES[role]
            user = "root" if role == "agent" else ("postgres" if role == "database" else SERVICE_USER)
            if role != "database":
                p.dirs.append({"path": f"{VAR}/{name}", "mode": 0o750 if role != "agent" else 0o755,
                               "owner": user, "group": user})
            if role == "broker":
                port = config.ports["broker"]
                p.units.append(Unit(role, name, [py, "-m", "embedded_broker", "--host", host.address, "--port",
                                                 str(port)], user,
                                    {"HOME": f"{VAR}/{name}", "XDG_CACHE_HOME": f"{VAR}/{name}/cache",
                                     "PYTHONUNBUFFERED": "1"},
                                    f"tcp://{host.address}:{port}"))
                continue
            if role == "database":
                p.dirs.append({"path": f"{VAR}/postgresql", "mode": 0o700, "owner": "postgres", "group": "postgres"})
                p.dirs.append({"path": PG_SOCKET, "mode": 0o700, "owner": "postgres", "group": "postgres"})
                p.dirs.append({"path": f"{ETC}/postgresql", "mode": 0o700, "owner": "postgres", "group": "postgres"})
                conf, hba = _postgres_conf(config, host)
                p.files[name] = [File(f"{ETC}/postgresql/postgresql.conf", conf, 0o600, "postgres", "postgres"),
                                 File(f"{ETC}/postgresql/pg_hba.conf", hba, 0o600, "postgres", "postgres")]
                p.units.append(Unit(role, name, ["{pg_bin}/postgres", "-D", PG_DATA, "-c",
                                                 f"config_file={ETC}/postgresql/postgresql.conf"], user,
                                    {"LC_ALL": "C"}, f"tcp://{host.address}:{config.ports['database']}",
                                    stop_timeout_s=60))
                continue
            prefix = PREFIXES[role]
            url = config.url(role, host)
            env = {**common_env, **settings_for(config, prefix),
                   f"{prefix}_HOST": host.address, f"{prefix}_PORT": str(config.ports[role]),
                   f"{prefix}_PUBLIC_URL": url}
            files: list[File] = []
            if role != "agent":
                subject = "frontend" if role == "portal" else role
                cred = f"{ETC}/pki/{name}.json"
                files.append(File(cred, inputs.credentials[subject], 0o600, user, user))
                env[f"{prefix}_CREDENTIAL_FILE"] = cred
            if role in DATABASES:
                env[f"{prefix}_DATABASE_URL"] = database_url(config, role, inputs.secrets)
            if role == "model-registry":
                env["MODEL_STORE"] = store
                if not has_nfs:
                    p.dirs.append({"path": MODEL_STORE, "mode": 0o755, "owner": user, "group": user})
            if role == "controller":
                key = f"{ETC}/pki/ca-key.json"
                files.append(File(key, inputs.ca_key, 0o600, user, user))
                env["CONTROLLER_CA_KEY_FILE"] = key
                env["CONTROLLER_ID"] = host.name
            if role == "portal":
                env["FRONTEND_SECRET_KEY"] = inputs.secrets["FRONTEND_SECRET_KEY"]
                env["FRONTEND_ADMIN_PASSWORD"] = inputs.secrets["FRONTEND_ADMIN_PASSWORD"]
            if role == "agent":
                env.update({
                    "AGENT_AGENT_ID": f"agent-{host.name}", "AGENT_STATE_DIR": f"{VAR}/agent",
                    "AGENT_CONTROLLER_URL": controllers, "AGENT_ADVERTISE_HOST": host.address,
                    "AGENT_VENV_CACHE_DIR": f"{VAR}/venvs", "MODEL_STORE": store,
                    "HOME": f"{VAR}/agent",
                })
                env.setdefault("AGENT_MODEL_FILES", "auto" if has_nfs else "http")
                if inputs.join_tokens.get(host.name):
                    env["AGENT_JOIN_TOKEN"] = inputs.join_tokens[host.name]
            p.files[name] = files
            p.units.append(Unit(role, name, [py, "-m", MODULES[role]], user, env, url,
                                kill_mode="process" if role == "agent" else "group"))
    return plans


def _nfs_step(config: ClusterConfig, host: Host) -> list[dict[str, object]]:
    server = config.one("nfs")
    steps: list[dict[str, object]] = []
    if host.has("nfs"):
        clients = [h.address for h in config.with_role("model-registry")]
        clients += [h.address for h in config.with_role("agent") if h.address not in clients]
        steps.append({"action": "nfs", "side": "server", "store": NFS_STORE, "clients": clients,
                      "script": f"{SCRIPTS}/nfs-server.sh"})
    if host.has("model-registry") or host.has("agent"):
        steps.append({"action": "nfs", "side": "client", "store": NFS_STORE, "server": server.address,
                      "mode": "rw" if host.has("model-registry") else "ro", "script": f"{SCRIPTS}/nfs-client.sh"})
    return steps


def _postgres_conf(config: ClusterConfig, host: Host) -> tuple[bytes, bytes]:
    conf = "\n".join([
        "# Written by bootstrap.sh: MIaaS's PostgreSQL (the data folder is /var/lib/miaas/postgresql/data)",
        f"data_directory = '{PG_DATA}'",
        f"hba_file = '{ETC}/postgresql/pg_hba.conf'",
        f"ident_file = '{PG_DATA}/pg_ident.conf'",
        f"listen_addresses = '{host.address}'",
        f"port = {config.ports['database']}",
        f"unix_socket_directories = '{PG_SOCKET}'",
        "password_encryption = 'scram-sha-256'",
        "max_connections = 200",
        "shared_buffers = '128MB'",
        "log_destination = 'stderr'",
        "",
    ])
    # Only the hosts of the cluster, each by its own address, and only to the databases of the services it runs.
    lines = ["# TYPE DATABASE USER ADDRESS METHOD", "local all postgres peer"]
    for h in config.hosts.values():
        for role in h.roles:
            if role in DATABASES:
                lines.append(f"host {DATABASES[role]} {DB_USERS[role]} {h.address}/32 scram-sha-256")
    return conf.encode(), ("\n".join(dict.fromkeys(lines)) + "\n").encode()


def pg_bin_placeholder(unit: Unit, pg_bin: str) -> None:
    unit.command = [a.replace("{pg_bin}", pg_bin) for a in unit.command]

