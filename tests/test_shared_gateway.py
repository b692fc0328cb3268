"""The endpoints' data plane over a real Caddy (Debian's `caddy`) and real upstream servers: balancing, a dead
replica's requests retried on another, the body limit, API keys, 503 with Retry-After without replicas, and
route changes applied without a restart."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from miaas.gateway import Endpoint, Gateway, GatewayError

KEY = "k" * 12 + "-0123456789_abc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    """A model replica: answers its name and the path it was asked for."""

    def __init__(self, name: str) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._answer()

            def _answer(self) -> None:
                body = json.dumps({"replica": outer.name, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.name = name
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    if shutil.which("caddy") is None:
        pytest.skip("caddy is missing: apt-get install -y caddy (tests/install-packages.sh installs it)")
    g = Gateway(tmp_path / "caddy", listen=f"127.0.0.1:{free_port()}", admin=f"127.0.0.1:{free_port()}").start()
    try:
        yield g
    finally:
        g.stop()


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    made = [Replica("a"), Replica("b")]
    yield made
    for r in made:
        r.stop()


def url(g: Gateway, path: str) -> str:
    return f"http://{g.listen}{path}"


def test_an_endpoint_balances_over_its_replicas_and_strips_its_prefix(gateway: Gateway,
                                                                     replicas: list[Replica]) -> None:
    assert gateway.apply([Endpoint("/m/iris/production", tuple(r.address for r in replicas))])
    seen = set()
    for _ in range(40):
        answer = requests.get(url(gateway, "/m/iris/production/predict?x=1"), timeout=5).json()
        assert answer["path"] == "/predict?x=1"
        seen.add(answer["replica"])
    assert seen == {"a", "b"}
    assert {u["address"] for u in gateway.upstreams()} == {r.address for r in replicas}
    assert requests.get(url(gateway, "/m/iris/staging/predict"), timeout=5).status_code == 404


def test_a_dead_replica_loses_no_request(gateway: Gateway, replicas: list[Replica]) -> None:
    gateway.apply([Endpoint("/m/iris/v1", tuple(r.address for r in replicas))])
    replicas[0].stop()  # its port refuses connections now
    answers = [requests.post(url(gateway, "/m/iris/v1/predict"), json={"x": i}, timeout=10) for i in range(30)]
    assert [a.status_code for a in answers] == [200] * 30
    assert {a.json()["replica"] for a in answers} == {"b"}


def test_the_body_limit_and_the_api_key_are_enforced(gateway: Gateway, replicas: list[Replica]) -> None:
    gateway.apply([Endpoint("/m/iris/v1", (replicas[0].address,), api_key=KEY, max_body_bytes=1024)])
    assert requests.get(url(gateway, "/m/iris/v1/health"), timeout=5).status_code == 401
    assert requests.get(url(gateway, "/m/iris/v1/health"), headers={"X-Api-Key": KEY + "x"},
                        timeout=5).status_code == 401
    ok = requests.get(url(gateway, "/m/iris/v1/health"), headers={"X-Api-Key": KEY}, timeout=5)
    assert ok.status_code == 200 and ok.json()["replica"] == "a"
    big = requests.post(url(gateway, "/m/iris/v1/predict"), data=b"x" * 4096, headers={"X-Api-Key": KEY}, timeout=5)
    assert big.status_code == 413


def test_no_replica_is_a_503_with_retry_after(gateway: Gateway) -> None:
    gateway.apply([Endpoint("/m/iris/production", (), retry_after_s=3)])
    resp = requests.get(url(gateway, "/m/iris/production/predict"), timeout=5)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "3"
    assert resp.json()["error"]["code"] == "unavailable"


def test_routes_change_without_a_restart_and_an_unchanged_set_is_not_sent(gateway: Gateway,
                                                                          replicas: list[Replica]) -> None:
    assert gateway.process is not None
    pid = gateway.process.pid
    gateway.apply([Endpoint("/m/iris/v1", (replicas[0].address,))])
    assert not gateway.apply([Endpoint("/m/iris/v1", (replicas[0].address,))])
    # the longer prefix wins whatever the order given
    assert gateway.apply([Endpoint("/m/iris", (replicas[0].address,)), Endpoint("/m/iris/v2", (replicas[1].address,))])
    assert requests.get(url(gateway, "/m/iris/v2/x"), timeout=5).json() == {"replica": "b", "path": "/x"}
    assert requests.get(url(gateway, "/m/iris/v1/x"), timeout=5).json()["replica"] == "a"
    gateway.apply([])
    assert requests.get(url(gateway, "/m/iris/v2/x"), timeout=5).status_code == 404
    assert gateway.process.pid == pid and gateway.process.poll() is None


@pytest.mark.parametrize("bad", [
    {"prefix": "no-slash", "upstreams": ()},
    {"prefix": "/m/../etc", "upstreams": ()},
    {"prefix": "/m/iris/", "upstreams": ()},
    {"prefix": "/m/iris", "upstreams": ("not an address",)},
    {"prefix": "/m/iris", "upstreams": (), "api_key": "short"},
    {"prefix": "/m/iris", "upstreams": (), "api_key": "*" * 30},
])
def test_bad_endpoints_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(GatewayError):
        Endpoint(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 1, 9, 10, 1024, 999, 67108864, 1000000])
def test_the_length_pattern_matches_exactly_the_larger_numbers(n: int) -> None:
    import re

    from miaas.gateway import greater_than

    pattern = re.compile(greater_than(n))
    for k in [*range(0, 2100), n - 1, n, n + 1, n * 10, 10 ** len(str(n))]:
        if k >= 0:
            assert bool(pattern.match(str(k))) == (k > n), (n, k)
    assert pattern.match("00" + str(n + 1)) and not pattern.match("00" + str(n))


def test_a_body_of_unknown_length_is_refused(gateway: Gateway, replicas: list[Replica]) -> None:
    gateway.apply([Endpoint("/m/iris/v1", (replicas[0].address,), max_body_bytes=1024)])
    chunked = requests.post(url(gateway, "/m/iris/v1/predict"), data=iter([b"x" * 10, b"y" * 10]), timeout=5)
    assert chunked.status_code == 411
    at_limit = requests.post(url(gateway, "/m/iris/v1/predict"), data=b"x" * 1024, timeout=5)
    assert at_limit.status_code == 200
