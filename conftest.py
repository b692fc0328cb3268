"""Fixtures shared by every test: a real broker, servers for in-process apps, settings, and the CI skip rule."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from embedded_broker import EmbeddedBroker
from miaas.bus import ensure_topics
from miaas.serve import Server

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
def service_token() -> str:
    return secrets.token_hex(32)


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
