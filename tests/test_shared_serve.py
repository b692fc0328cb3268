"""The shared server: bodies over the service's limit are refused before the app buffers them."""

from __future__ import annotations

import secrets
import socket

import requests

from miaas.serve import Server
from service_registry.app import create_app
from service_registry.settings import ServiceRegistrySettings


def test_a_body_over_the_limit_is_a_413_and_a_small_one_reaches_the_app() -> None:
    token = secrets.token_hex(32)
    server = Server(create_app(ServiceRegistrySettings(service_token=token)), max_body_bytes=4096).start()
    try:
        # when only the headers of a too-big request are sent, the server already refuses it: nothing is buffered
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(
                b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {token}\r\nContent-Length: 10000\r\n\r\n".encode()
            )
            status_line = conn.makefile("rb").readline()
        assert status_line.split()[1] == b"413", status_line
        headers = {"Authorization": f"Bearer {token}"}
        small = requests.post(f"{server.url}/register", json={"name": "x", "url": "http://x:1"}, headers=headers,
                              timeout=10)
        assert small.status_code == 201
    finally:
        server.close()
