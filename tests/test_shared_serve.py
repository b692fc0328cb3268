"""The shared server: bodies over the service's limit are refused before the app buffers them."""

from __future__ import annotations

import socket

import requests

from miaas.client import Signer
from miaas.identity import fixed
from miaas.serve import Server
from miaas.testing import Pki
from service_registry.app import create_app
from service_registry.settings import ServiceRegistrySettings


def test_a_body_over_the_limit_is_a_413_and_a_small_one_reaches_the_app(pki: Pki) -> None:
    server = Server(create_app(ServiceRegistrySettings(**pki.settings("service-registry"))),
                    max_body_bytes=4096).start()
    try:
        # when only the headers of a too-big request are sent, the server already refuses it: nothing is buffered
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(
                b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + b"Content-Length: 10000\r\n\r\n"
            )
            status_line = conn.makefile("rb").readline()
        assert status_line.split()[1] == b"413", status_line
        small = requests.post(f"{server.url}/register", json={"name": "x", "url": "http://x:1"}, timeout=10,
                              auth=Signer(fixed(pki.credential("admin"))))
        assert small.status_code == 201
    finally:
        server.close()
