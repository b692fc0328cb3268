"""Fixtures shared by every test: a cluster CA, a real broker, a throwaway PostgreSQL, servers for in-process
apps, settings, and the CI skip rule."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from embedded_broker import EmbeddedBroker
from miaas.bus import ensure_topics
from miaas.serve import Server
from miaas.testing import Pki

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI a skipped test is a failed test: every real component must be there."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The cluster CA of the test session and credentials from it (see miaas.testing.Pki)."""
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a real Kafka-protocol broker: `MIAAS_TEST_KAFKA_BOOTSTRAP`, else embedded Tansu."""
    external = os.environ.get("MIAAS_TEST_KAFKA_BOOTSTRAP")
    if external:
        ensure_topics(external)
        yield external
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_file=log) as embedded:
        yield embedded.bootstrap


POSTGRES_INSTALL = "apt-get install -y postgresql"
POSTGRES_USER = "miaas-test"  # PostgreSQL refuses to run as root; tests run by root start it as this user


def _postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL bin folder holding `initdb` and `pg_ctl`."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [d for d in found if (d / "pg_ctl").is_file()]
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0, default=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres_user() -> dict[str, Any]:
    """subprocess arguments that drop root to POSTGRES_USER (created as a system user when missing)."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", POSTGRES_USER],
                       check=True, capture_output=True)
    entry = pwd.getpwnam(POSTGRES_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL (`postgresql+psycopg://`) of an empty database on a throwaway PostgreSQL server.

    `MIAAS_TEST_POSTGRES_URL` names an existing database instead. Otherwise the server is started from Debian's
    binaries (`/usr/lib/postgresql/*/bin`) in a temp folder, on a free port, and stopped at the end of the session.
    """
    external = os.environ.get("MIAAS_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL binaries not found (/usr/lib/postgresql/*/bin/initdb); install: {POSTGRES_INSTALL}")
    import psycopg

    drop = _as_postgres_user()
    root = Path(tempfile.mkdtemp(prefix="miaas-pg-"))  # not under pytest's 0700 temp root: the server user reads it
    if drop:
        os.chown(root, drop["user"], drop["group"])
    data, log = root / "data", root / "server.log"
    run: dict[str, Any] = {"check": True, "capture_output": True, "cwd": root, "env": {**os.environ, "LC_ALL": "C"},
                           **drop}
    port = _free_port()
    try:
        started = time.monotonic()
        subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                        "--locale=C", "--no-sync", "--no-instructions"], **run)
        options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
                   " -c full_page_writes=off -c max_connections=200")
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60",
                        "start"], **run)
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE miaas_test")
        print(f"PostgreSQL ({bin_dir.parent.name}) started in {time.monotonic() - started:.2f}s on port {port}")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/miaas_test"
    except subprocess.CalledProcessError as exc:
        server_log = log.read_text(errors="replace") if log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr!r}\n{server_log}") from exc
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           **{**run, "check": False})
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def serve() -> Iterator[Callable[[Flask], Server]]:
    """Serve in-process apps over real HTTP on free ports; all are closed after the test."""
    servers: list[Server] = []

    def start(app: Flask) -> Server:
        server = Server(app).start()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        server.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A per-test folder for databases, model stores and agent state."""
    return tmp_path
