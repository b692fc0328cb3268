"""A small process supervisor for hosts without systemd: it runs the units of a folder, restarts them when they
fail, and adopts those still running after its own crash.

Standard library only, so that it also runs as a plain script (`python3 miaas/supervise.py`). Glossary:
- unit: `UNITS/<name>.json`, one long-running command and how to run it;
- identity: sha256 of the unit file and of its env_file; a change in either is a change, nothing else is;
- backoff: the wait before an automatic restart, 1 s doubling to 30 s, back to 1 s once a unit stayed up 60 s;
- held: stopped by `stop NAME`; stays stopped until `start NAME` or a reload that changes the unit;
- adoption: a new daemon re-takes a unit process the previous one left running (same pid, same start time in
  /proc, same identity) and polls /proc for its exit, since it cannot wait() on a process it did not start.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, NoReturn

NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*\Z")
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
FIELDS = ("command", "env_file", "env", "user", "cwd", "restart", "stop_timeout_s", "kill_mode", "log", "after")
RESTARTS = ("on-failure", "always", "never")
KILL_MODES = ("group", "process")
BACKOFF_FIRST_S, BACKOFF_MAX_S, BACKOFF_RESET_S = 1.0, 30.0, 60.0
TICK_S = 0.1
ROTATE_EVERY_S = 1.0
MAX_FILE_BYTES = 1 << 20
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT_NO_DAEMON = 3
RECORD: dict[str, Any] = {"pid": int | None, "start_time": int | None, "identity": str | None, "kill_mode": str,
                          "stop_timeout_s": float | int, "since": float | int, "restarts": int, "streak": int,
                          "last_exit": str | None, "exit_code": int | None, "held": bool}


class UnitError(ValueError):
    """A unit file that cannot be run; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed, valid unit file: what to run and how."""

    name: str
    command: tuple[str, ...]
    env: dict[str, str]  # env_file's variables, then the unit's own env
    user: str | None
    cwd: str
    restart: str
    stop_timeout_s: float
    kill_mode: str
    log: str
    after: tuple[str, ...]
    identity: str


def parse_env_file(text: str, where: str) -> dict[str, str]:
    """KEY=VALUE lines, `#` comments and blank lines skipped, one pair of matching outer quotes removed; nothing is
    expanded or executed."""
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not ENV_KEY.match(key):
            raise UnitError(f"{where} line {number}: expected KEY=VALUE with KEY like [A-Za-z_][A-Za-z0-9_]*")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key] = value
    return env


def _read_limited(path: Path, what: str) -> bytes:
    with path.open("rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise UnitError(f"{what} is over {MAX_FILE_BYTES} bytes")
    return data


def parse_unit(path: Path, log_dir: Path) -> Spec:
    """Read and check one unit file; raise UnitError naming the file and the field."""
    name = path.name.removesuffix(".json")

    def bad(field: str, problem: str) -> NoReturn:
        raise UnitError(f"{path}: field {field!r}: {problem}")

    if not NAME.match(name):
        raise UnitError(f"{path}: the unit name {name!r} must match [a-z0-9][a-z0-9_.-]*")
    try:
        raw = _read_limited(path, str(path))
        data = json.loads(raw)
    except (OSError, UnicodeDecodeError) as e:
        raise UnitError(f"{path}: cannot read it: {e}") from None
    except ValueError as e:
        raise UnitError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UnitError(f"{path}: must be a JSON object")
    for field in data:
        if field not in FIELDS:
            bad(field, f"unknown field (known: {', '.join(FIELDS)})")
    command = data.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(a, str) and a for a in command):
        bad("command", "must be a non-empty list of non-empty strings")
    env = data.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) and ENV_KEY.match(k) for k, v in env.items()):
        bad("env", "must be an object of strings with keys like [A-Za-z_][A-Za-z0-9_]*")
    strings = {f: data.get(f) for f in ("env_file", "user", "cwd", "log")}
    for field, value in strings.items():
        if value is not None and (not isinstance(value, str) or not value):
            bad(field, "must be a non-empty string")
    for field, value in [("command", a) for a in command] + list(env.items()) + list(strings.items()):
        if isinstance(value, str) and "\0" in value:
            bad(field, "must not hold a NUL character")
    user, cwd, env_file = strings["user"], strings["cwd"], strings["env_file"]
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            bad("user", f"no such user {user!r}")
    if cwd is not None and not cwd.startswith("/"):
        bad("cwd", f"must be an absolute path, not {cwd!r}")
    restart = data.get("restart", "on-failure")
    if restart not in RESTARTS:
        bad("restart", f"must be one of {', '.join(RESTARTS)}, not {restart!r}")
    kill_mode = data.get("kill_mode", "group")
    if kill_mode not in KILL_MODES:
        bad("kill_mode", f"must be one of {', '.join(KILL_MODES)}, not {kill_mode!r}")
    timeout = data.get("stop_timeout_s", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (0 < timeout <= 3600):
        bad("stop_timeout_s", f"must be a number of seconds in (0, 3600], not {timeout!r}")
    after = data.get("after", [])
    if not isinstance(after, list) or not all(isinstance(a, str) and NAME.match(a) for a in after):
        bad("after", "must be a list of unit names")
    env_bytes = b""
    full_env: dict[str, str] = {}
    if env_file is not None:
        try:
            env_bytes = _read_limited(Path(env_file), env_file)
            full_env = parse_env_file(env_bytes.decode(), env_file)
        except OSError as e:
            bad("env_file", f"cannot read {env_file}: {e.strerror or e}")
        except (UnitError, UnicodeDecodeError) as e:
            bad("env_file", str(e))
    full_env.update(env)
    digest = hashlib.sha256(raw + b"\0env_file\0" + env_bytes).hexdigest()
    return Spec(name=name, command=tuple(command), env=full_env, user=user, cwd=cwd or "/", restart=restart,
                stop_timeout_s=float(timeout), kill_mode=kill_mode, log=strings["log"] or str(log_dir / f"{name}.log"),
                after=tuple(after), identity=digest)


def load_units(units_dir: Path, log_dir: Path) -> tuple[dict[str, Spec], dict[str, str]]:
    """Every `*.json` of the folder: the valid specs, and why each other one is refused."""
    if not units_dir.is_dir():
        raise UnitError(f"the units folder {units_dir} does not exist")
    specs: dict[str, Spec] = {}
    refused: dict[str, str] = {}
    for path in sorted(units_dir.glob("*.json")):
        try:
            specs[path.name[:-5]] = parse_unit(path, log_dir)
        except UnitError as e:
            refused[path.name[:-5]] = str(e)
    return specs, refused


def start_order(specs: dict[str, Spec], names: Iterable[str]) -> list[str]:
    """The names with each after the units it names in `after` (unknown names and cycles ignored)."""
    wanted, done, order = set(names), set[str](), list[str]()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in done or name in path or name not in wanted:
            return
        for dep in specs[name].after:
            visit(dep, (*path, name))
        done.add(name)
        order.append(name)

    for name in sorted(wanted):
        visit(name, ())
    return order


def backoff(streak: int, uptime_s: float) -> tuple[float, int]:
    """The wait before the next automatic restart and the new failure streak."""
    if uptime_s >= BACKOFF_RESET_S:
        streak = 0
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**streak), streak + 1


def read_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 on (state, ppid, pgrp, ..., starttime at index 19), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def start_time(pid: int) -> int | None:
    stat = read_stat(pid)
    return int(stat[19]) if stat and stat[0] != "Z" else None


def group_alive(pgid: int) -> bool:
    """Whether any process but a zombie is left in the process group (zombies nobody reaps do not count)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat and stat[2] == str(pgid) and stat[0] != "Z":
                return True
    return False


def rotate(path: Path, max_bytes: int, keep: int) -> None:
    """Copy-and-truncate rotation (writers keep their O_APPEND descriptor, even those of an adopted unit)."""
    try:
        if path.stat().st_size < max_bytes:
            return
        for i in range(keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}.{i}", f"{path}.{i + 1}")
        shutil.copyfile(path, f"{path}.1")
        os.truncate(path, 0)
    except OSError as e:
        log(f"cannot rotate {path}: {e}")


def log(message: str) -> None:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    sys.stderr.write(f"{stamp} {message}\n")
    sys.stderr.flush()


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit {code}"


@dataclasses.dataclass
class Unit:
    """The running state of one unit; `spec` is what to run next (None: its file is refused)."""

    name: str
    spec: Spec | None = None
    error: str | None = None
    state: str = "stopped"  # running | stopping | backoff | stopped | failed | exited
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    start_time: int | None = None
    identity: str | None = None  # of the running process
    kill_mode: str = "group"  # of the running process
    stop_timeout_s: float = 10.0
    since: float = dataclasses.field(default_factory=time.time)
    up_at: float = 0.0
    restarts: int = 0
    streak: int = 0
    backoff_s: float = 0.0
    last_exit: str | None = None
    exit_code: int | None = None
    next_start: float = 0.0
    stop_deadline: float = 0.0
    killed: bool = False
    leader_gone: bool = False
    then: str = "stopped"  # what a finished stop leads to: stopped | start | remove
    held: bool = False

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "pid": self.pid, "since": _iso(self.since),
                "restarts": self.restarts, "last_exit": self.last_exit, "exit_code": self.exit_code,
                "identity": self.identity or (self.spec.identity if self.spec else None),
                "backoff_s": self.backoff_s if self.state == "backoff" else None, "held": self.held,
                "error": self.error}


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


class Supervisor:
    """The daemon: units, the control socket, and the loop that reaps, restarts and escalates."""

    def __init__(self, units_dir: Path, state_dir: Path, max_log_bytes: int, keep_logs: int) -> None:
        self.units_dir, self.state_dir = units_dir, state_dir
        self.log_dir = state_dir / "logs"
        self.max_log_bytes, self.keep_logs = max_log_bytes, keep_logs
        self.units: dict[str, Unit] = {}
        self.leftovers: dict[int, float] = {}  # process groups of exited units: SIGKILL at this monotonic time
        self.cond = threading.Condition(threading.RLock())
        self.exiting = False
        self.signalled: str | None = None
        self.closing = False
        self.sock: socket.socket | None = None
        self.next_rotate = 0.0

    # -- life cycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.log_dir.mkdir(mode=0o750, exist_ok=True)
        specs, refused = load_units(self.units_dir, self.log_dir)
        self._listen()
        with self.cond:
            records = self._restore()
            for name, rec in records.items():
                alive = rec["pid"] is not None and start_time(rec["pid"]) == rec["start_time"] is not None
                if alive:
                    self.units[name] = self._adopted(name, rec)
            for name in start_order(specs, specs):
                spec, unit = specs[name], self.units.get(name)
                if unit is not None:  # adopted
                    unit.spec = spec
                    if unit.identity != spec.identity:
                        log(f"{name}: changed while no daemon ran; restarting it")
                        self._begin_stop(unit, "start")
                    elif records[name]["state"] == "stopping":  # the last daemon died during a stop
                        unit.held = records[name]["held"]
                        self._begin_stop(unit, "stopped" if unit.held else "start")
                    continue
                rec = records.get(name, {})
                unit = self.units[name] = Unit(name, spec=spec, restarts=int(rec.get("restarts", 0)),
                                               last_exit=rec.get("last_exit"), exit_code=rec.get("exit_code"))
                if rec.get("held") and rec.get("identity") == spec.identity:
                    unit.held, unit.identity = True, spec.identity  # still held by the next daemon too
                else:
                    self._spawn(unit)
            for name, error in refused.items():
                log(f"refused: {error}")
                unit = self.units.setdefault(name, Unit(name, state="failed"))
                unit.error = error
            for unit in list(self.units.values()):
                if unit.spec is None and unit.error is None:
                    log(f"{unit.name}: its unit file is gone; stopping the process left running")
                    self._begin_stop(unit, "remove")
            self._save()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        threading.Thread(target=self._serve, daemon=True).start()

    def _adopted(self, name: str, rec: dict[str, Any]) -> Unit:
        since = rec["since"]
        log(f"{name}: adopted pid {rec['pid']}")
        return Unit(name, state="running", pid=rec["pid"], start_time=rec["start_time"], identity=rec["identity"],
                    kill_mode=rec["kill_mode"], stop_timeout_s=rec["stop_timeout_s"], since=since,
                    up_at=time.monotonic() - max(0.0, time.time() - since), restarts=rec["restarts"],
                    streak=rec["streak"], last_exit=rec["last_exit"], exit_code=rec["exit_code"])

    def _listen(self) -> None:
        path = self.state_dir / "control.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # we hold the lock: a socket left here is stale
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(16)

    def loop(self) -> None:
        while not self.exiting:
            with self.cond:
                self._tick()
                self.cond.notify_all()
            if self.signalled == "reload":  # in a thread: the verbs wait for this loop's ticks
                self.signalled = None
                threading.Thread(target=lambda: log(self.reload()["text"]), daemon=True).start()
            elif self.signalled == "stop":
                self.signalled = None
                threading.Thread(target=self._shutdown_and_exit, daemon=True).start()
            time.sleep(TICK_S)
        with self.cond:
            self._save()
        for name in ("control.sock", "supervise.pid"):
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / name).unlink()
        log("exited")

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signalled = "reload" if signum == signal.SIGHUP else "stop"

    def _shutdown_and_exit(self) -> None:
        self.shutdown()
        self.exiting = True

    # -- the state machine (every method below runs with self.cond held) -------------------------------------
    def _spawn(self, unit: Unit) -> None:
        spec = unit.spec
        assert spec is not None
        unit.held, unit.then, unit.killed, unit.leader_gone = False, "stopped", False, False
        try:
            entry = pwd.getpwnam(spec.user) if spec.user else pwd.getpwuid(os.getuid())
            uid, gid, groups = (entry.pw_uid, entry.pw_gid, os.getgrouplist(spec.user, entry.pw_gid)) if spec.user \
                else (None, None, None)
            env = {"PATH": DEFAULT_PATH, "HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name,
                   **spec.env}
            Path(spec.log).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(spec.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                proc = subprocess.Popen(list(spec.command), stdin=subprocess.DEVNULL, stdout=fd,
                                        stderr=subprocess.STDOUT, cwd=spec.cwd, env=env, start_new_session=True,
                                        user=uid, group=gid, extra_groups=groups)
            finally:
                os.close(fd)
        except (OSError, KeyError, subprocess.SubprocessError) as e:
            log(f"{unit.name}: cannot start: {e}")
            unit.pid = None
            self._exited(unit, None, f"spawn failed: {e}")
            return
        unit.proc, unit.pid, unit.start_time = proc, proc.pid, start_time(proc.pid)
        unit.identity, unit.kill_mode, unit.stop_timeout_s = spec.identity, spec.kill_mode, spec.stop_timeout_s
        unit.state, unit.since, unit.up_at = "running", time.time(), time.monotonic()
        log(f"{unit.name}: started pid {proc.pid}")
        self._save()  # before anything else: a daemon killed now must find this pid to adopt it

    def _signal(self, unit: Unit, sig: signal.Signals) -> None:
        assert unit.pid is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if unit.kill_mode == "group":
                os.killpg(unit.pid, sig)
            elif not unit.leader_gone:
                os.kill(unit.pid, sig)

    def _begin_stop(self, unit: Unit, then: str) -> None:
        unit.then = then
        if unit.state == "running":
            unit.state, unit.since = "stopping", time.time()
            unit.stop_deadline, unit.killed = time.monotonic() + unit.stop_timeout_s, False
            self._signal(unit, signal.SIGTERM)
            self._save()  # a daemon killed during the stop finishes it (see start)
        elif unit.state != "stopping":
            self._finish_stop(unit)

    def _finish_stop(self, unit: Unit) -> None:
        unit.pid = unit.proc = None
        if unit.then == "remove":
            self.units.pop(unit.name, None)
        elif unit.then == "start" and unit.spec is not None:
            unit.streak = 0
            self._spawn(unit)
        else:
            unit.state, unit.since = "stopped", time.time()
        self._save()

    def _exited(self, unit: Unit, code: int | None, why: str) -> None:
        """The unit's main process is gone (or never started): restart it, or not, by its policy."""
        unit.last_exit, unit.exit_code, unit.since = why, code, time.time()
        if unit.pid is not None and unit.kill_mode == "group" and group_alive(unit.pid):
            self._signal(unit, signal.SIGTERM)  # leftovers of a crashed unit; SIGKILL after its stop timeout
            self.leftovers[unit.pid] = time.monotonic() + unit.stop_timeout_s
        unit.pid = unit.proc = None
        spec = unit.spec
        if spec is None:
            unit.state = "failed"
        elif spec.restart == "always" or (spec.restart == "on-failure" and code != 0):
            unit.backoff_s, unit.streak = backoff(unit.streak, time.monotonic() - unit.up_at)
            unit.state, unit.next_start = "backoff", time.monotonic() + unit.backoff_s
            log(f"{unit.name}: {why}; restarting in {unit.backoff_s:g} s")
        else:
            unit.state = "exited" if code == 0 else "failed"
            log(f"{unit.name}: {why}; not restarted (restart={spec.restart})")
        self._save()

    def _tick(self) -> None:
        now = time.monotonic()
        for unit in list(self.units.values()):
            if unit.pid is not None and not unit.leader_gone:
                if unit.proc is not None:
                    code = unit.proc.poll()
                    gone, why = code is not None, describe_exit(code) if code is not None else ""
                else:  # adopted: not our child
                    code, why = None, "exit unknown (adopted process)"
                    gone = start_time(unit.pid) != unit.start_time
                if gone and unit.state == "stopping":
                    unit.leader_gone, unit.last_exit, unit.exit_code = True, why, code
                elif gone:
                    self._exited(unit, code, why)
            if unit.state == "stopping":
                assert unit.pid is not None
                if unit.leader_gone and (unit.kill_mode == "process" or not group_alive(unit.pid)):
                    self._finish_stop(unit)
                elif now >= unit.stop_deadline and not unit.killed:
                    log(f"{unit.name}: still running {unit.stop_timeout_s:g} s after SIGTERM; SIGKILL")
                    unit.killed = True
                    self._signal(unit, signal.SIGKILL)
            elif unit.state == "backoff" and now >= unit.next_start and unit.spec is not None:
                unit.restarts += 1
                self._spawn(unit)
        for pgid, kill_at in list(self.leftovers.items()):
            if not group_alive(pgid):
                del self.leftovers[pgid]
            elif now >= kill_at:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                del self.leftovers[pgid]
        if now >= self.next_rotate:
            self.next_rotate = now + ROTATE_EVERY_S
            logs = {Path(u.spec.log) for u in self.units.values() if u.spec} | {self.state_dir / "supervise.log"}
            for path in logs:
                rotate(path, self.max_log_bytes, self.keep_logs)

    # -- status.json -----------------------------------------------------------------------------------------
    def _save(self) -> None:
        records = {u.name: {"pid": u.pid, "start_time": u.start_time if u.pid else None, "identity": u.identity,
                            "kill_mode": u.kill_mode, "stop_timeout_s": u.stop_timeout_s, "state": u.state,
                            "since": u.since, "restarts": u.restarts, "streak": u.streak, "last_exit": u.last_exit,
                            "exit_code": u.exit_code, "held": u.held} for u in self.units.values()}
        path = self.state_dir / "status.json"
        tmp = path.with_name("status.json.tmp")
        tmp.write_text(json.dumps({"units": records}, indent=1))
        os.replace(tmp, path)

    def _restore(self) -> dict[str, dict[str, Any]]:
        """The records of status.json; a record of the wrong shape is dropped (its process is not adopted)."""
        try:
            records = json.loads((self.state_dir / "status.json").read_text())["units"]
            if not isinstance(records, dict):
                raise TypeError("'units' is not an object")
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as e:
            log(f"status.json is unreadable ({e!r}); adopting nothing")
            return {}
        kept = {}
        for name, rec in records.items():
            shape = isinstance(rec, dict) and all(isinstance(rec.get(k), t) for k, t in RECORD.items())
            if shape and (rec["pid"] is None or rec["pid"] > 1) and rec["kill_mode"] in KILL_MODES:
                kept[name] = rec
            else:
                log(f"status.json: the record of {name!r} has the wrong shape; not adopting it")
        return kept

    # -- verbs -----------------------------------------------------------------------------------------------
    def _wait(self, names: Iterable[str], timeout: float | None = None) -> None:
        names = list(names)
        bound = timeout if timeout is not None else 10 + max(
            [self.units[n].stop_timeout_s for n in names if n in self.units], default=0.0)
        self.cond.wait_for(lambda: all(self.units.get(n) is None or self.units[n].state != "stopping"
                                       for n in names), bound)

    def _unit(self, name: str) -> Unit:
        unit = self.units.get(name)
        if unit is None:
            raise LookupError(f"no unit named {name!r} (units: {', '.join(sorted(self.units)) or 'none'})")
        return unit

    def reload(self) -> dict[str, Any]:
        with self.cond:
            try:
                specs, refused = load_units(self.units_dir, self.log_dir)
            except UnitError as e:
                return {"ok": False, "text": f"reload refused, nothing changed: {e}"}
            done: dict[str, list[str]] = {"started": [], "restarted": [], "stopped": [], "unchanged": []}
            for name, unit in list(self.units.items()):
                if name not in specs and name not in refused:
                    done["stopped"].append(name)
                    self._begin_stop(unit, "remove")
            for name, error in refused.items():  # a unit refused now keeps what it ran before
                log(f"refused: {error}")
                self.units.setdefault(name, Unit(name, state="failed")).error = error
            for name in start_order(specs, specs):
                spec, known = specs[name], self.units.get(name)
                if known is not None and known.spec is not None and known.spec.identity == spec.identity \
                        and known.then != "remove":
                    known.error = None
                    done["unchanged"].append(name)
                    continue
                done["started" if known is None or known.spec is None else "restarted"].append(name)
                unit = self.units.setdefault(name, Unit(name))
                unit.spec, unit.error, unit.held = spec, None, False
                if unit.state in ("running", "stopping"):
                    self._begin_stop(unit, "start")
                else:
                    unit.streak = 0
                    self._spawn(unit)
            self._wait(done["stopped"] + done["restarted"])
            self._save()
        lines = [f"{verb}: {' '.join(names)}" for verb, names in done.items() if names]
        return {"ok": not refused, "text": "\n".join(lines) or "no units", "data": {**done, "refused": refused},
                "error": "\n".join(f"refused: {error}" for error in refused.values())}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        verb, name = request.get("verb"), request.get("name")
        if self.closing and verb != "status":
            return {"ok": False, "text": "the daemon is shutting down"}
        if verb == "reload":
            return self.reload()
        if verb == "shutdown":
            return self.shutdown()
        with self.cond:
            if verb == "status":
                units = [self.units[n].view() for n in sorted(self.units)]
                return {"ok": True, "text": _table(units), "data": units}
            if verb not in ("start", "stop", "restart") or not isinstance(name, str):
                return {"ok": False, "text": f"unknown request {verb!r}"}
            unit = self._unit(name)
            if verb == "stop":
                unit.held = True
                self._begin_stop(unit, "stopped")
                self._wait([name])
                return {"ok": unit.state == "stopped", "text": f"{name}: {unit.state}"}
            if unit.spec is None:
                return {"ok": False, "text": f"{name} cannot start: {unit.error}"}
            if unit.state in ("running", "stopping") and verb == "restart":
                self._begin_stop(unit, "start")
                self._wait([name])
            elif unit.state == "stopping":
                unit.then = "start"
                self._wait([name])
            elif unit.state != "running":
                unit.streak = 0
                self._spawn(unit)
            return {"ok": unit.state == "running", "text": f"{name}: {unit.state} (pid {unit.pid})"}

    def shutdown(self) -> dict[str, Any]:
        """Stop every unit (not held: a new daemon starts them again); the caller then ends the loop."""
        with self.cond:
            self.closing = True
            for unit in self.units.values():
                held = unit.held
                self._begin_stop(unit, "stopped")
                unit.held = held
            self._wait(list(self.units))
            left = [u.name for u in self.units.values() if u.state == "stopping"]
            self._save()
        text = f"still stopping after their stop timeout: {' '.join(left)}" if left else "all units stopped"
        log(f"shutdown: {text}")
        return {"ok": not left, "text": text}

    # -- the control socket ----------------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                data = b""
                while not data.endswith(b"\n") and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                request = json.loads(data)
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                reply = self.handle(request)
            except LookupError as e:
                reply = {"ok": False, "text": str(e.args[0])}
            except Exception as e:  # one bad request never takes the daemon down
                log(f"control request failed: {e!r}")
                reply = {"ok": False, "text": f"bad request: {e}"}
            with contextlib.suppress(OSError):
                conn.settimeout(None)
                conn.sendall(json.dumps(reply).encode() + b"\n")
            if self.closing and request.get("verb") == "shutdown":
                self.exiting = True  # only now that the answer is out


def _table(units: list[dict[str, Any]]) -> str:
    rows = [["NAME", "STATE", "PID", "SINCE", "RESTARTS", "LAST EXIT", "IDENTITY"]]
    for u in units:
        state = f"{u['state']} (held)" if u["held"] and u["state"] == "stopped" else u["state"]
        rows.append([u["name"], state, str(u["pid"] or "-"), u["since"], str(u["restarts"]), u["last_exit"] or "-",
                     (u["identity"] or "-")[:12]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    errors = [f"{u['name']}: {u['error']}" for u in units if u["error"]]
    return "\n".join([text, *errors])


def run_daemon(units_dir: Path, state_dir: Path, foreground: bool, max_log_bytes: int, keep_logs: int) -> int:
    """Take the lock, daemonize unless told not to, start the units and serve until shutdown."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not units_dir.is_dir():
        print(f"supervise: the units folder {units_dir} does not exist", file=sys.stderr)
        return 1
    lock: IO[str] = open(state_dir / "supervise.lock", "a+")  # noqa: SIM115 (held for the daemon's whole life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pid = (state_dir / "supervise.pid").read_text().strip() or "?"
        except OSError:
            pid = "?"
        print(f"supervise: already running (pid {pid}) for {state_dir}")
        return 0
    ready = None if foreground else _daemonize(state_dir)
    (state_dir / "supervise.pid").write_text(f"{os.getpid()}\n")
    supervisor = Supervisor(units_dir, state_dir, max_log_bytes, keep_logs)
    try:
        supervisor.start()
    except (OSError, UnitError) as e:
        log(f"cannot start: {e}")
        print(f"supervise: cannot start: {e}", file=sys.stderr)
        (state_dir / "supervise.pid").unlink(missing_ok=True)
        return 1
    log(f"supervising {units_dir} (pid {os.getpid()})")
    if ready is not None:
        os.write(ready, f"ready {os.getpid()}".encode())
        os.close(ready)
    supervisor.loop()
    return 0


def _daemonize(state_dir: Path) -> int:
    """Double fork and setsid; in the daemon return the pipe to report readiness on. The caller exits once the
    daemon serves (so `ctl` works as soon as `daemon` returns), or fails if it never does."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child > 0:
        os.close(write_end)
        os.waitpid(child, 0)
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read().decode()
        if answer.startswith("ready "):
            print(f"supervise: started (pid {answer.split()[1]})")
            raise SystemExit(0)
        print(f"supervise: the daemon did not start; see {state_dir / 'supervise.log'}", file=sys.stderr)
        raise SystemExit(1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(state_dir / "supervise.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    for fd in (0, 1, 2):
        os.dup2(null if fd == 0 else out, fd)
    os.close(null)
    os.close(out)
    return write_end


def ctl(state_dir: Path, request: dict[str, Any], as_json: bool = False) -> int:
    """Send one request to the daemon and print its answer; exit 3 when no daemon serves STATE."""
    path = state_dir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(3700)  # the longest wait of a verb: a stop, bounded by the unit's stop timeout
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            print(f"supervise: no daemon serves {path} ({e.strerror}); start it with "
                  f"`python -m miaas.supervise daemon --units DIR --state {state_dir}`", file=sys.stderr)
            return EXIT_NO_DAEMON
        except OSError as e:
            print(f"supervise: cannot reach the daemon at {path}: {e}", file=sys.stderr)
            return 1
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        print(f"supervise: the daemon at {path} closed the connection without an answer", file=sys.stderr)
        return 1
    reply = json.loads(data)
    if as_json:
        print(json.dumps(reply.get("data"), indent=2))
    elif reply["ok"] or reply.get("error"):
        print(reply["text"])
    else:
        print(f"supervise: {reply['text']}", file=sys.stderr)
    if reply.get("error"):
        print(f"supervise: {reply['error']}", file=sys.stderr)
    return 0 if reply["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m miaas.supervise",
                                     description="A small process supervisor for hosts without systemd.")
    sub = parser.add_subparsers(dest="command", required=True)
    daemon = sub.add_parser("daemon", help="run the units of a folder")
    daemon.add_argument("--units", type=Path, required=True, help="folder of <name>.json unit files")
    daemon.add_argument("--state", type=Path, required=True, help="folder for the lock, socket, status and logs")
    daemon.add_argument("--foreground", action="store_true", help="stay attached to the terminal")
    daemon.add_argument("--log-max-bytes", type=int, default=10 << 20, help="rotate a log over this size")
    daemon.add_argument("--log-keep", type=int, default=3, help="rotated logs kept (<log>.1 ... <log>.N)")
    control = sub.add_parser("ctl", help="ask the daemon")
    control.add_argument("--state", type=Path, required=True)
    verbs = control.add_subparsers(dest="verb", required=True)
    verbs.add_parser("reload", help="apply the units folder: start new, restart changed, stop removed units")
    status = verbs.add_parser("status", help="every unit's state")
    status.add_argument("-o", "--output", choices=("text", "json"), default="text")
    for verb in ("start", "stop", "restart"):
        verbs.add_parser(verb, help=f"{verb} one unit").add_argument("name")
    verbs.add_parser("shutdown", help="stop every unit, then the daemon")
    args = parser.parse_args(argv)
    if args.command == "daemon":
        if args.log_max_bytes < 1 or args.log_keep < 1:
            parser.error("--log-max-bytes and --log-keep must be at least 1")
        return run_daemon(args.units.resolve(), args.state.resolve(), args.foreground, args.log_max_bytes,
                          args.log_keep)
    request = {"verb": args.verb, "name": getattr(args, "name", None)}
    return ctl(args.state.resolve(), request, as_json=getattr(args, "output", "text") == "json")


if __name__ == "__main__":
    sys.exit(main())
