"""Serving a service app: a cheroot server on a chosen or free port, registration, clean shutdown.

cheroot hands the app the request body as it arrives on the socket (waitress would first buffer all of it to a
temp file), so a 1 GiB upload is written once, where the app puts it. Bodies over a service's limit are refused
from their Content-Length before any of the body is read.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from cheroot import wsgi
from flask import Flask

from miaas.discovery import Registration
from miaas.settings import ServiceSettings

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
MULTIPART_SLACK_BYTES = 1024 * 1024
SOCKET_TIMEOUT_S = 60  # a client silent this long in the middle of a request is dropped
LISTEN_BACKLOG = 128
SHUTDOWN_GRACE_S = 5


class Server:
    """A WSGI app served by cheroot; binds at construction so the URL is known before it runs."""

    def __init__(
        self, app: Flask, host: str = "127.0.0.1", port: int = 0, threads: int = 16,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self._server = wsgi.Server(
            (host, port), app, numthreads=threads, server_name="miaas", request_queue_size=LISTEN_BACKLOG,
            timeout=SOCKET_TIMEOUT_S, shutdown_timeout=SHUTDOWN_GRACE_S,
        )
        self._server.max_request_body_size = max_body_bytes
        self._server.error_log = _error_log  # type: ignore[method-assign]
        self._server.prepare()  # binds the socket and starts the worker threads
        self.host = host
        self.port: int = int(self._server.bind_addr[1])  # type: ignore[index]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve in the calling thread until closed."""
        self._server.serve()

    def start(self) -> Server:
        """Serve in a background thread (tests and embedded use)."""
        self._thread = threading.Thread(target=self.run, name=f"http-{self.port}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop listening, close the open (keep-alive) connections, and stop the worker threads."""
        self._server.stop()
        if self._thread is not None:
            self._thread.join(timeout=SHUTDOWN_GRACE_S + 5)


def _error_log(msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
    """cheroot's errors into our log (a client hanging up mid-request is not worth a traceback on stderr)."""
    log.log(level, "http server: %s", msg, exc_info=traceback and level >= logging.ERROR)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_service(
    name: str,
    app: Flask,
    settings: ServiceSettings,
    *,
    metadata: dict[str, Any] | None = None,
    instance_id: str | None = None,
    on_start: Callable[[str], None] | None = None,
    on_stop: Callable[[], None] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    threads: int = 16,
) -> None:
    """Run a service process: serve, register with the service registry, and stop cleanly on SIGTERM/SIGINT."""
    configure_logging(settings.log_level)
    server = Server(app, settings.host, settings.port, threads=threads, max_body_bytes=max_body_bytes)
    public_url = settings.public_url or server.url
    app.config["PUBLIC_URL"] = public_url
    trust = app.extensions["miaas_trust"]  # set by every service's create_app (miaas.trust.Trust)
    if on_start is not None:
        try:
            on_start(public_url)  # an agent joins the cluster here, once its URL is known
        except BaseException:
            server.close()  # its worker threads would keep the process alive
            raise
    trust.start()
    registration = None
    if settings.service_registry_url:
        registration = Registration(
            settings.service_registry_url,
            trust.credential,
            name=name,
            url=public_url,
            metadata=metadata,
            instance_id=instance_id,
            interval_s=settings.heartbeat_interval_s,
        )
        registration.start()

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    log.info("%s listening on %s", name, public_url)
    print(f"{name} ready at {public_url}", flush=True)
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        log.info("%s stopping", name)
        if registration is not None:
            registration.stop()
        trust.stop()
        if on_stop is not None:
            on_stop()
        try:
            server.close()
        except Exception:  # noqa: BLE001 - closing a half-closed server must not hide the real exit
            log.debug("server close failed", exc_info=True)
