"""The phases of `bootstrap.sh`, as `k0sctl apply` runs them: validate, connect, check, packages, software,
identities, files, start in waves, join the agents, wait until all is healthy.

Every check runs on every host before anything is changed; each problem names its host. Each phase prints one line
per host that changed something, so a second run prints "nothing changed" and restarts nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets as pysecrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests

from miaas import identity
from miaas.client import SignedSession
from miaas.cluster import Pki
from miaas.installer import render
from miaas.installer.config import ClusterConfig, Host
from miaas.installer.render import ETC, PG_DATA, PG_SOCKET, VAR, HostPlan, Inputs
from miaas.installer.ssh import HostError, Ssh

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
PYTHON_MIN = (3, 11)
DISK_MIN = 2 * 1024**3
SKEW_MAX_S = 5.0
PACKAGES = {"*": ["python3", "python3-venv"], "database": ["postgresql"], "agent": ["bubblewrap", "iptables"],
            "nfs": ["nfs-kernel-server"]}
AGENT_CREDENTIAL = f"{VAR}/agent/credential.json"


class InstallError(Exception):
    """The install cannot go on; every problem found is listed, each naming its host."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class Installer:
    config: ClusterConfig
    state_dir: Path
    only: str | None = None  # one host (re)installed alone
    check: bool = False  # say what would change, change nothing
    out: Callable[[str], None] = print
    ssh: Ssh = field(init=False)
    wheels: Path = field(init=False)
    digest: str = field(init=False)
    pki: Pki = field(init=False)  # the cluster's identities and secrets, loaded once per run by identities()
    secrets: dict[str, str] = field(init=False)
    changed: dict[str, list[str]] = field(default_factory=dict)
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ssh = Ssh(self.config, self.state_dir)
        if self.only is not None and self.only not in self.config.hosts:
            raise InstallError([f"--host {self.only}: no such host (hosts: {', '.join(self.config.hosts)})"])

    # ------------------------------------------------------------------ helpers

    @property
    def targets(self) -> list[Host]:
        hosts = list(self.config.hosts.values())
        return [h for h in hosts if h.name == self.only] if self.only else hosts

    def say(self, text: str) -> None:
        self.out(f"[{time.monotonic() - self.started:6.1f}s] {text}")

    def each(self, hosts: Iterable[Host], fn: Callable[[Host], T]) -> dict[str, T]:
        """`fn` on every host at once; every host's failure is collected, then raised together."""
        hosts = list(hosts)
        results: dict[str, T] = {}
        problems: list[str] = []
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(hosts)))) as pool:
            futures = {h.name: pool.submit(fn, h) for h in hosts}
            for name, fut in futures.items():
                try:
                    results[name] = fut.result()
                except HostError as exc:
                    problems.append(str(exc))
        if problems:
            raise InstallError(problems)
        return results

    def note(self, host: Host, phase: str, changes: list[str]) -> None:
        if changes:
            self.changed.setdefault(host.name, []).extend(changes)
            verb = "would change" if self.check else "changed"
            shown = ", ".join(changes[:6]) + (f" (+{len(changes) - 6} more)" if len(changes) > 6 else "")
            self.say(f"{host.name}: {phase}: {verb} {shown}")

    # ------------------------------------------------------------------ phases

    def install(self) -> None:
        self.say(f"cluster {self.config.path}: {len(self.config.hosts)} hosts"
                 + (f", installing {self.only} only" if self.only else "") + (" (check: nothing is changed)"
                                                                                if self.check else ""))
        self.gather_facts()
        self.verify_hosts()
        self.wheels, self.digest = build_wheelhouse(wheel_cache(), self.say)
        self.install_packages()
        release = self.ship_release()
        inputs = self.identities(release)
        plans = render.plan(self.config, inputs)
        for p in plans.values():
            pg_bin = self.facts.get(p.host.name, {}).get("pg_bin") or "/usr/lib/postgresql/15/bin"
            for u in p.units:
                render.pg_bin_placeholder(u, pg_bin)
        self.start_in_waves(plans, release)
        if not self.check:
            self.wait_for_agents()
        self.finish()

    def gather_facts(self) -> None:
        ports = sorted(set(self.config.ports.values()))
        packages = sorted({p for ps in PACKAGES.values() for p in ps})

        def one(h: Host) -> dict[str, Any]:
            t0 = time.time()
            f = self.ssh.job(h, "facts", ports=ports, packages=packages,
                             exists=[AGENT_CREDENTIAL, f"{PG_DATA}/PG_VERSION"],
                             read_env={f"{ETC}/env/agent.env": ["AGENT_JOIN_TOKEN"]}, timeout=60)
            f["skew"] = f["time"] - (t0 + time.time()) / 2
            return f

        self.facts = self.each(self.targets, one)
        self.say("connected: " + ", ".join(f"{n} ({f['os']['pretty']}, Python {f['python']})"
                                           for n, f in self.facts.items()))

    def verify_hosts(self) -> None:
        problems: list[str] = []
        for h in self.targets:
            f = self.facts[h.name]
            where = f"{h.name} ({h.address})"
            if not f["root"]:
                problems.append(f"{where}: not root (give SSH_USER passwordless sudo, or use root)")
            if f["os"]["id"] not in ("debian", "ubuntu"):
                problems.append(f"{where}: {f['os']['pretty']} is not supported (Debian 12 or Ubuntu 22.04+)")
            version = tuple(int(x) for x in (f["python"] or "0.0").split(".")[:2])
            if version < PYTHON_MIN:
                problems.append(f"{where}: Python {f['python'] or 'missing'}; {PYTHON_MIN[0]}.{PYTHON_MIN[1]}+ needed "
                                "(apt-get install -y python3 python3-venv)")
            elif not f["venv"] and "python3-venv" not in self._missing(h):
                problems.append(f"{where}: python3 cannot make virtualenvs (apt-get install -y python3-venv)")
            for path, free in f["disk_free"].items():
                if free < DISK_MIN:
                    problems.append(f"{where}: {free / 1024**3:.1f} GiB free for {path}; at least "
                                    f"{DISK_MIN / 1024**3:.0f} GiB needed")
            if abs(f["skew"]) > SKEW_MAX_S:
                problems.append(f"{where}: its clock is {f['skew']:+.1f}s off this machine's (at most "
                                f"{SKEW_MAX_S:.0f}s: signatures and leases depend on it; run NTP)")
            for role in h.roles:
                port = self.config.ports.get(role)
                taken = f["ports"].get(str(port)) if port else None
                if taken and not taken["ours"]:
                    problems.append(f"{where}: port {port} ({role}) is taken by pid {taken['pid']} "
                                    f"({taken['command'][:80]}); free it or set another port")
        if problems:
            raise InstallError(problems)
        self.say("checked: OS, Python, disk, clock and ports on every host")

    def _missing(self, h: Host) -> list[str]:
        wanted = list(PACKAGES["*"]) + [p for role in h.roles for p in PACKAGES.get(role, [])]
        return [p for p in wanted if p in self.facts[h.name]["missing_packages"]]

    def install_packages(self) -> None:
        def one(h: Host) -> None:
            missing = self._missing(h)
            if missing:
                r = self.ssh.job(h, "install_packages", packages=missing, dry_run=self.check, timeout=1200)
                self.note(h, "packages", r["changed"])

        self.each([h for h in self.targets if self._missing(h)], one)

    # ------------------------------------------------------------------ software

    def ship_release(self) -> str:
        """Build the wheels once here (cached by the source's digest), ship them where the release is missing,
        install each host's release virtualenv with no package index; the release's interpreter path."""
        wheels, digest = self.wheels, self.digest
        python = f"/opt/miaas/releases/{digest}/venv/bin/python"

        def one(h: Host) -> None:
            if digest in self.facts[h.name]["releases"]:
                return
            if self.check:
                self.note(h, "software", [f"release {digest}"])
                return
            self.ssh.run(h, ["mkdir", "-p", f"/opt/miaas/releases/{digest}"])
            self.ssh.send_tree(h, wheels, f"/opt/miaas/releases/{digest}/wheels")
            current = self._current_release(h)
            r = self.ssh.job(h, "install_release", digest=digest, keep=[current] if current else [], timeout=900,
                             python=self.facts[h.name]["python_path"])
            self.note(h, "software", r["changed"])

        self.each(self.targets, one)
        return python

    def _current_release(self, h: Host) -> str | None:
        done = self.ssh.run(h, ["sh", "-c", f"cat {ETC}/units/*.json 2>/dev/null | head -c 100000"], check=False)
        found = re.search(rb"/opt/miaas/releases/([0-9a-f]{16,64})/", done.stdout)
        return found.group(1).decode() if found else None

    # ------------------------------------------------------------------ identities and secrets

    def identities(self, release_python: str) -> Inputs:
        pki = Pki.ensure(self.state_dir / "pki")
        self.pki = pki
        secrets = self.secrets = load_secrets(self.state_dir / "secrets.env", self.config)
        tokens = self.join_tokens(pki)
        from miaas import supervise  # the supervisor ships as one file, run by the host's python3

        return Inputs(
            release_python=release_python, ca_public=pki.ca_file.read_bytes(), ca_key=pki.ca_key_file.read_bytes(),
            credentials={s: p.read_bytes() for s, p in pki.credentials.items() if s != identity.ADMIN},
            secrets=secrets, join_tokens=tokens, supervisor_source=Path(supervise.__file__).read_bytes(),
            scripts={n: (REPO / "bootstrap" / n).read_bytes() for n in ("nfs-server.sh", "nfs-client.sh")
                     if self.config.with_role("nfs")},
        )

    def join_tokens(self, pki: Pki) -> dict[str, str]:
        """Per agent host, the token its env file carries: an agent that holds its credential keeps the line it
        has (so its settings do not change); the others share one fresh token of as many uses."""
        tokens: dict[str, str] = {}
        new: list[str] = []
        for h in self.config.with_role("agent"):
            f = self.facts.get(h.name)
            if f is None:  # not a target of this run: its file is not rewritten
                continue
            kept = f["env"].get(f"{ETC}/env/agent.env:AGENT_JOIN_TOKEN", "")
            if f["exists"].get(AGENT_CREDENTIAL):
                tokens[h.name] = kept
            else:
                new.append(h.name)
        if new:
            token = pki.join_token(uses=len(new), ttl_s=3600)
            tokens.update(dict.fromkeys(new, token))
        return tokens

    # ------------------------------------------------------------------ files and services

    def start_in_waves(self, plans: dict[str, HostPlan], release_python: str) -> None:
        targets = {h.name for h in self.targets}
        first = True
        for wave in render.WAVES:
            hosts = [plans[n] for n in targets if plans[n].roles_in(wave) or first]
            if not hosts:
                continue

            def one(p: HostPlan, wave: tuple[str, ...] = wave, first: bool = first) -> None:
                h = p.host
                upto = [r for w in render.WAVES[: render.WAVES.index(wave) + 1] for r in w]
                files = list(p.common)
                for u in p.units:
                    if u.role in upto:
                        files += p.unit_files(u)
                has_db = "database" in wave and any(u.role == "database" for u in p.units)
                steps: list[dict[str, Any]] = []
                if first:
                    steps.append({"action": "ensure_user", "name": render.SERVICE_USER})
                steps.append({"action": "apply", "dirs": p.dirs, "files": [f.job() for f in files]})
                if has_db:
                    steps.append({"action": "postgres_init", "data": PG_DATA})
                # The model store on NFS: exported in the first wave, mounted before its registry or agent starts.
                for step in p.nfs:
                    side_wave = "nfs" if step["side"] == "server" else ("model-registry" if h.has("model-registry")
                                                                          else "agent")
                    if side_wave in wave:
                        steps.append(step)
                steps.append({"action": "supervise"})
                units = p.roles_in(wave)
                if units and not self.check:
                    steps.append({"action": "wait_health", "urls": {u.name: u.health for u in units},
                                  "timeout_s": 120})
                if has_db and not self.check:
                    steps.append({"action": "postgres_databases", "socket_dir": PG_SOCKET,
                                  "port": self.config.ports["database"], "databases": self._databases()})
                r = self.ssh.job(h, "batch", steps=steps, dry_run=self.check, timeout=600)
                self.note(h, "changes", r["changed"])

            self.each([p.host for p in hosts], lambda h: one(plans[h.name]))
            first = False
            started = [u.name for p in hosts for u in p.roles_in(wave)]
            if started:
                self.say(("would start " if self.check else "healthy: ") + ", ".join(sorted(set(started))))
        # Units and files of roles a host no longer has.
        def prune(h: Host) -> None:
            p = plans[h.name]
            files = list(p.common) + [f for u in p.units for f in p.unit_files(u)]
            r = self.ssh.job(h, "apply", dirs=p.dirs, files=[f.job() for f in files], dry_run=self.check,
                             remove_unlisted=[f"{ETC}/units/*.json", f"{ETC}/env/*.env", f"{ETC}/pki/*.json"])
            self.note(h, "removed", r["changed"])
            if r["changed"] and not self.check:
                self.note(h, "services", self.ssh.job(h, "supervise", timeout=180)["changed"])

        self.each(self.targets, prune)

    def _databases(self) -> list[dict[str, str]]:
        secrets = self.secrets
        return [{"user": render.DB_USERS[r], "database": render.DATABASES[r],
                 "password": secrets[f"PG_{render.DB_USERS[r].upper()}_PASSWORD"]} for r in render.DATABASES]

    # ------------------------------------------------------------------ agents and the end

    def admin(self) -> requests.Session:
        return SignedSession(self.pki.admin())

    def wait_for_agents(self, timeout: float = 120) -> None:
        """Until every agent host's agent is alive on a controller (asked as the operator, signed)."""
        wanted = {f"agent-{h.name}" for h in self.config.with_role("agent") if h in self.targets}
        if not wanted:
            return
        urls = [self.config.url("controller", h) for h in self.config.with_role("controller")]
        session = self.admin()
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            for url in urls:
                try:
                    resp = session.get(f"{url}/controller/agents", timeout=5)
                    if resp.status_code != 200:
                        last = f"{url}: HTTP {resp.status_code} {resp.text[:200]}"
                        continue
                    alive = {a["agent_id"] for a in resp.json()["agents"] if a["state"] == "alive"}
                    if wanted <= alive:
                        self.say(f"agents alive: {', '.join(sorted(wanted))}")
                        return
                    last = f"alive so far: {', '.join(sorted(alive)) or 'none'}"
                except requests.RequestException as exc:
                    last = f"{url}: {type(exc).__name__}"
            if time.monotonic() > deadline:
                raise InstallError([f"agents not alive on the controller within {timeout:.0f}s: "
                                    f"waiting for {', '.join(sorted(wanted))}; {last} (see "
                                    f"{VAR}/supervise/logs/agent.log on their hosts)"])
            time.sleep(0.5)

    def finish(self) -> None:
        took = time.monotonic() - self.started
        if not self.changed:
            self.say("nothing changed" + ("" if self.check else ", nothing restarted"))
        elif self.check:
            self.say(f"{sum(len(c) for c in self.changed.values())} change(s) on "
                     f"{len(self.changed)} host(s) would be made; run without --check to make them")
        portal = self.config.one("portal")
        self.out(f"portal: {self.config.url('portal', portal)}  (user admin; password: FRONTEND_ADMIN_PASSWORD in "
                 f"{self.state_dir / 'secrets.env'})")
        self.out(f"operator credential: {self.state_dir / 'pki' / 'admin.json'}")
        self.out(f"took {took:.1f}s")

    # ------------------------------------------------------------------ uninstall

    def uninstall(self, purge: bool = False) -> None:
        self.say(f"uninstalling from {', '.join(h.name for h in self.targets)}" + (" (and their data)" if purge
                                                                                    else ""))

        def one(h: Host) -> None:
            self.note(h, "uninstall", self.ssh.job(h, "uninstall", purge=purge, dry_run=self.check,
                                                  timeout=300)["changed"])

        self.each(self.targets, one)
        self.finish_uninstall()

    def finish_uninstall(self) -> None:
        if not self.changed:
            self.say("nothing to remove")
        self.out(f"took {time.monotonic() - self.started:.1f}s")


# ---------------------------------------------------------------------- operator-side state


SECRET_MAKERS: dict[str, Callable[[], str]] = {
    "FRONTEND_SECRET_KEY": lambda: pysecrets.token_hex(32),
    "FRONTEND_ADMIN_PASSWORD": lambda: pysecrets.token_urlsafe(15),
    **{f"PG_{u.upper()}_PASSWORD": (lambda: pysecrets.token_hex(24)) for u in render.DB_USERS.values()},
}


def load_secrets(path: Path, config: ClusterConfig) -> dict[str, str]:
    """The cluster's secrets: from the cluster file when given there, else generated once into `path` (0600)."""
    stored: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                stored[key.strip()] = value.strip()
    out = {k: config.settings.get(k) or stored.get(k) or make() for k, make in SECRET_MAKERS.items()}
    if out != stored:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in out.items()))
    return out


PACKAGE_DIRS = ["miaas", "kafka/embedded_broker", "service-registry/service_registry", "model-registry/model_registry",
                "controller/controller", "agent/agent", "frontend/frontend"]


def source_digest(repo: Path = REPO) -> str:
    """sha256 over the files a wheel of this repository holds (and pyproject.toml, README.md)."""
    h = hashlib.sha256()
    files = [repo / "pyproject.toml", repo / "README.md"]
    for d in PACKAGE_DIRS:
        files += [p for p in sorted((repo / d).rglob("*")) if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix not in (".pyc",)]
    for p in files:
        h.update(str(p.relative_to(repo)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def wheel_cache() -> Path:
    """The operator's wheel cache, shared by every cluster it installs: `MIAAS_WHEEL_CACHE`, else
    `$XDG_CACHE_HOME/miaas/wheels` (default ~/.cache)."""
    if os.environ.get("MIAAS_WHEEL_CACHE"):
        return Path(os.environ["MIAAS_WHEEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "miaas" / "wheels"


def build_wheelhouse(root: Path, say: Callable[[str], None], repo: Path = REPO) -> tuple[Path, str]:
    """Every wheel the services need, built here once per source digest (dependencies once per pyproject.toml),
    plus uv's when it can be had; (the folder, the release digest: of the wheels' contents)."""
    source = source_digest(repo)[:16]
    ready = root / f"release-{source}"
    if (ready / ".digest").is_file():
        return ready, (ready / ".digest").read_text().strip()
    deps_key = hashlib.sha256((repo / "pyproject.toml").read_bytes()).hexdigest()[:16]
    deps = root / f"deps-{deps_key}"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    if not (deps / ".complete").is_file():
        say("building the wheels of the dependencies (once per pyproject.toml)")
        tmp = root / f"deps-{deps_key}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _pip(pip + ["wheel", "--wheel-dir", str(tmp), str(repo)])
        for w in tmp.glob("miaas-*.whl"):
            w.unlink()
        uv = subprocess.run(pip + ["download", "--only-binary", ":all:", "--no-deps", "--dest", str(tmp), "uv"],
                            capture_output=True, text=True)
        if uv.returncode != 0:
            say("uv is not available; the hosts install with pip (slower)")
        (tmp / ".complete").write_text("")
        shutil.rmtree(deps, ignore_errors=True)
        tmp.rename(deps)
    say("building the MIaaS wheel")
    tmp = root / f"release-{source}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for w in deps.glob("*.whl"):
        os.link(w, tmp / w.name)
    _pip(pip + ["wheel", "--no-deps", "--wheel-dir", str(tmp), str(repo)])
    h = hashlib.sha256()
    for w in sorted(tmp.glob("*.whl")):
        h.update(w.name.encode() + b"\0" + hashlib.sha256(w.read_bytes()).digest())
    digest = h.hexdigest()[:20]
    (tmp / ".digest").write_text(digest + "\n")
    for old in root.glob("release-*"):
        if old != tmp:
            shutil.rmtree(old, ignore_errors=True)
    tmp.rename(ready)
    return ready, digest


def _pip(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise InstallError([f"building the wheels failed ({' '.join(argv[3:6])}...): "
                            + " | ".join(done.stderr.strip().splitlines()[-6:])])
