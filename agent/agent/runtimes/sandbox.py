"""The process runtime's sandbox: each deployment runs as a uid of its own inside bubblewrap.

Per deployment the agent (root) takes a free uid of AGENT_SANDBOX_UID_RANGE (a lock file per uid, host-wide,
so agents of one host never hand out the same uid) and runs every setup and start command as

    bwrap (root: new mount, pid, ipc, uts and cgroup namespaces; the host's network)
      └─ setpriv --reuid U --regid U --clear-groups (no capabilities, no_new_privs)
           └─ bash -c COMMAND

No user namespace: the uid the kernel sees is U, so files, /proc and the iptables owner match (firewall.py) all
apply to it. The sandbox sees the system folders read-only (/usr and its links, the base Python when it lives
elsewhere, a few files of /etc), the version folder read-only at /app, its virtualenv read-only at its own path
(a venv is not relocatable), a private writable /work (its HOME, made fresh per start), a private /tmp and
/dev/shm, its own /proc, and /etc/passwd and /etc/group of its own uid only. Nothing else of the host: not the
agent's state folder, settings, `.env`, credentials or environment, nor another model's files. Its environment
is built from nothing (sandbox_env). `--die-with-parent`: a model never outlives the agent.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import glob
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from agent.firewall import Endpoint, Firewall, FirewallError
from agent.runtimes.base import DeploymentSpec

log = logging.getLogger(__name__)

BWRAP_HINT = "apt-get install bubblewrap"
SETPRIV_HINT = "apt-get install util-linux"
APP_DIR = "/app"
WORK_DIR = "/work"
SANDBOX_USER = "model"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Host folders every sandbox sees read-only: a symlink (merged /usr) is recreated as a symlink.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Files and folders of /etc a program needs (TLS roots, name resolution, time zone, the dynamic linker's cache).
_ETC = (
    "/etc/ssl", "/etc/ca-certificates", "/etc/pki", "/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf",
    "/etc/host.conf", "/etc/gai.conf", "/etc/localtime", "/etc/timezone", "/etc/ld.so.cache", "/etc/ld.so.conf",
    "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/mime.types", "/etc/protocols", "/etc/services",
    "/etc/os-release", "/etc/debian_version",
)
_ETC_GLOBS = ("/etc/python3*",)
_LOCALE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here (a missing package, not root, or its firewall rules could not be written)."""


@dataclass(frozen=True)
class SandboxConfig:
    """How the agent contains its models (AGENT_SANDBOX_* settings)."""

    uid_range: tuple[int, int] = (61000, 61999)
    allow_outbound: Sequence[Endpoint] = ()
    """Where model uids may open connections (default: nowhere but their own ports)."""
    deny_ports: Sequence[int] = ()
    """TCP ports refused on every address even when the allow-list covers them (the cluster's services)."""
    lock_dir: Path = Path("/run/miaas-sandbox")
    """Host-wide: one lock file per uid in use, and the lock that serialises firewall changes."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra variables for every model (e.g. a proxy it may use); the runtime's own values win."""
    bwrap: str = "bwrap"
    setpriv: str = "setpriv"


class NoSandbox:
    """AGENT_SANDBOX=none: models run as the agent's user, unconfined (trusted code only)."""

    name = "none"


# ---------------------------------------------------------------------------------------------- the spawner

# bwrap --die-with-parent ties the sandbox to the *thread* that forked it (PR_SET_PDEATHSIG). Provisioning
# threads end once a model answers, so every sandbox is forked by this one long-lived thread instead.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")


def spawn(argv: Sequence[str], *, env: Mapping[str, str], out: IO[bytes],
          bwrap_args: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """Start a sandbox from the spawner thread, in a new session, its output appended to `out`. `bwrap_args`
    reach bwrap through a pipe (`--args FD`, after argv[0]), so the sandbox's /proc/1/cmdline names no host path."""

    def start() -> subprocess.Popen[bytes]:
        if not bwrap_args:
            return subprocess.Popen(list(argv), cwd="/", env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        data = b"".join(arg.encode() + b"\0" for arg in bwrap_args)
        read_end, write_end = os.pipe()
        try:
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(data)  # far below a pipe's 64 KiB: never blocks
            return subprocess.Popen([argv[0], "--args", str(read_end), *argv[1:]], cwd="/", env=dict(env),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, pass_fds=(read_end,))
        finally:
            os.close(read_end)

    return _SPAWNER.submit(start).result()


# ---------------------------------------------------------------------------------------------- uids


def processes_of(uid: int) -> list[psutil.Process]:
    """Every live process whose real or effective uid is `uid`."""
    found = []
    for proc in psutil.process_iter(["uids", "status"]):
        try:
            uids = proc.info["uids"]
            if uids is not None and uid in (uids.real, uids.effective) and proc.info["status"] != "zombie":
                found.append(proc)
        except psutil.Error:
            continue
    return found


@dataclass
class UidLease:
    """A uid held for one deployment: its lock file stays locked (flock) until release()."""

    uid: int
    handle: IO[str] | None

    def release(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


class UidPool:
    """Uids of a range handed out host-wide: a lock file per uid under lock_dir, flock'ed while in use (the
    kernel frees it when its holder dies). A uid that still owns a process is never handed out."""

    def __init__(self, lo: int, hi: int, lock_dir: Path) -> None:
        self.lo, self.hi, self.lock_dir = lo, hi, lock_dir

    def acquire(self, owner: str) -> UidLease:
        self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for uid in range(self.lo, self.hi + 1):
            handle = self._try_lock(uid)
            if handle is None:
                continue
            if processes_of(uid):
                log.warning("sandbox uid %s still owns processes that no deployment holds: skipped", uid)
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()} {owner}\n")
            handle.flush()
            return UidLease(uid, handle)
        raise SandboxUnavailable(f"every sandbox uid of {self.lo}-{self.hi} is in use (AGENT_SANDBOX_UID_RANGE)")

    def any_in_use(self) -> bool:
        """True while some agent of the host holds a uid of this range."""
        for uid in range(self.lo, self.hi + 1):
            if not (self.lock_dir / f"{uid}.lock").exists():
                continue
            handle = self._try_lock(uid)
            if handle is None:
                return True
            handle.close()
        return False

    def _try_lock(self, uid: int) -> IO[str] | None:
        fd = os.open(self.lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return handle


# ---------------------------------------------------------------------------------------------- environment


def port_env_name(name: str) -> str:
    """MIAAS_PORT_<NAME> for a meta.json port name (upper case, other characters as '_')."""
    return "MIAAS_PORT_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


def sandbox_env(
    spec: DeploymentSpec, venv: Path, *, extra: Mapping[str, str] | None = None, lang: str | None = None
) -> dict[str, str]:
    """The whole environment of a sandboxed command, built from nothing: never a copy of the agent's."""
    env: dict[str, str] = {}
    env.update(extra or {})
    env.update(spec.env)
    lang = lang if lang is not None else os.environ.get("LANG", "")
    env.update({
        "PATH": f"{venv / 'bin'}:{SYSTEM_PATH}",
        "VIRTUAL_ENV": str(venv),
        "HOME": WORK_DIR,
        "USER": SANDBOX_USER,
        "LOGNAME": SANDBOX_USER,
        "TMPDIR": "/tmp",
        "LANG": lang if _LOCALE.match(lang) else "C.UTF-8",
        "PORT": str(spec.port),
        "MIAAS_DEPLOYMENT_ID": spec.deployment_id,
        "MIAAS_MODEL_ID": spec.model_id,
        "MIAAS_MODEL_VERSION": str(spec.version),
        "MIAAS_MODEL_DIR": APP_DIR,
        "MIAAS_WORKDIR": WORK_DIR,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPYCACHEPREFIX": f"{WORK_DIR}/.pycache",  # /app and the venv are read-only
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
    })
    for name, port in spec.ports.items():
        env[port_env_name(name)] = str(port)
    return env


# ---------------------------------------------------------------------------------------------- the sandbox


@dataclass
class Cell:
    """One deployment's sandbox: its uid, its mounts and its environment."""

    deployment_id: str
    lease: UidLease
    mounts: list[str]
    env: dict[str, str]
    bwrap: str
    setpriv: str
    home: Path

    @property
    def uid(self) -> int:
        return self.lease.uid

    def wrap(self, command: Sequence[str]) -> list[str]:
        """The argv that runs `command` in this sandbox as its uid (bwrap's own options apart: `mounts`)."""
        uid = str(self.uid)
        return [self.bwrap, "--", self.setpriv, "--reuid", uid, "--regid", uid, "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *command]

    def spawn(self, command: Sequence[str], out: IO[bytes]) -> subprocess.Popen[bytes]:
        """Run `command` in this sandbox, its output appended to `out`."""
        return spawn(self.wrap(command), env=self.env, out=out, bwrap_args=self.mounts)


class BwrapSandbox:
    """Runs each deployment in bubblewrap as a uid of its own, behind the model uids' firewall rules."""

    name = "bwrap"

    def __init__(self, config: SandboxConfig | None = None, *, firewall: Firewall | None = None) -> None:
        self.config = config or SandboxConfig()
        lo, hi = self.config.uid_range
        self.uids = UidPool(lo, hi, self.config.lock_dir)
        self.firewall = firewall or Firewall(lo, hi, allow=self.config.allow_outbound,
                                             deny_ports=self.config.deny_ports)
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ agent start and exit

    def start(self) -> None:
        """At agent start: install the firewall rules (a failure is SandboxUnavailable: the agent must not start),
        and say loudly when bwrap is missing (then every deployment is refused with the package to install)."""
        if os.geteuid() != 0:
            raise SandboxUnavailable(
                "the bwrap sandbox needs the agent to run as root (it runs each model as a uid of its own and "
                "writes iptables rules); run the agent as root, or set AGENT_SANDBOX=none for trusted models only"
            )
        lo, hi = self.config.uid_range
        accounts = sorted(f"{e.pw_name} ({e.pw_uid})" for e in pwd.getpwall() if lo <= e.pw_uid <= hi)
        if accounts:
            raise SandboxUnavailable(f"AGENT_SANDBOX_UID_RANGE {lo}-{hi} holds accounts of this host: "
                                     f"{', '.join(accounts[:5])}; choose a range no account uses")
        with self._host_lock():
            try:
                self._install()
            except FirewallError as exc:
                raise SandboxUnavailable(f"the sandbox's firewall rules could not be installed: {exc}") from exc
        problem = self.missing()
        if problem:
            log.error("the process runtime will refuse every model: %s", problem)

    def close(self) -> None:
        """At agent exit: remove the rules unless a deployment of some agent of this host still holds a uid."""
        if self._closed or not self._started:
            return
        self._closed = True
        try:
            with self._host_lock():
                if not self.uids.any_in_use():
                    self.firewall.remove()
        except (FirewallError, OSError) as exc:
            log.warning("could not remove the sandbox's firewall rules: %s", exc)

    def missing(self) -> str | None:
        """Why no model can be started here, or None."""
        if self._tool(self.config.bwrap) is None:
            return (f"bubblewrap ({self.config.bwrap}) is not installed: {BWRAP_HINT} "
                    "(or AGENT_SANDBOX=none for trusted models only)")
        if self._tool(self.config.setpriv) is None:
            return f"setpriv is not installed: {SETPRIV_HINT}"
        if os.geteuid() != 0:
            return "the bwrap sandbox needs the agent to run as root (or AGENT_SANDBOX=none for trusted models only)"
        return None

    # ------------------------------------------------------------------ one deployment

    def enter(self, spec: DeploymentSpec, venv: Path, *, gpus: bool = False,
              cuda: Mapping[str, str] | None = None) -> Cell:
        """A uid, a fresh home, and the firewall rules in place for one deployment (undo with leave())."""
        problem = self.missing()
        bwrap, setpriv = self._tool(self.config.bwrap), self._tool(self.config.setpriv)
        if problem or bwrap is None or setpriv is None:
            raise SandboxUnavailable(problem or "bwrap or setpriv is missing")
        with self._host_lock():
            lease = self.uids.acquire(spec.deployment_id)
            try:
                self.firewall.forget_uid(lease.uid)  # what a crashed agent may have left for this uid
                if not self.firewall.installed():
                    if self._started:
                        log.warning("the sandbox's firewall rules were missing: installing them again")
                    self._install()
                self.firewall.allow_own_ports(lease.uid, {spec.port, *spec.ports.values()}, spec.deployment_id)
            except FirewallError as exc:
                lease.release()
                raise SandboxUnavailable(f"the sandbox's firewall rules could not be written: {exc}") from exc
        try:
            home, etc = self._prepare_dirs(spec.workdir / "sandbox", lease.uid)
            mounts = self._mounts(spec.model_path, venv, home, etc, gpus=gpus)
        except BaseException:
            self._release(lease)
            raise
        env = sandbox_env(spec, venv, extra=self.config.env)
        env.update(cuda or {})
        return Cell(spec.deployment_id, lease, mounts, env, bwrap, setpriv, home)

    def leave(self, cell: Cell) -> None:
        """After every process of the cell is gone: its rules out, its uid free."""
        self._release(cell.lease)

    def terminate(self, cell: Cell, proc: subprocess.Popen[bytes], *, grace: float) -> None:
        """SIGTERM to the cell's processes, SIGKILL (the whole sandbox) after `grace` seconds."""
        if proc.poll() is None:
            for member in processes_of(cell.uid):
                with contextlib.suppress(psutil.Error):
                    member.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # bwrap's own group: its pid-1 child dies, and the namespace
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("sandbox %s survived SIGKILL", proc.pid)

    def kill_leftovers(self, cell: Cell) -> None:
        """What still runs as the cell's uid once its sandboxes ended (nothing, unless a sandbox escaped)."""
        deadline = time.monotonic() + 5
        while (left := processes_of(cell.uid)) and time.monotonic() < deadline:
            for member in left:
                with contextlib.suppress(psutil.Error):
                    member.kill()
            time.sleep(0.05)

    # ------------------------------------------------------------------ helpers

    def _install(self) -> None:
        """Write the rules (the host lock held); they are removed at exit (close)."""
        self.firewall.install()
        if not self._started:
            self._started = True
            atexit.register(self.close)

    @staticmethod
    def _tool(name: str) -> str | None:
        """The absolute path of a system tool: never looked up in a model's PATH, whose venv comes first (a
        requirement could install a `bwrap` or `setpriv` there, which root would then run)."""
        return shutil.which(name, path=SYSTEM_PATH)

    def _release(self, lease: UidLease) -> None:
        try:
            with self._host_lock():
                self.firewall.forget_uid(lease.uid)
        except (FirewallError, OSError) as exc:
            log.warning("could not remove the own-port rules of uid %s: %s", lease.uid, exc)
        finally:
            lease.release()

    @contextlib.contextmanager
    def _host_lock(self) -> Iterator[None]:
        self.config.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with (self.config.lock_dir / "firewall.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _prepare_dirs(root: Path, uid: int) -> tuple[Path, Path]:
        """`root/home` (the model's, fresh, 0700) and `root/etc` (passwd and group of its uid, the agent's)."""
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        home, etc = root / "home", root / "etc"
        shutil.rmtree(home, ignore_errors=True)  # a home of an earlier start may belong to another uid
        home.mkdir(mode=0o700)
        os.chown(home, uid, uid)
        etc.mkdir(mode=0o755, exist_ok=True)
        (etc / "passwd").write_text(f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                                    f"{SANDBOX_USER}:x:{uid}:{uid}:model:{WORK_DIR}:/bin/bash\n"
                                    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
        (etc / "group").write_text(f"root:x:0:\n{SANDBOX_USER}:x:{uid}:\nnogroup:x:65534:\n")
        for name in ("passwd", "group"):
            os.chmod(etc / name, 0o644)
        return home, etc

    def _mounts(self, model: Path, venv: Path, home: Path, etc: Path, *, gpus: bool) -> list[str]:
        m = _Mounts(["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                     "--hostname", "miaas-model", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                     # only what setpriv needs to become the model's uid; it drops them all, bounding set included
                     "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"])
        for path in _SYSTEM_DIRS:
            if os.path.islink(path):
                m.add("--symlink", os.readlink(path), path)
            elif os.path.isdir(path):
                m.add("--ro-bind", path, path, tree=True)
        for path in [*_ETC, *sorted(p for pattern in _ETC_GLOBS for p in glob.glob(pattern))]:
            m.add("--ro-bind-try", path, path)
        m.add("--ro-bind", str(etc / "passwd"), "/etc/passwd")
        m.add("--ro-bind", str(etc / "group"), "/etc/group")
        for prefix in _python_prefixes(venv):
            if not m.under_tree(prefix):
                m.add("--ro-bind", prefix, prefix, tree=True)
        m.add("--proc", None, "/proc")
        m.add("--dev", None, "/dev")
        m.add("--tmpfs", None, "/tmp", perms="1777")
        m.add("--tmpfs", None, "/dev/shm", perms="1777")
        if gpus:
            for device in sorted(glob.glob("/dev/nvidia*")):
                m.add("--dev-bind", device, device)
            m.add("--ro-bind-try", "/sys", "/sys", tree=True)
        m.add("--ro-bind", str(venv), str(venv), tree=True)
        m.add("--ro-bind", str(model.resolve()), APP_DIR, tree=True)
        m.add("--bind", str(home), WORK_DIR, tree=True)
        return [*m.args, "--chdir", APP_DIR]


class _Mounts:
    """bwrap mount arguments; the folders above each mount point are made 0755 first (bwrap would make them
    0700, which the model's uid could not cross)."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.made = {"/"}
        self.trees: list[str] = []  # host folders bound read-only: what is below them exists already

    def under_tree(self, path: str) -> bool:
        return any(path == tree or path.startswith(tree.rstrip("/") + "/") for tree in self.trees)

    def add(self, flag: str, source: str | None, dest: str, *, perms: str | None = None, tree: bool = False) -> None:
        for parent in reversed(Path(dest).parents):
            folder = str(parent)
            if folder not in self.made and not self.under_tree(folder):
                self.args += ["--perms", "0755", "--dir", folder]
                self.made.add(folder)
        self.args += [*(["--perms", perms] if perms else []), flag, *([source] if source is not None else []), dest]
        self.made.add(dest)
        if tree:
            self.trees.append(dest)


def _python_prefixes(venv: Path) -> list[str]:
    """The installation of the venv's base interpreter (its `home` in pyvenv.cfg, where bin/python leads)."""
    prefixes = []
    with contextlib.suppress(OSError):
        prefixes.append(str(Path(os.path.realpath(venv / "bin" / "python")).parent.parent))
    with contextlib.suppress(OSError):
        for line in (venv / "pyvenv.cfg").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                prefixes.append(str(Path(os.path.realpath(value.strip())).parent))
    return list(dict.fromkeys(p for p in prefixes if p not in ("/", "")))
