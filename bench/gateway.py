"""Requests through an endpoint (Caddy, `miaas.gateway`) versus straight to the replica: same run, same client,
same model.

The model is a replica of the standard library's ThreadingHTTPServer answering a small JSON prediction (the
slowest part of the chain, as a real model would be). The client is --clients threads, each with one keep-alive
connection (`http.client`), sending POSTs for --seconds; rounds alternate direct and gateway. Prints requests/s
and p50/p99 latency of the best round of each, and the ratios.

Goal (issue 12): through the gateway >= 0.8x the direct throughput and <= 1 ms added at p50. On a 2-core machine
client, proxy and replica share the cores: the figures say what this machine gives, not Caddy's ceiling.
Run: .venv/bin/python bench/gateway.py [--clients 8] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miaas.gateway import Endpoint, Gateway  # noqa: E402

BODY = json.dumps({"features": [5.1, 3.5, 1.4, 0.2]}).encode()


class Model(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real model server
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK stall

    def do_POST(self) -> None:
        features = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["features"]
        out = json.dumps({"predictions": [sum(features)]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load(host: str, port: int, path: str, clients: int, seconds: float) -> tuple[float, list[float], int]:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop = time.monotonic() + seconds

    def connect() -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def client(i: int) -> None:
        conn = connect()
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, BODY, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors[i] += 1
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn.close()
                conn = connect()
                continue
            latencies[i].append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    flat = [x for per in latencies for x in per]
    return len(flat) / took, flat, sum(errors)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) >= 100 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = ThreadingHTTPServer(("127.0.0.1", 0), Model)
    threading.Thread(target=model.serve_forever, daemon=True).start()
    replica = f"127.0.0.1:{model.server_address[1]}"
    with tempfile.TemporaryDirectory(prefix="miaas-bench-gateway-") as tmp:
        g = Gateway(Path(tmp), listen=f"127.0.0.1:{free_port()}", admin=f"127.0.0.1:{free_port()}").start()
        try:
            g.apply([Endpoint("/m/bench/v1", (replica,))])
            gw_host, gw_port = g.listen.rsplit(":", 1)
            load(gw_host, int(gw_port), "/m/bench/v1/predict", args.clients, 1.0)  # warm both paths
            results: dict[str, list[tuple[float, list[float], int]]] = {"direct": [], "gateway": []}
            for r in range(args.rounds):
                results["direct"].append(load("127.0.0.1", model.server_address[1], "/predict", args.clients,
                                              args.seconds))
                results["gateway"].append(load(gw_host, int(gw_port), "/m/bench/v1/predict", args.clients,
                                               args.seconds))
                d, w = results["direct"][-1], results["gateway"][-1]
                print(f"round {r + 1}: direct {d[0]:,.0f} req/s, gateway {w[0]:,.0f} req/s", flush=True)
        finally:
            g.stop()
    model.shutdown()
    best = {k: max(v, key=lambda x: x[0]) for k, v in results.items()}
    print(f"\n{args.clients} clients, {args.seconds:.0f}s per round, best of {args.rounds}")
    for k in ("direct", "gateway"):
        rate, lat, errors = best[k]
        print(f"  {k:8} {rate:9,.0f} req/s   p50 {pct(lat, 50):6.2f} ms   p99 {pct(lat, 99):6.2f} ms   "
              f"errors {errors}")
    (dr, dl, _), (gr, gl, _) = best["direct"], best["gateway"]
    print(f"  gateway/direct throughput {gr / dr:.2f}x (goal >= 0.8x); added at p50 {pct(gl, 50) - pct(dl, 50):+.2f} "
          f"ms (goal <= 1 ms); at p99 {pct(gl, 99) - pct(dl, 99):+.2f} ms")


if __name__ == "__main__":
    main()
