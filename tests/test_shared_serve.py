"""The shared server: bodies over the service's limit are refused before the app buffers them."""

from __future__ import annotations

import secrets

import requests

from miaas.serve import Server
from service_registry.app import create_app
from service_registry.settings import ServiceRegistrySettings


def test_a_body_over_the_limit_is_a_413_and_a_small_one_reaches_the_app() -> None:
    token = secrets.token_hex(32)
    server = Server(create_app(ServiceRegistrySettings(service_token=token)), max_body_bytes=4096).start()
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        big = requests.post(f"{server.url}/register", data=b"{" + b" " * 10_000 + b"}", headers=headers, timeout=10)
        assert big.status_code == 413
        small = requests.post(f"{server.url}/register", json={"name": "x", "url": "http://x:1"}, headers=headers,
                              timeout=10)
        assert small.status_code == 201
    finally:
        server.close()
