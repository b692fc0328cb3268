"""What the installer runs on each host, over SSH: the standard library only (the host has no MIaaS yet).

The installer sends this file's source on the SSH session's stdin followed by one call of `_main(<job>)`; the
job is a JSON object naming an action below. The answer is one line `MIAAS-RESULT <json>` on stdout; a failure is
`MIAAS-ERROR <message>` and exit code 1. Every action is idempotent, and the ones that change the host take
`dry_run` (what `bootstrap.sh --check` shows) and say what they changed, so a second run can say "nothing".
"""

from __future__ import annotations

import base64
import contextlib
import glob
import grp
import json
import os
import platform
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

SUPERVISOR = "/opt/miaas/bin/miaas-supervise.py"
UNITS = "/etc/miaas/units"
SUPERVISOR_STATE = "/var/lib/miaas/supervise"
RELEASES = "/opt/miaas/releases"


class Failed(Exception):
    pass


def _run(argv: list[str], *, input_text: str | None = None, timeout: float = 600, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, input=input_text, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "LC_ALL": "C", **(env or {})})
    except FileNotFoundError as exc:
        raise Failed(f"{argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise Failed(f"{' '.join(argv[:3])}... took longer than {timeout:.0f}s") from exc
    if check and done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
        raise Failed(f"{' '.join(argv[:4])} exited with {done.returncode}: " + " | ".join(tail))
    return done


# ---------------------------------------------------------------------------------------------- facts


def _listening() -> dict[int, int]:
    """TCP ports listened on in this host's network namespace → the socket's inode."""
    found: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A":  # LISTEN
                found.setdefault(int(parts[1].rsplit(":", 1)[1], 16), int(parts[9]))
    return found


def _owners(inodes: set[int]) -> dict[int, int]:
    """Socket inode → the pid holding it (as root every process's fds are readable)."""
    owners: dict[int, int] = {}
    wanted = {f"socket:[{i}]": i for i in inodes}
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            for fd in os.listdir(fd_dir):
                target = os.readlink(f"{fd_dir}/{fd}")
                if target in wanted:
                    owners.setdefault(wanted[target], int(fd_dir.split("/")[2]))
        except OSError:
            continue
    return owners


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _supervised_pids() -> set[int]:
    """The supervisor's pid and the pids of the units it runs, from its own files."""
    pids: set[int] = set()
    with contextlib.suppress(OSError, ValueError):
        pids.add(int(Path(SUPERVISOR_STATE, "supervise.pid").read_text().strip()))

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k == "pid" and isinstance(v, int) and v > 0:
                    pids.add(v)
                else:
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    with contextlib.suppress(OSError, ValueError):
        walk(json.loads(Path(SUPERVISOR_STATE, "status.json").read_text()))
    return pids


def _ours(pid: int, supervised: set[int]) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid in supervised:
            return True
        pid, seen = _parent(pid), seen + 1
    return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _supervisor_running() -> bool:
    try:
        pid = int(Path(SUPERVISOR_STATE, "supervise.pid").read_text().strip())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


def facts(job: dict[str, Any]) -> dict[str, Any]:
    """What the checks need: OS, Python, disk, clock, ports, packages, what MIaaS already has here."""
    os_release: dict[str, str] = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            k, _, v = line.partition("=")
            os_release[k] = v.strip('"')
    except OSError:
        pass
    # The system's interpreter: the services run as other users, who may not reach one under root's home.
    py = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else shutil.which("python3")
    py_version, venv_ok = None, False
    if py:
        done = _run([py, "-c", "import sys, venv, ensurepip; print('%d.%d.%d' % sys.version_info[:3])"], check=False)
        venv_ok = done.returncode == 0
        if not venv_ok:
            done = _run([py, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"], check=False)
        py_version = done.stdout.strip() or None
    disk: dict[str, int] = {}
    for wanted in ("/opt/miaas", "/var/lib/miaas"):
        p = Path(wanted)
        while not p.exists():
            p = p.parent
        disk[wanted] = shutil.disk_usage(p).free
    listening = _listening()
    ports: dict[str, Any] = {}
    wanted_ports = [int(p) for p in job.get("ports", [])]
    taken = {p: listening[p] for p in wanted_ports if p in listening}
    owners = _owners(set(taken.values()))
    supervised = _supervised_pids()
    for port, inode in taken.items():
        pid = owners.get(inode, 0)
        ports[str(port)] = {"pid": pid, "ours": bool(pid) and _ours(pid, supervised), "command": _cmdline(pid)[:200]}
    missing = []
    for package in job.get("packages", []):
        done = _run(["dpkg-query", "-W", "-f", "${Status}", package], check=False)
        if "install ok installed" not in done.stdout:
            missing.append(package)
    env_values: dict[str, str] = {}
    for path, keys in job.get("read_env", {}).items():
        for line in _read(path).splitlines():
            k, sep, v = line.partition("=")
            if sep and k in keys:
                env_values[f"{path}:{k}"] = v
    return {
        "os": {"id": os_release.get("ID", platform.system().lower()), "version": os_release.get("VERSION_ID", ""),
               "pretty": os_release.get("PRETTY_NAME", platform.platform())},
        "python": py_version, "python_path": py, "venv": venv_ok, "disk_free": disk, "time": time.time(),
        "ports": ports, "missing_packages": missing, "root": os.geteuid() == 0,
        "exists": {p: os.path.exists(p) for p in job.get("exists", [])},
        "env": env_values, "supervisor": _supervisor_running(), "hostname": platform.node(),
        "pg_bin": _pg_bin_or_none(),
        "releases": sorted(Path(p).parent.name for p in glob.glob(f"{RELEASES}/*/.complete")),
    }


def _pg_bin_or_none() -> str | None:
    try:
        return str(_pg_bin())
    except Failed:
        return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- files


def _ids(owner: str | None, group: str | None) -> tuple[int, int]:
    try:
        uid = pwd.getpwnam(owner).pw_uid if owner else 0
        gid = grp.getgrnam(group).gr_gid if group else (pwd.getpwnam(owner).pw_gid if owner else 0)
    except KeyError as exc:
        raise Failed(f"no such user or group: {exc.args[0]}") from exc
    return uid, gid


def _write_atomic(path: Path, data: bytes, mode: int, uid: int, gid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.chown(tmp, uid, gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def apply(job: dict[str, Any]) -> dict[str, Any]:
    """Make folders and files as given (content, mode, owner) and remove what is listed; report what changed.

    A file whose content, mode and owner already match is not touched (not even its mtime)."""
    dry = bool(job.get("dry_run"))
    changed: list[str] = []
    for d in job.get("dirs", []):
        path = Path(d["path"])
        mode = int(d.get("mode", 0o755))
        uid, gid = _ids(d.get("owner"), d.get("group"))
        st = path.stat() if path.exists() else None
        if st is not None and not path.is_dir():
            raise Failed(f"{path} exists and is not a folder")
        if st is None or (st.st_mode & 0o7777, st.st_uid, st.st_gid) != (mode, uid, gid):
            changed.append(f"{path}/")
            if not dry:
                path.mkdir(parents=True, exist_ok=True)
                os.chmod(path, mode)
                os.chown(path, uid, gid)
    for f in job.get("files", []):
        path = Path(f["path"])
        data = base64.b64decode(f["content"])
        mode = int(f.get("mode", 0o644))
        uid, gid = _ids(f.get("owner"), f.get("group"))
        try:
            st = path.lstat()
            same = (not path.is_symlink() and path.is_file() and path.read_bytes() == data
                    and (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, uid, gid))
        except OSError:
            same = False
        if not same:
            changed.append(str(path))
            if not dry:
                _write_atomic(path, data, mode, uid, gid)
    for pattern in job.get("remove_unlisted", []):
        # Files matching the pattern that the job does not list: units or credentials of roles this host lost.
        listed = {f["path"] for f in job.get("files", [])}
        for found in sorted(glob.glob(pattern)):
            if found not in listed:
                changed.append(f"-{found}")
                if not dry:
                    os.unlink(found)
    return {"changed": changed}


def ensure_user(job: dict[str, Any]) -> dict[str, Any]:
    """A system user (no login, home under /var/lib/miaas) when missing."""
    name = job["name"]
    try:
        pwd.getpwnam(name)
        return {"changed": []}
    except KeyError:
        pass
    if not job.get("dry_run"):
        _run(["useradd", "--system", "--home-dir", job.get("home", "/var/lib/miaas"), "--no-create-home",
              "--shell", "/usr/sbin/nologin", name])
    return {"changed": [f"user {name}"]}


def install_packages(job: dict[str, Any]) -> dict[str, Any]:
    """apt-get install the packages that are missing (none missing: apt is not run at all)."""
    missing = [p for p in job["packages"]
               if "install ok installed" not in _run(["dpkg-query", "-W", "-f", "${Status}", p], check=False).stdout]
    if missing and not job.get("dry_run"):
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        update = _run(["apt-get", "update", "-q"], env=env, check=False, timeout=300)
        if update.returncode != 0:
            raise Failed("apt-get update failed: " + " | ".join(update.stderr.strip().splitlines()[-3:]))
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env, timeout=900)
    return {"changed": [f"package {p}" for p in missing]}


# ---------------------------------------------------------------------------------------------- software


def install_release(job: dict[str, Any]) -> dict[str, Any]:
    """The release's virtualenv from the wheels shipped into its folder, with no package index (uv when shipped)."""
    release = Path(RELEASES) / job["digest"]
    done_mark = release / ".complete"
    if done_mark.is_file():
        return {"changed": [], "python": str(release / "venv" / "bin" / "python")}
    if job.get("dry_run"):
        return {"changed": [f"release {job['digest']}"]}
    wheels = release / "wheels"
    if not wheels.is_dir():
        raise Failed(f"{wheels} is missing: the wheels were not shipped")
    venv = release / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    uv = _uv(release, wheels)
    python = job.get("python") or "/usr/bin/python3"
    if uv is not None:
        env = {"UV_CACHE_DIR": str(release / ".uv-cache"), "UV_LINK_MODE": "copy", "UV_NO_PROGRESS": "1",
               "UV_PYTHON_DOWNLOADS": "never"}
        _run([uv, "venv", "--quiet", "--python", python, str(venv)], env=env)
        _run([uv, "pip", "install", "--quiet", "--offline", "--no-index", "--find-links", str(wheels),
              "--python", str(venv / "bin" / "python"), job.get("requirement", "miaas")], env=env)
        shutil.rmtree(release / ".uv-cache", ignore_errors=True)
    else:
        _run([python, "-m", "venv", str(venv)])
        _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
              str(wheels), "--disable-pip-version-check", job.get("requirement", "miaas")])
    os.chmod(release, 0o755)
    done_mark.write_text(job["digest"] + "\n")
    _prune_releases(keep={job["digest"], *job.get("keep", [])})
    return {"changed": [f"release {job['digest']}"], "python": str(venv / "bin" / "python")}


def _uv(release: Path, wheels: Path) -> str | None:
    """The uv binary out of its wheel, when the installer shipped one (an install in seconds rather than a minute)."""
    found = sorted(wheels.glob("uv-*.whl"))
    if not found:
        return None
    target = release / "uv"
    if not target.is_file():
        with zipfile.ZipFile(found[-1]) as z:
            member = next((n for n in z.namelist() if n.endswith(".data/scripts/uv")), None)
            if member is None:
                return None
            with z.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.chmod(target, 0o755)
    return str(target)


def _prune_releases(keep: set[str]) -> None:
    for path in Path(RELEASES).iterdir():
        if path.name not in keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- PostgreSQL


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise Failed("PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql")
    return Path(found[-1]).parent


def postgres_init(job: dict[str, Any]) -> dict[str, Any]:
    """initdb into the MIaaS data folder once, as the postgres user (the server itself runs under the
    supervisor, with the configuration the installer writes to /etc/miaas/postgresql)."""
    data = Path(job["data"])
    if (data / "PG_VERSION").is_file():
        return {"changed": [], "bin": str(_pg_bin())}
    if job.get("dry_run"):
        return {"changed": [f"initdb {data}"]}
    bin_dir = _pg_bin()
    uid, gid = _ids("postgres", "postgres")
    data.parent.mkdir(parents=True, exist_ok=True)
    for p in (data.parent, data):
        p.mkdir(exist_ok=True)
        os.chown(p, uid, gid)
        os.chmod(p, 0o700)
    _run(["runuser", "-u", "postgres", "--", str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
          "--auth-local=peer", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-instructions"])
    return {"changed": [f"initdb {data}"], "bin": str(bin_dir)}


def postgres_databases(job: dict[str, Any]) -> dict[str, Any]:
    """Each service its own role (password from the installer's secrets) and database, once it answers."""
    socket_dir, port = job["socket_dir"], str(job["port"])
    deadline = time.monotonic() + float(job.get("timeout_s", 60))
    psql = [str(_pg_bin() / "psql"), "-h", socket_dir, "-p", port, "-d", "postgres", "-U", "postgres", "-v",
            "ON_ERROR_STOP=1", "-tAq"]
    while True:
        done = _run(["runuser", "-u", "postgres", "--", *psql, "-c", "SELECT 1"], check=False)
        if done.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise Failed("PostgreSQL did not answer on its socket: " + done.stderr.strip()[-300:])
        time.sleep(0.3)
    changed: list[str] = []

    def q(sql: str) -> str:
        return _run(["runuser", "-u", "postgres", "--", *psql, "-c", sql]).stdout.strip()

    for item in job["databases"]:
        user, password, database = item["user"], item["password"], item["database"]
        for value in (user, database):
            if not value.replace("_", "").isalnum():
                raise Failed(f"bad database or role name {value!r}")
        if not password.isalnum():
            raise Failed(f"the password of {user} must be letters and digits")
        if q(f"SELECT 1 FROM pg_roles WHERE rolname = '{user}'") != "1":
            changed.append(f"role {user}")
            if not job.get("dry_run"):
                q(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        elif not job.get("dry_run"):
            q(f"ALTER ROLE {user} PASSWORD '{password}'")  # the installer's secret is the truth; no restart needed
        if q(f"SELECT 1 FROM pg_database WHERE datname = '{database}'") != "1":
            changed.append(f"database {database}")
            if not job.get("dry_run"):
                q(f"CREATE DATABASE {database} OWNER {user}")
    return {"changed": changed}


# ---------------------------------------------------------------------------------------------- supervisor


def supervise(job: dict[str, Any]) -> dict[str, Any]:
    """Start the supervisor when it does not run, then reload its units: new ones start, changed ones restart,
    unchanged ones are left alone."""
    python = job.get("python") or "python3"
    changed: list[str] = []
    if not _supervisor_running():
        changed.append("supervisor started")
        if job.get("dry_run"):
            return {"changed": changed, "units": {}}
        _run([python, SUPERVISOR, "daemon", "--units", UNITS, "--state", SUPERVISOR_STATE], timeout=30)
    elif job.get("dry_run"):
        return {"changed": changed, "units": {}}
    reply = _ask_supervisor({"verb": "reload", "name": None})
    if not reply.get("ok") or reply.get("error"):
        raise Failed(f"the supervisor refused the units: {reply.get('error') or reply.get('text')}")
    units = reply.get("data") or {}
    for verb in ("started", "restarted", "stopped"):
        changed += [f"{verb} {name}" for name in units.get(verb, [])]
    return {"changed": changed, "units": units}


def _ask_supervisor(request: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """One request on the supervisor's control socket (a JSON line each way)."""
    import socket

    deadline = time.monotonic() + 10
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        while True:
            try:
                sock.connect(f"{SUPERVISOR_STATE}/control.sock")
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > deadline:
                    raise Failed(f"the supervisor does not answer on {SUPERVISOR_STATE}/control.sock") from exc
                time.sleep(0.1)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def wait_health(job: dict[str, Any]) -> dict[str, Any]:
    """GET each URL's /health from this host until 200, or say which did not answer and why."""
    deadline = time.monotonic() + float(job.get("timeout_s", 90))
    waiting = dict(job["urls"])  # name → URL
    last: dict[str, str] = {}
    while waiting:
        for name, url in list(waiting.items()):
            if url.startswith("tcp://"):
                import socket

                address, _, port = url[len("tcp://"):].rpartition(":")
                try:
                    with socket.create_connection((address, int(port)), timeout=2):
                        del waiting[name]
                except OSError as exc:
                    last[name] = exc.strerror or str(exc)
                continue
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        del waiting[name]
                        continue
                    last[name] = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last[name] = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                last[name] = str(getattr(exc, "reason", exc))
        crashing = _crashing(list(waiting)) if waiting else []
        if waiting and (time.monotonic() > deadline or crashing):
            why = "crashing" if crashing else "not healthy"
            raise Failed(f"{why}: " + "; ".join(f"{n} ({waiting[n]}: {last.get(n, '?')}){_log_tail(n)}"
                                                 for n in waiting))
        if waiting:
            time.sleep(0.25)
    return {"changed": []}


def _crashing(names: list[str]) -> list[str]:
    """Units the supervisor has restarted three times or more since this run began to wait for them."""
    try:
        units = json.loads(Path(SUPERVISOR_STATE, "status.json").read_text()).get("units", {})
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(units.get(n), dict) and (units[n].get("streak") or 0) >= 3]


def _log_tail(name: str, lines: int = 6) -> str:
    text = _read(f"{SUPERVISOR_STATE}/logs/{name}.log").strip().splitlines()[-lines:]
    return ("; its log ends: " + " | ".join(line.strip()[:240] for line in text)) if text else ""


def uninstall(job: dict[str, Any]) -> dict[str, Any]:
    """Stop the supervisor and its units, remove the software and the configuration; the data (databases, the
    model store, agents' state) only with `purge`."""
    changed: list[str] = []
    python = shutil.which("python3") or "python3"
    if _supervisor_running() and Path(SUPERVISOR).is_file():
        changed.append("supervisor and its units stopped")
        if not job.get("dry_run"):
            _run([python, SUPERVISOR, "ctl", "--state", SUPERVISOR_STATE, "shutdown"], timeout=180, check=False)
            deadline = time.monotonic() + 60
            while _supervisor_running() and time.monotonic() < deadline:
                time.sleep(0.2)
    targets = ["/opt/miaas", "/etc/miaas"] + (["/var/lib/miaas"] if job.get("purge") else [])
    for target in targets:
        p = Path(target)
        if p.exists() and any(p.iterdir()):
            changed.append(f"removed {target}")
            if not job.get("dry_run"):
                # The mount point itself stays (it may be one); what it holds goes.
                for child in p.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
    return {"changed": changed}


def nfs(job: dict[str, Any]) -> dict[str, Any]:
    """The model store on kernel NFS with bootstrap's own scripts: the export on the server (`server`), the mount
    on the registry (rw) and the agents (ro). Each runs only when what it makes is missing."""
    store = job["store"]
    if job["side"] == "server":
        exports = _read("/etc/exports.d/miaas.exports")
        if all(f"{store} {c}(" in exports for c in job["clients"]):
            return {"changed": []}
        argv = [job["script"], store, *job["clients"]]
        what = f"export {store}"
    else:
        if os.path.ismount(store):
            return {"changed": []}
        argv = [job["script"], f"{job['server']}:{store}", store, job["mode"]]
        what = f"mount {job['server']}:{store} ({job['mode']})"
    if not job.get("dry_run"):
        _run(["bash", *argv], timeout=600)
    return {"changed": [what]}


def batch(job: dict[str, Any]) -> dict[str, Any]:
    """Several actions in one SSH round trip, in order; the first failure stops the rest and names its step."""
    changed: list[str] = []
    results: list[dict[str, Any]] = []
    for step in job["steps"]:
        step = {"dry_run": job.get("dry_run", False), **step}
        try:
            result = ACTIONS[step["action"]](step)
        except Failed as exc:
            raise Failed(f"{step['action']}: {exc}") from exc
        changed += result.get("changed", [])
        results.append(result)
    return {"changed": changed, "results": results}


ACTIONS = {"batch": batch, "nfs": nfs, "facts": facts, "apply": apply,
           "ensure_user": ensure_user, "install_packages": install_packages,
           "install_release": install_release, "postgres_init": postgres_init,
           "postgres_databases": postgres_databases, "supervise": supervise,
           "wait_health": wait_health, "uninstall": uninstall}


def _main(job_text: str) -> None:
    try:
        job = json.loads(base64.b64decode(job_text))
        action = ACTIONS[job["action"]]
        result = action(job)
    except Failed as exc:
        print(f"MIAAS-ERROR {exc}", flush=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - reported to the installer, which names the host
        print(f"MIAAS-ERROR {type(exc).__name__}: {exc}", flush=True)
        sys.exit(1)
    print("MIAAS-RESULT " + json.dumps(result), flush=True)

