"""bootstrap.sh refuses before it changes anything: a host that does not answer, a port another program holds,
a host key that is not the one on record; each error names the host. Two namespace hosts, nothing installed."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from miaas.testhosts import NetnsHosts, missing_tools

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]
ROLES = {"h1": "broker,database,service-registry,model-registry,portal", "h2": "controller,agent"}


@pytest.fixture(scope="module")
def hosts() -> Iterator[NetnsHosts]:
    missing = missing_tools()
    if missing:
        pytest.skip("cannot make test hosts here: missing " + ", ".join(missing))
    h = NetnsHosts(count=2, net=232).setup()
    try:
        yield h
    finally:
        h.teardown()


def bootstrap(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "bootstrap" / "bootstrap.sh"), str(path), *args],
                          capture_output=True, text=True, timeout=300)


def untouched(hosts: NetnsHosts) -> bool:
    return all(not any((h.root / d).iterdir()) for h in hosts.hosts.values() for d in ("etc-miaas", "opt-miaas"))


def test_a_host_that_does_not_answer_is_named_and_nothing_is_changed(hosts: NetnsHosts, tmp_path: Path) -> None:
    path = hosts.cluster_file(tmp_path / "cluster.env", ROLES)
    hosts.stop("h2")
    try:
        done = bootstrap(path)
    finally:
        hosts.restart("h2")
    assert done.returncode == 1
    assert "h2 (10.232.0.12): SSH failed: connection refused" in done.stderr, done.stderr
    assert "h1" not in done.stderr.replace(str(path), "")
    assert untouched(hosts)


def test_a_port_held_by_another_program_is_named_and_nothing_is_changed(hosts: NetnsHosts, tmp_path: Path) -> None:
    path = hosts.cluster_file(tmp_path / "cluster.env", ROLES)
    squatter = subprocess.Popen(["ip", "netns", "exec", hosts.hosts["h1"].netns, "python3", "-c",
                                 "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 8500)); s.listen();"
                                 " print('up', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "up"
        done = bootstrap(path)
    finally:
        squatter.kill()
        squatter.wait()
        assert squatter.stdout is not None
        squatter.stdout.close()
    assert done.returncode == 1
    assert f"h1 (10.232.0.11): port 8500 (service-registry) is taken by pid {squatter.pid}" in done.stderr, \
        done.stderr
    assert untouched(hosts)


def test_a_host_key_not_on_record_is_refused(hosts: NetnsHosts, tmp_path: Path) -> None:
    # given a known_hosts file from the operator that records another key for h1
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"{hosts.hosts['h1'].address} {other.with_suffix('.pub').read_text()}")
    path = hosts.cluster_file(tmp_path / "cluster.env", ROLES, {"SSH_KNOWN_HOSTS": str(known)})
    done = bootstrap(path)
    assert done.returncode == 1
    assert "h1 (10.232.0.11): SSH failed: its host key does not match the known_hosts file" in done.stderr, \
        done.stderr
    # and h2, which the file does not list at all, is refused too (never accepted silently)
    assert "h2 (10.232.0.12): SSH failed" in done.stderr
    assert untouched(hosts)


def test_check_says_what_it_would_do_and_changes_nothing(hosts: NetnsHosts, tmp_path: Path) -> None:
    path = hosts.cluster_file(tmp_path / "cluster.env", ROLES)
    done = bootstrap(path, "--check")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "h1: software: would change release" in done.stdout, done.stdout
    assert "would start broker, postgresql" in done.stdout
    assert "run without --check to make them" in done.stdout
    assert untouched(hosts)
