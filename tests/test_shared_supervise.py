"""The supervisor of hosts without systemd (miaas.supervise), over real processes: a real daemon in a temporary
folder runs small Python scripts as units, and every check looks at the real processes in /proc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from miaas.supervise import BACKOFF_MAX_S, UnitError, backoff, parse_env_file, parse_unit, start_order
from miaas.testing import wait_for

SCRIPT = Path(__file__).resolve().parents[1] / "miaas" / "supervise.py"
SLEEP = "import time\nwhile True: time.sleep(1)"
BOUND = 60.0  # generous bound for any condition on a slow, shared machine


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Host:
    """A units folder and a state folder, and the daemon that serves them (short paths: a socket's is limited)."""

    def __init__(self, root: Path) -> None:
        self.root, self.units, self.state = root, root / "u", root / "s"
        self.units.mkdir()
        self.tag = uuid.uuid4().hex[:12]
        self.daemon_cmd = [sys.executable, "-m", "miaas.supervise"]

    def marker(self, name: str) -> str:
        return f"sv-test-{self.tag}-{name}"

    def unit(self, name: str, code: str = SLEEP, python: str = sys.executable, **fields: Any) -> Path:
        """Write UNITS/<name>.json running `code`; its argv carries a marker that finds its processes."""
        path = self.units / f"{name}.json"
        path.write_text(json.dumps({"command": [python, "-c", code, self.marker(name)], **fields}))
        return path

    def copies(self, name: str) -> list[int]:
        """Live processes whose argv carries the unit's marker (the unit and any child it forked)."""
        marker = self.marker(name)
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and marker in cmdline(int(p)) and alive(int(p))]

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.daemon_cmd, *args], capture_output=True, text=True, timeout=300, env=env,
                              cwd=SCRIPT.parents[1])

    def daemon(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = self.run("daemon", "--units", str(self.units), "--state", str(self.state), *extra, env=env)
        assert done.returncode == 0, done.stderr
        return done

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("ctl", "--state", str(self.state), *args)

    def status(self) -> dict[str, dict[str, Any]]:
        done = self.ctl("status", "-o", "json")
        assert done.returncode == 0, done.stderr
        return {u["name"]: u for u in json.loads(done.stdout)}

    def when(self, name: str, state: str, **fields: Any) -> dict[str, Any]:
        """Wait until the unit is in `state` (with these field values) and return its status."""
        def check() -> dict[str, Any] | None:
            unit = self.status().get(name)
            ok = unit is not None and unit["state"] == state and all(unit[k] == v for k, v in fields.items())
            return unit if ok else None
        return wait_for(check, BOUND, f"{name} {state} {fields}", interval=0.1)

    def daemon_pid(self) -> int:
        return int((self.state / "supervise.pid").read_text())

    def log(self, name: str) -> str:
        path = self.state / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        """Shut the daemon down; whatever survives a failed test is killed by its pid."""
        if (self.state / "control.sock").exists():
            self.ctl("shutdown")
        pid_file = self.state / "supervise.pid"
        if pid_file.exists() and alive(pid := int(pid_file.read_text())) and "miaas.supervise" in " ".join(
                cmdline(pid)) + str(SCRIPT):
            os.kill(pid, signal.SIGKILL)
        for path in self.units.glob("*.json"):
            for pid in self.copies(path.stem):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def host() -> Iterator[Host]:
    root = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))
    h = Host(root)
    try:
        yield h
    finally:
        h.close()
        shutil.rmtree(root, ignore_errors=True)


# -- the pure parts -------------------------------------------------------------------------------------------------

def test_backoff_doubles_from_1_s_to_30_s_and_resets_after_a_minute_up() -> None:
    streak, waits = 0, []
    for _ in range(7):
        wait, streak = backoff(streak, uptime_s=0.5)
        waits.append(wait)
    assert waits == [1, 2, 4, 8, 16, 30, 30] and BACKOFF_MAX_S == 30
    assert backoff(streak, uptime_s=60.0) == (1, 1)


def test_an_env_file_is_read_as_data_never_as_shell() -> None:
    text = "# comment\n\nA=1\nB = two words \nC=\"quoted $HOME\"\nD='x'\nE=$(rm -rf /)\nF=a=b\nJSON=[\"p\", \"v\"]\n"
    assert parse_env_file(text, "f") == {"A": "1", "B": "two words", "C": "quoted $HOME", "D": "x",
                                         "E": "$(rm -rf /)", "F": "a=b", "JSON": '["p", "v"]'}
    for bad in ("no equals sign", "1X=2", "A B=1", "export A=1"):
        with pytest.raises(UnitError, match="f line 1: expected KEY=VALUE"):
            parse_env_file(bad, "f")


BAD_UNITS = [
    ("not json", "not valid JSON"),
    ("[1]", "must be a JSON object"),
    ('{"command": []}', "field 'command'"),
    ('{"command": "python -c 1"}', "field 'command'"),
    ('{"command": ["x", 3]}', "field 'command'"),
    ('{"command": ["x\\u0000y"]}', "field 'command': must not hold a NUL"),
    ('{"command": ["x"], "comand": 1}', "field 'comand': unknown field"),
    ('{"command": ["x"], "restart": "sometimes"}', "field 'restart'"),
    ('{"command": ["x"], "kill_mode": "none"}', "field 'kill_mode'"),
    ('{"command": ["x"], "stop_timeout_s": -1}', "field 'stop_timeout_s'"),
    ('{"command": ["x"], "stop_timeout_s": true}', "field 'stop_timeout_s'"),
    ('{"command": ["x"], "stop_timeout_s": NaN}', "field 'stop_timeout_s'"),
    ('{"command": ["x"], "env": {"1A": "x"}}', "field 'env'"),
    ('{"command": ["x"], "env": {"A": 1}}', "field 'env'"),
    ('{"command": ["x"], "user": "no-such-user-here"}', "field 'user': no such user"),
    ('{"command": ["x"], "cwd": "relative/dir"}', "field 'cwd'"),
    ('{"command": ["x"], "after": ["Bad Name"]}', "field 'after'"),
    ('{"command": ["x"], "env_file": "/nonexistent/miaas.env"}', "field 'env_file': cannot read"),
]


@pytest.mark.parametrize(("content", "problem"), BAD_UNITS)
def test_a_bad_unit_file_is_refused_naming_the_file_and_the_field(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "web.json"
    path.write_text(content)
    with pytest.raises(UnitError) as refused:
        parse_unit(path, tmp_path)
    assert str(path) in str(refused.value) and problem in str(refused.value)


def test_a_unit_name_and_an_env_file_line_are_checked_too(tmp_path: Path) -> None:
    (tmp_path / "Web Server.json").write_text('{"command": ["x"]}')
    with pytest.raises(UnitError, match="unit name 'Web Server' must match"):
        parse_unit(tmp_path / "Web Server.json", tmp_path)
    (tmp_path / "env").write_text("A=1\nthis is not a pair\n")
    (tmp_path / "web.json").write_text(json.dumps({"command": ["x"], "env_file": str(tmp_path / "env")}))
    with pytest.raises(UnitError, match=r"field 'env_file': .*env line 2: expected KEY=VALUE"):
        parse_unit(tmp_path / "web.json", tmp_path)


def test_units_start_after_the_units_they_name(tmp_path: Path) -> None:
    for name, after in {"portal": ["registry", "controller"], "controller": ["registry"], "registry": [],
                        "loop-a": ["loop-b"], "loop-b": ["loop-a"], "agent": ["nowhere"]}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"command": ["x"], "after": after}))
    specs = {p.stem: parse_unit(p, tmp_path) for p in tmp_path.glob("*.json")}
    order = start_order(specs, specs)
    assert sorted(order) == sorted(specs)
    assert order.index("registry") < order.index("controller") < order.index("portal")


# -- the daemon -----------------------------------------------------------------------------------------------------

def test_a_unit_runs_with_only_its_own_environment_in_its_cwd_and_logs_there(host: Host) -> None:
    env_file = host.root / "miaas.env"
    env_file.write_text("# settings\nFROM_FILE=file\nBOTH=file\nSECRET='s3 cr3t'\n")
    code = ("import json, os, sys; print('env', json.dumps(dict(os.environ))); print('cwd', os.getcwd()); "
            "print('to stderr', file=sys.stderr); sys.stdout.flush(); import time; time.sleep(1000)")
    host.unit("web", code, env_file=str(env_file), env={"BOTH": "unit", "OWN": "1"}, cwd=str(host.root))
    host.daemon(env={**os.environ, "LEAKED_FROM_THE_DAEMON": "1"})
    unit = host.when("web", "running")
    assert host.copies("web") == [unit["pid"]]
    lines = wait_for(lambda: (text := host.log("web")).count("\n") >= 3 and text.splitlines(), BOUND, "the log")
    env = json.loads(next(line for line in lines if line.startswith("env "))[4:])
    assert env["FROM_FILE"] == "file" and env["BOTH"] == "unit" and env["OWN"] == "1" and env["SECRET"] == "s3 cr3t"
    assert "LEAKED_FROM_THE_DAEMON" not in env and {"PATH", "HOME", "USER"} <= set(env)
    assert f"cwd {host.root}" in lines and "to stderr" in lines
    assert len(unit["identity"]) == 64 and unit["restarts"] == 0 and unit["last_exit"] is None
    assert oct((host.state / "control.sock").stat().st_mode & 0o777) == "0o600"
    text = host.ctl("status")
    assert text.returncode == 0 and "web" in text.stdout and "running" in text.stdout


def test_a_crashing_unit_is_restarted_after_1_then_2_then_4_seconds(host: Host) -> None:
    host.unit("crash", "import sys, time; print('start', time.time(), flush=True); sys.exit(3)")
    host.daemon()
    seen = wait_for(lambda: (u := host.status()["crash"])["restarts"] >= 3 and u, BOUND, "three restarts")
    assert seen["last_exit"] == "exit 3" and seen["exit_code"] == 3
    starts = [float(line.split()[1]) for line in host.log("crash").splitlines()]
    assert len(starts) >= 4
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # each gap holds its backoff (python's own start-up time can differ a little between two runs)
    assert gaps[0] >= 0.8 and gaps[1] >= 1.8 and gaps[2] >= 3.8, gaps
    backing_off = host.when("crash", "backoff")
    assert backing_off["backoff_s"] in (4, 8, 16)


def test_restart_policies_never_on_failure_and_always(host: Host) -> None:
    host.unit("once", "import sys; sys.exit(3)", restart="never")
    host.unit("done", "import sys; sys.exit(0)")  # on-failure: a clean exit is final
    host.unit("always", "import sys; sys.exit(0)", restart="always")
    host.daemon()
    assert host.when("once", "failed", restarts=0)["last_exit"] == "exit 3"
    assert host.when("done", "exited", restarts=0)["exit_code"] == 0
    wait_for(lambda: host.status()["always"]["restarts"] >= 1, BOUND, "a clean exit restarted under always")


def test_stop_start_and_restart_verbs(host: Host) -> None:
    host.unit("web")
    host.daemon()
    first = host.when("web", "running")["pid"]

    stopped = host.ctl("stop", "web")
    assert stopped.returncode == 0, stopped.stderr
    assert host.status()["web"]["state"] == "stopped" and not alive(first) and host.copies("web") == []
    # a reload of the unchanged unit leaves it stopped
    assert "unchanged: web" in host.ctl("reload").stdout
    assert host.status()["web"]["state"] == "stopped" and host.copies("web") == []

    assert host.ctl("start", "web").returncode == 0
    second = host.when("web", "running")["pid"]
    assert second != first and host.copies("web") == [second]

    assert host.ctl("restart", "web").returncode == 0
    third = host.when("web", "running")["pid"]
    assert third != second and not alive(second) and host.copies("web") == [third]

    unknown = host.ctl("stop", "nope")
    assert unknown.returncode == 1 and "no unit named 'nope'" in unknown.stderr


def test_reload_starts_new_restarts_changed_stops_removed_and_leaves_unchanged_alone(host: Host) -> None:
    env_file = host.root / "app.env"
    env_file.write_text("LEVEL=1\n")
    host.unit("keep")
    host.unit("change")
    host.unit("envchange", env_file=str(env_file))
    host.unit("gone")
    host.daemon()
    pids = {n: host.when(n, "running")["pid"] for n in ("keep", "change", "envchange", "gone")}
    identity = host.status()["envchange"]["identity"]

    host.unit("change", env={"NEW": "1"})
    env_file.write_text("LEVEL=2\n")
    (host.units / "gone.json").unlink()
    host.unit("fresh")
    (host.units / "keep.json").write_bytes((host.units / "keep.json").read_bytes())  # rewritten, same bytes
    reload = host.ctl("reload")

    assert reload.returncode == 0, reload.stderr
    assert reload.stdout.splitlines() == ["started: fresh", "restarted: change envchange", "stopped: gone",
                                          "unchanged: keep"]
    status = host.status()
    assert set(status) == {"keep", "change", "envchange", "fresh"}
    assert status["keep"]["pid"] == pids["keep"] and host.copies("keep") == [pids["keep"]]
    for name in ("change", "envchange"):
        new = host.when(name, "running")["pid"]
        assert new != pids[name] and not alive(pids[name]) and host.copies(name) == [new]
    assert host.status()["envchange"]["identity"] != identity
    assert not alive(pids["gone"]) and host.copies("gone") == []
    assert host.copies("fresh") == [host.when("fresh", "running")["pid"]]


def test_a_new_daemon_adopts_the_units_a_killed_one_left_running(host: Host) -> None:
    host.unit("web")
    host.unit("edited")
    host.daemon()
    web = host.when("web", "running")["pid"]
    edited = host.when("edited", "running")["pid"]
    old_daemon = host.daemon_pid()

    os.kill(old_daemon, signal.SIGKILL)
    wait_for(lambda: not alive(old_daemon), BOUND, "the daemon gone")
    assert alive(web) and alive(edited)  # units outlive their supervisor
    host.unit("edited", env={"VERSION": "2"})  # changed while no daemon ran
    host.daemon()

    assert host.daemon_pid() != old_daemon
    assert host.when("web", "running")["pid"] == web and host.copies("web") == [web]  # adopted, no second copy
    new_edited = wait_for(lambda: (p := host.status()["edited"]["pid"]) not in (None, edited) and p, BOUND,
                          "the edited unit restarted")
    assert not alive(edited) and host.copies("edited") == [new_edited]
    assert "web: adopted pid" in (host.state / "supervise.log").read_text()

    # the adopted unit is not the new daemon's child: its exit is seen in /proc, and it is restarted
    os.kill(web, signal.SIGKILL)
    restarted = wait_for(lambda: (u := host.status()["web"])["pid"] not in (None, web) and u, BOUND, "a restart")
    assert restarted["restarts"] == 1 and restarted["last_exit"] == "exit unknown (adopted process)"
    assert host.copies("web") == [restarted["pid"]]


def test_a_stopped_unit_stays_stopped_under_new_daemons_until_its_file_changes(host: Host) -> None:
    host.unit("web")
    host.daemon()
    host.when("web", "running")
    assert host.ctl("stop", "web").returncode == 0
    for _ in range(2):  # the daemon that started it held, and the one after
        daemon = host.daemon_pid()
        os.kill(daemon, signal.SIGKILL)
        wait_for(lambda: not alive(daemon), BOUND, "the daemon gone")  # noqa: B023 (used at once)
        host.daemon()
        assert host.when("web", "stopped")["held"] is True and host.copies("web") == []
    host.unit("web", env={"VERSION": "2"})
    assert "restarted: web" in host.ctl("reload").stdout
    assert host.copies("web") == [host.when("web", "running")["pid"]]


def test_a_stop_cut_short_by_the_daemons_death_is_finished_by_the_next_daemon(host: Host) -> None:
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(1)"
    host.unit("stubborn", stubborn, stop_timeout_s=2)
    host.daemon()
    pid = host.when("stubborn", "running")["pid"]
    stop = [*host.daemon_cmd, "ctl", "--state", str(host.state), "stop", "stubborn"]
    with subprocess.Popen(stop, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as stopping:
        host.when("stubborn", "stopping")
        daemon = host.daemon_pid()
        os.kill(daemon, signal.SIGKILL)
        wait_for(lambda: not alive(daemon), BOUND, "the daemon gone")
        assert stopping.wait(timeout=BOUND) == 1  # its answer never came
    assert alive(pid)
    host.daemon()
    assert host.when("stubborn", "stopped")["held"] is True and not alive(pid) and host.copies("stubborn") == []


def test_a_second_daemon_says_who_runs_and_leaves(host: Host) -> None:
    host.unit("web")
    host.daemon()
    pid = host.when("web", "running")["pid"]
    second = host.daemon()
    assert second.returncode == 0 and f"already running (pid {host.daemon_pid()})" in second.stdout
    assert host.status()["web"]["pid"] == pid and host.copies("web") == [pid]


def test_a_stop_kills_the_units_whole_group_and_sigkills_after_the_timeout(host: Host) -> None:
    stubborn = ("import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nos.fork()\n"
                "while True: time.sleep(1)")
    host.unit("stubborn", stubborn, stop_timeout_s=1)
    host.daemon()
    wait_for(lambda: len(host.copies("stubborn")) == 2, BOUND, "the unit and its child")
    both = host.copies("stubborn")

    stopped = host.ctl("stop", "stubborn")
    assert stopped.returncode == 0, stopped.stderr
    assert not any(alive(p) for p in both)
    assert host.status()["stubborn"]["last_exit"] == "signal SIGKILL"
    assert "still running 1 s after SIGTERM; SIGKILL" in (host.state / "supervise.log").read_text()


def test_kill_mode_process_leaves_the_units_children_running(host: Host) -> None:
    forker = "import os, time\nif os.fork() == 0:\n    os.setpgrp()\nwhile True: time.sleep(1)"
    host.unit("agent", forker, kill_mode="process")
    host.daemon()
    leader = host.when("agent", "running")["pid"]
    wait_for(lambda: len(host.copies("agent")) == 2, BOUND, "the unit and its child")
    assert host.ctl("stop", "agent").returncode == 0
    assert not alive(leader) and len(host.copies("agent")) == 1  # the forwarder lives on, as the agent needs


def test_a_group_left_behind_by_a_crash_is_cleaned_up(host: Host) -> None:
    crash = "import os, sys, time\nif os.fork() == 0:\n    time.sleep(1000)\ntime.sleep(0.5)\nsys.exit(1)"
    host.unit("crash", crash, restart="never")
    host.daemon()
    host.when("crash", "failed")
    wait_for(lambda: host.copies("crash") == [], BOUND, "the crashed unit's child gone")


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(), reason="needs root and python3")
def test_a_unit_with_a_user_runs_as_that_user(host: Host) -> None:
    code = ("import os, time; print(os.getuid(), os.getgid(), os.environ['HOME'], os.environ['USER'], flush=True);"
            "time.sleep(1000)")
    host.unit("web", code, python="/usr/bin/python3", user="nobody")
    host.daemon()
    pid = host.when("web", "running")["pid"]
    uid_line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid"))
    assert uid_line.split()[1:] == ["65534"] * 4
    wait_for(lambda: host.log("web").strip() == "65534 65534 /nonexistent nobody", BOUND, "the unit's own line")


def test_a_bad_unit_is_refused_and_the_others_still_run(host: Host) -> None:
    host.unit("good")
    (host.units / "bad.json").write_text('{"command": ["x"], "restart": "sometimes"}')
    host.daemon()
    assert host.when("good", "running")["pid"] in host.copies("good")
    bad = host.status()["bad"]
    assert bad["state"] == "failed" and "bad.json: field 'restart'" in bad["error"]
    reload = host.ctl("reload")
    assert reload.returncode == 1 and "refused:" in reload.stderr and "bad.json: field 'restart'" in reload.stderr
    assert "unchanged: good" in reload.stdout

    # a running unit whose file turns bad keeps running what it ran, and says why the new file is refused
    pid = host.status()["good"]["pid"]
    (host.units / "good.json").write_text('{"command": "oops"}')
    assert host.ctl("reload").returncode == 1
    good = host.status()["good"]
    assert good["pid"] == pid and good["state"] == "running" and "field 'command'" in good["error"]


def test_without_a_daemon_ctl_says_so_and_exits_3(host: Host) -> None:
    done = host.ctl("status")
    assert done.returncode == 3 and "no daemon serves" in done.stderr and str(host.state) in done.stderr


def test_garbage_on_the_control_socket_is_answered_and_the_daemon_carries_on(host: Host) -> None:
    host.unit("web")
    host.daemon()
    for garbage in (b"\xff\xfe not json\n", b"[1, 2]\n", b'{"verb": "format-disk"}\n', b'{"verb": "stop"}\n'):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(host.state / "control.sock"))
            sock.sendall(garbage)
            reply = json.loads(sock.makefile("rb").readline())
        assert reply["ok"] is False and reply["text"]
    assert host.when("web", "running")


def test_logs_rotate_by_size_and_keep_a_bounded_number(host: Host) -> None:
    chatty = "import time\nwhile True:\n    print('x' * 99, flush=True)\n    time.sleep(0.002)"
    host.unit("chatty", chatty)
    host.daemon("--log-max-bytes", "20000", "--log-keep", "2")
    log = host.state / "logs" / "chatty.log"
    wait_for(lambda: Path(f"{log}.2").exists(), BOUND, "two rotations")
    assert not Path(f"{log}.3").exists()
    assert Path(f"{log}.1").stat().st_size >= 20000
    # the unit keeps writing to the same, truncated file
    wait_for(lambda: log.stat().st_size > 0, BOUND, "new lines after the rotation")
    assert set(Path(f"{log}.1").read_text().splitlines()) == {"x" * 99}


def test_sigterm_to_the_daemon_stops_its_units_and_the_next_one_starts_them(host: Host) -> None:
    host.unit("web")
    host.daemon()
    pid = host.when("web", "running")["pid"]
    daemon = host.daemon_pid()
    os.kill(daemon, signal.SIGTERM)
    wait_for(lambda: not alive(daemon), BOUND, "the daemon gone")
    assert not alive(pid) and host.copies("web") == [] and not (host.state / "control.sock").exists()
    host.daemon()
    assert host.when("web", "running")["pid"] != pid


def test_a_corrupt_status_file_adopts_nothing_but_the_units_still_start(host: Host) -> None:
    host.state.mkdir()
    (host.state / "status.json").write_text('{"units": {"web": {"pid": 1, "start_time": "soon"}}}')
    host.unit("web")
    host.daemon()
    assert host.when("web", "running")["pid"] != 1
    assert "wrong shape" in (host.state / "supervise.log").read_text()


def test_the_supervisor_runs_as_a_plain_script_with_the_standard_library_only(host: Host) -> None:
    host.daemon_cmd = [sys.executable, "-I", "-S", str(SCRIPT)]  # -S: no site-packages at all
    host.unit("web")
    host.daemon()
    assert host.when("web", "running")["pid"] in host.copies("web")
    assert host.ctl("shutdown").returncode == 0
    wait_for(lambda: host.ctl("status").returncode == 3, BOUND, "the daemon gone")
    assert host.copies("web") == []
