"""Serving a service app: a waitress server on a chosen or free port, registration, clean shutdown."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from flask import Flask
from waitress import wasyncore
from waitress.server import create_server

from miaas.discovery import Registration
from miaas.settings import ServiceSettings

log = logging.getLogger(__name__)
# waitress buffers a whole request body before the app sees it: refuse bigger ones at the door.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
MULTIPART_SLACK_BYTES = 1024 * 1024


class Server:
    """A WSGI app served by waitress; binds at construction so the URL is known before it runs."""

    def __init__(
        self, app: Flask, host: str = "127.0.0.1", port: int = 0, threads: int = 16,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self._server: Any = create_server(
            app, host=host, port=port, threads=threads, ident="miaas", channel_timeout=300,
            max_request_body_size=max_body_bytes, clear_untrusted_proxy_headers=True,
        )
        self.host = host
        self.port: int = int(self._server.effective_port)  # type: ignore[union-attr]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve in the calling thread until closed."""
        self._server.run()

    def start(self) -> Server:
        """Serve in a background thread (tests and embedded use)."""
        self._thread = threading.Thread(target=self.run, name=f"http-{self.port}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop listening and close every open (keep-alive) connection, then stop the worker threads.

        When a background thread serves, the sockets are closed inside its own event loop: closing them from
        another thread races its select() (EBADF).
        """
        server = self._server
        if self._thread is not None and self._thread.is_alive():
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
            self._thread.join(timeout=5)
        else:
            with contextlib.suppress(OSError):
                wasyncore.close_all(server._map)
        server.task_dispatcher.shutdown()


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


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
) -> None:
    """Run a service process: serve, register with the service registry, and stop cleanly on SIGTERM/SIGINT."""
    configure_logging(settings.log_level)
    server = Server(app, settings.host, settings.port, max_body_bytes=max_body_bytes)
    public_url = settings.public_url or server.url
    app.config["PUBLIC_URL"] = public_url
    if on_start is not None:
        on_start(public_url)
    registration = None
    if settings.service_registry_url:
        registration = Registration(
            settings.service_registry_url,
            settings.service_token.get_secret_value(),
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
        if on_stop is not None:
            on_stop()
        try:
            server.close()
        except Exception:  # noqa: BLE001 - closing a half-closed server must not hide the real exit
            log.debug("server close failed", exc_info=True)
