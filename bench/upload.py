"""Upload speed: a 1 GiB package (incompressible artifact) through `POST /registry/upload-and-validate`.

Prints the upload's throughput as a ratio to `cp` of the same zip on the same filesystem, measured in the same
run, and the registry process's peak RSS growth while it received, validated and stored the package.
Goal (issue 3): >= 0.5x cp, RSS growth <= 64 MiB. Prints the figures; never fails on them.

The registry runs as a real process (`python -m model_registry`) with the embedded broker, SQLite and a model
store under --dir. The zip stores the artifact (random bytes do not compress) as `miaas pack` would.
Run: .venv/bin/python bench/upload.py [--size-mib 1024] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import psutil
import requests

from embedded_broker.launcher import EmbeddedBroker, free_port
from miaas.client import SignedSession
from miaas.cluster import Pki

MiB = 1 << 20
APP = b"from flask import Flask\napp = Flask(__name__)\n"
META = {"name": "big", "setup_commands": ["pip install -r requirements.txt"], "start_commands": ["python app.py"],
        "ports": {"http": 8080}, "resources": {"cpus": 1, "memory_mb": 512}}


def make_package(folder: Path, size_mib: int) -> Path:
    """A zip with the small files deflated and `model.pth` (random bytes) stored."""
    path = folder / "big.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("meta.json", json.dumps(META), zipfile.ZIP_DEFLATED)
        zf.writestr("app.py", APP, zipfile.ZIP_DEFLATED)
        zf.writestr("requirements.txt", b"flask\n", zipfile.ZIP_DEFLATED)
        with zf.open(zipfile.ZipInfo("model.pth", (2026, 1, 1, 0, 0, 0)), "w", force_zip64=True) as out:
            for _ in range(size_mib):
                out.write(os.urandom(MiB))
    return path


def time_cp(src: Path, folder: Path) -> float:
    dst = folder / "copy.zip"
    os.sync()  # start from clean page cache, like the upload does
    start = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    elapsed = time.perf_counter() - start
    dst.unlink()
    return elapsed


class PeakRss(threading.Thread):
    """Samples a process's RSS every few milliseconds; `peak` is the highest seen."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.baseline = self.peak = self.process.memory_info().rss
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak - self.baseline


def start_registry(folder: Path, bootstrap: str, pki: Pki) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    verbose = bool(os.environ.get("MIAAS_LOG_LEVEL"))  # set it (e.g. info) to see the registry's timings
    env = {**os.environ, "MIAAS_CA_FILE": str(pki.ca_file),
           "MODEL_REGISTRY_CREDENTIAL_FILE": str(pki.credentials["model-registry"]), "MIAAS_KAFKA_BOOTSTRAP": bootstrap,
           "MODEL_REGISTRY_PORT": str(port), "MODEL_STORE": str(folder / "store"),
           "MODEL_REGISTRY_DATABASE_URL": f"sqlite:///{folder / 'registry.db'}",
           "MIAAS_LOG_LEVEL": os.environ.get("MIAAS_LOG_LEVEL", "warning")}
    env.pop("MIAAS_SERVICE_REGISTRY_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "model_registry"], env=env, stdout=subprocess.DEVNULL,
                            stderr=None if verbose else subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=1).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the model registry did not start")


class MultipartBody:
    """A multipart body read from its parts as it is sent, with a known length (so no chunked encoding)."""

    def __init__(self, head: bytes, package: Path, tail: bytes) -> None:
        self.length = len(head) + package.stat().st_size + len(tail)
        self._parts = [head, tail]
        self._file = open(package, "rb")  # noqa: SIM115 - closed when read to the end
        self._head_sent = False

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = -1) -> bytes:
        if not self._head_sent:
            self._head_sent = True
            return self._parts[0]
        if not self._file.closed:
            chunk = self._file.read(4 * MiB if size < 0 else max(size, 4 * MiB))
            if chunk:
                return chunk
            self._file.close()
        tail, self._parts[1] = self._parts[1], b""
        return tail


def upload(url: str, operator: requests.Session, package: Path, name: str) -> float:
    """One upload as a streamed multipart body; returns its seconds."""
    boundary = secrets.token_hex(16)
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model_name\"\r\n\r\n{name}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.zip\"\r\n"
            "Content-Type: application/zip\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    body = MultipartBody(head, package, tail)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(len(body))}
    start = time.perf_counter()  # streamed, so signed as UNSIGNED-PAYLOAD (only the upload route accepts that)
    response = operator.post(url + "/registry/upload-and-validate", data=body, headers=headers, timeout=600)
    elapsed = time.perf_counter() - start
    if response.status_code != 201:
        raise SystemExit(f"upload failed: {response.status_code} {response.text[:500]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the artifact (default 1024 = 1 GiB)")
    parser.add_argument("--dir", type=Path, default=None, help="where the zip, the copy and the store go")
    parser.add_argument("--runs", type=int, default=2, help="uploads (and cp runs) to take the median of")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="miaas-bench-upload-", dir=args.dir))
    pki = Pki.ensure(folder / "pki")
    operator = SignedSession(pki.admin())
    try:
        package = make_package(folder, args.size_mib)
        size = package.stat().st_size
        with EmbeddedBroker(log_file=folder / "tansu.log") as broker:
            proc, url = start_registry(folder, broker.bootstrap, pki)
            try:
                cps, uploads, growth = [], [], []
                for run in range(args.runs):
                    cps.append(time_cp(package, folder))
                    os.sync()
                    sampler = PeakRss(proc.pid)
                    sampler.start()
                    uploads.append(upload(url, operator, package, f"big-{run}"))
                    growth.append(sampler.stop())
                    cps.append(time_cp(package, folder))
            finally:
                proc.terminate()
                proc.wait(30)
        cp_s, up_s = statistics.median(cps), statistics.median(uploads)
        print(f"package: {size / MiB:.0f} MiB zip ({args.size_mib} MiB stored artifact), {args.runs} runs, "
              f"store on {folder}")
        print(f"cp:      {cp_s:6.2f} s  {size / MiB / cp_s:7.0f} MiB/s  (median of {len(cps)})")
        print(f"upload:  {up_s:6.2f} s  {size / MiB / up_s:7.0f} MiB/s  (median of {len(uploads)}: "
              + ", ".join(f"{u:.2f}" for u in uploads) + ")")
        print(f"ratio:   {cp_s / up_s:.2f}x cp   (goal >= 0.5x)")
        print(f"registry peak RSS growth: {max(growth) / MiB:.1f} MiB (goal <= 64 MiB; per run: "
              + ", ".join(f"{g / MiB:.1f}" for g in growth) + ")")
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(folder)], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
