"""The cluster file of `bootstrap/bootstrap.sh`: hosts, their roles, SSH and the cluster's settings.

The file is never sourced (it is data, not a script): each line is `KEY=VALUE` (an optional `export `, a value
optionally in single or double quotes, `#` comments and blank lines). Every problem is collected and reported at
once, each naming its line or host, before any host is touched.

    HOST_<name>=<address>          a host (name: lower case letters, digits, `_`; address: IPv4 or DNS name)
    ROLES_<name>=<role>,<role>     its roles (ROLES below)
    SSH_USER, SSH_KEY, SSH_PORT    how to reach every host (keys only; a user other than root needs sudo -n)
    SSH_KNOWN_HOSTS                a known_hosts file the hosts' keys must be in; empty: each key is recorded on
                                   first contact (in the state folder) and checked on every later run
    <service settings>             any setting of .env.example (MIAAS_*, AGENT_*, CONTROLLER_*, ...), or PIP_*
                                   (agents' model virtualenvs: a mirror or a wheelhouse), given to the services
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("broker", "database", "service-registry", "model-registry", "controller", "portal", "agent", "nfs")
ROLE_ALIASES = {"frontend": "portal", "postgres": "database", "postgresql": "database", "kafka": "broker"}
# (least, most) hosts per role; None: unbounded.
ROLE_COUNTS: dict[str, tuple[int, int | None]] = {
    "broker": (1, 1), "database": (1, 1), "service-registry": (1, 1), "model-registry": (1, 1),
    "controller": (1, 2), "portal": (1, 1), "agent": (1, None), "nfs": (0, 1),
}
DEFAULT_PORTS = {"broker": 9092, "database": 5432, "service-registry": 8500, "model-registry": 8510,
                 "controller": 8520, "portal": 8080, "agent": 8600}
# The env prefix of each service's settings (`<PREFIX>_PORT`...).
PREFIXES = {"service-registry": "SERVICE_REGISTRY", "model-registry": "MODEL_REGISTRY", "controller": "CONTROLLER",
            "portal": "FRONTEND", "agent": "AGENT"}
SETTING_PREFIXES = ("MIAAS_", "SERVICE_REGISTRY_", "MODEL_REGISTRY_", "CONTROLLER_", "AGENT_", "FRONTEND_", "PIP_")
# What the installer sets itself, per host: a value in the file would be overwritten, so it is refused.
MANAGED_SUFFIXES = ("_HOST", "_PUBLIC_URL", "_CREDENTIAL_FILE", "_DATABASE_URL", "_ADVERTISE_HOST", "_CA_KEY_FILE",
                    "_STATE_DIR", "_AGENT_ID", "_JOIN_TOKEN", "_CONTROLLER_URL", "_CONTROLLER_ID")
MANAGED = {"MIAAS_CA_FILE", "MIAAS_SERVICE_REGISTRY_URL", "MIAAS_KAFKA_BOOTSTRAP", "MODEL_STORE", "CONTROLLER_ID"}
SECRETS = ("FRONTEND_SECRET_KEY", "FRONTEND_ADMIN_PASSWORD")
PLACEHOLDER = re.compile(r"^(|change[-_ ]?me.*|<.*>|x{3,}|secret|password|todo|fixme|\*+|\.\.\.)$", re.IGNORECASE)
NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,31}$")
KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")
DNS_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                      r"[A-Za-z0-9])?)*$")


class ConfigError(Exception):
    """The cluster file has problems: every one of them, each naming its line or host."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))

    def __str__(self) -> str:
        return f"{self.path} has {len(self.problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in self.problems)


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    roles: tuple[str, ...]

    def has(self, role: str) -> bool:
        return role in self.roles


@dataclass
class ClusterConfig:
    path: Path
    hosts: dict[str, Host]
    settings: dict[str, str]  # the service settings of the file, given to the services
    ssh_user: str = "root"
    ssh_key: Path | None = None
    ssh_port: int = 22
    ssh_known_hosts: Path | None = None
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))

    def with_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts.values() if h.has(role)]

    def one(self, role: str) -> Host:
        return self.with_role(role)[0]

    def url(self, role: str, host: Host) -> str:
        return f"http://{host.address}:{self.ports[role]}"


def parse_lines(text: str, path: Path) -> tuple[dict[str, tuple[int, str]], list[str]]:
    """KEY=VALUE lines → {key: (line number, value)}, and the problems found (never executes anything)."""
    values: dict[str, tuple[int, str]] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not KEY.match(key) and not key.startswith(("HOST_", "ROLES_")):
            problems.append(f"line {number}: not KEY=VALUE: {raw[:80]!r}")
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif value[:1] in "'\"":
            problems.append(f"line {number}: {key}: unterminated quote")
            continue
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        if any(c in value for c in ("\n", "\0")) or "$(" in value or "`" in value:
            problems.append(f"line {number}: {key}: command substitution is not supported (the file is not a script)")
            continue
        if key in values:
            problems.append(f"line {number}: {key} is set twice (first on line {values[key][0]})")
            continue
        values[key] = (number, value)
    return values, problems


def _address_ok(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return bool(DNS_NAME.match(address))


def load(path: Path) -> ClusterConfig:
    """Read and validate the cluster file; ConfigError with every problem found."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(path, [f"cannot read it: {exc.strerror}"]) from exc
    values, problems = parse_lines(text, path)
    hosts: dict[str, Host] = {}
    settings: dict[str, str] = {}
    addresses: dict[str, str] = {}
    roles_of: dict[str, tuple[int, str]] = {}
    for key, (number, value) in values.items():
        if key.startswith("ROLES_"):
            roles_of[key[len("ROLES_"):]] = (number, value)
    for key, (number, value) in values.items():
        if key.startswith("HOST_"):
            name = key[len("HOST_"):]
            if not NAME.match(name):
                problems.append(f"line {number}: host name {name!r}: use lower case letters, digits and _")
                continue
            if not _address_ok(value):
                problems.append(f"line {number}: host {name}: {value!r} is not an IP address or DNS name")
                continue
            if value in addresses:
                problems.append(f"line {number}: host {name}: address {value} is host {addresses[value]}'s too")
                continue
            addresses[value] = name
            if name not in roles_of:
                problems.append(f"line {number}: host {name} has no ROLES_{name} line")
                continue
            roles: list[str] = []
            for role in (r.strip() for r in roles_of[name][1].split(",")):
                role = ROLE_ALIASES.get(role, role)
                if role not in ROLES:
                    problems.append(f"line {roles_of[name][0]}: host {name}: unknown role {role!r} "
                                    f"(roles: {', '.join(ROLES)})")
                elif role in roles:
                    problems.append(f"line {roles_of[name][0]}: host {name}: role {role} given twice")
                else:
                    roles.append(role)
            hosts[name] = Host(name, value, tuple(roles))
        elif key.startswith("ROLES_"):
            if key[len("ROLES_"):] not in {k[len("HOST_"):] for k in values if k.startswith("HOST_")}:
                problems.append(f"line {number}: {key} names no host (add HOST_{key[len('ROLES_'):]}=<address>)")
        elif key.startswith("SSH_"):
            continue
        elif key in MANAGED or (key.startswith(SETTING_PREFIXES) and key.endswith(MANAGED_SUFFIXES)
                                and key not in SECRETS):
            problems.append(f"line {number}: {key} is set by the installer for each host; remove it")
        elif key.startswith(SETTING_PREFIXES):
            settings[key] = value
        else:
            problems.append(f"line {number}: unknown setting {key} (hosts: HOST_/ROLES_, SSH_*, and the services' "
                            f"settings: {', '.join(p + '*' for p in SETTING_PREFIXES)})")
    problems += _check_roles(hosts.values())
    for key in SECRETS:
        if key in settings and PLACEHOLDER.match(settings[key]):
            problems.append(f"line {values[key][0]}: {key} is a placeholder ({settings[key]!r}): put a real secret, "
                            "or remove the line and the installer generates one")
    ssh_user = values.get("SSH_USER", (0, "root"))[1] or "root"
    ssh_port = 22
    if "SSH_PORT" in values:
        try:
            ssh_port = int(values["SSH_PORT"][1])
            if not 0 < ssh_port < 65536:
                raise ValueError
        except ValueError:
            problems.append(f"line {values['SSH_PORT'][0]}: SSH_PORT must be a port number")
    ssh_key = _path_setting(values, "SSH_KEY", path, problems)
    if ssh_key is not None and not ssh_key.is_file():
        problems.append(f"line {values['SSH_KEY'][0]}: SSH_KEY {ssh_key} is not a file")
    known = _path_setting(values, "SSH_KNOWN_HOSTS", path, problems)
    if known is not None and not known.is_file():
        problems.append(f"line {values['SSH_KNOWN_HOSTS'][0]}: SSH_KNOWN_HOSTS {known} is not a file (leave it "
                        "empty to record each host's key on first contact)")
    for key in values:
        if key.startswith("SSH_") and key not in ("SSH_USER", "SSH_KEY", "SSH_PORT", "SSH_KNOWN_HOSTS"):
            problems.append(f"line {values[key][0]}: unknown setting {key} (SSH_USER, SSH_KEY, SSH_PORT, "
                            "SSH_KNOWN_HOSTS)")
    ports = dict(DEFAULT_PORTS)
    for role, prefix in PREFIXES.items():
        if f"{prefix}_PORT" in settings:
            try:
                ports[role] = int(settings.pop(f"{prefix}_PORT"))
                if not 0 < ports[role] < 65536:
                    raise ValueError
            except ValueError:
                problems.append(f"line {values[prefix + '_PORT'][0]}: {prefix}_PORT must be a port number (not 0: "
                                "the others must know it)")
    if problems:
        raise ConfigError(path, problems)
    return ClusterConfig(path, hosts, settings, ssh_user, ssh_key, ssh_port, known, ports)


def _path_setting(values: dict[str, tuple[int, str]], key: str, base: Path, problems: list[str]) -> Path | None:
    if key not in values or not values[key][1]:
        return None
    p = Path(values[key][1]).expanduser()
    return p if p.is_absolute() else (base.parent / p)


def _check_roles(hosts: Iterable[Host]) -> list[str]:
    problems = []
    hosts = list(hosts)
    if not hosts:
        return ["no hosts: add HOST_<name>=<address> and ROLES_<name>=<roles> lines"]
    for role, (least, most) in ROLE_COUNTS.items():
        having = [h.name for h in hosts if h.has(role)]
        if len(having) < least:
            problems.append(f"no host has the role {role} (add it to a ROLES_ line)")
        elif most is not None and len(having) > most:
            problems.append(f"role {role} is on {len(having)} hosts ({', '.join(having)}); at most {most}")
    return problems
