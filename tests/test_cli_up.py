"""`miaas up` (what `make up` runs): prints the portal and login when ready; Ctrl-C leaves nothing running."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

pytestmark = pytest.mark.e2e


def test_up_prints_the_portal_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    # given `miaas up` started in a fresh state folder
    proc = subprocess.Popen(
        [sys.executable, "-m", "miaas.cli", "up", "--state-dir", str(tmp_path / "state"), "--free-ports"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("Press Ctrl-C"):
                break
        output = "\n".join(lines)
        assert "MIaaS is ready" in output, output
        portal = next(ln.split()[-1] for ln in lines if ln.strip().startswith("portal:"))
        password = next(ln.split()[-1] for ln in lines if ln.strip().startswith("login:"))
        children = psutil.Process(proc.pid).children(recursive=True)
        # when the portal is asked for its login page and the admin logs in
        assert requests.get(f"{portal}/health", timeout=5).status_code == 200
        session = requests.Session()
        page = session.get(f"{portal}/login", timeout=5)
        assert page.status_code == 200
        assert len(password) >= 12
    finally:
        # when Ctrl-C arrives
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    # then it says so and every process it started is gone
    assert proc.returncode == 0, rest
    assert "nothing is left running" in rest
    time.sleep(0.2)
    alive = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], alive
