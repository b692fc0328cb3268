"""A hostile model for the sandbox tests: it serves predictions on $PORT like any model, and on POST /probe it
tries, with the targets the test names, what a model must not be able to do; it answers what it could."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def try_read(path: str) -> dict[str, Any]:
    try:
        if os.path.isdir(path):
            return {"result": "listed", "entries": sorted(os.listdir(path))}
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
        return {"result": "read", "data": data.decode("utf-8", "replace")}
    except FileNotFoundError:
        return {"result": "absent"}
    except PermissionError:
        return {"result": "denied"}
    except OSError as exc:
        return {"result": "error", "error": str(exc)}


def try_connect(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=3):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"error: {exc}"


def try_write(path: str) -> str:
    try:
        with open(path, "w") as handle:
            handle.write("written by a model")
        os.unlink(path)
        return "written"
    except OSError as exc:
        return "refused: " + errno.errorcode.get(exc.errno or 0, str(exc.errno))


def try_kill(pid: int) -> str:
    try:
        os.kill(pid, signal.SIGKILL)
        return "killed"
    except OSError as exc:
        return "refused: " + errno.errorcode.get(exc.errno or 0, str(exc.errno))


def probe(targets: dict[str, Any]) -> dict[str, Any]:
    procs = {
        name: {"environ": try_read(f"/proc/{name}/environ"), "cmdline": try_read(f"/proc/{name}/cmdline")}
        for name in os.listdir("/proc") if name.isdigit()
    }
    return {
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "env": dict(os.environ),
        "procs": procs,
        "files": {path: try_read(path) for path in targets.get("paths", [])},
        "connect": {f"{host}:{port}": try_connect(host, port) for host, port in targets.get("connect", [])},
        "writes": {path: try_write(path) for path in targets.get("writes", [])},
        "kill": {str(pid): try_kill(pid) for pid in targets.get("kill", [])},
    }


class Handler(BaseHTTPRequestHandler):
    def send_json(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_json({"model": "hostile", "path": self.path, "prediction": 42})

    def do_POST(self) -> None:  # noqa: N802
        targets = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_json(probe(targets))

    def log_message(self, fmt: str, *args: Any) -> None:
        print("hostile model served", self.path, flush=True)


if __name__ == "__main__":
    port = int(os.environ["PORT"])
    print(f"hostile model listening on {port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
