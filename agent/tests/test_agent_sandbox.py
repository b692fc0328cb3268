"""The process runtime's sandbox, for real: bubblewrap, iptables, processes and sockets.

A hostile model (hostile_model.py) is deployed through the agent's HTTP API; it tries to read every process's
environment, its own, the agent's state folder, settings and `.env`, the agent's credential file and the CA key,
another model's files, to write where it should not, and to connect to a listening "control plane" port, to the
agent and to the broker. Everything is refused while it still serves its predictions on its port.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

import agent as agent_package
from agent.app import parts
from agent.credential import CredentialHolder
from agent.errors import ProvisionFailed
from agent.firewall import Firewall, ipv6_enabled, parse_endpoint
from agent.runtimes.base import DeploymentSpec
from agent.runtimes.process import ProcessRuntime
from agent.runtimes.sandbox import SYSTEM_PATH, BwrapSandbox, SandboxConfig, SandboxUnavailable, processes_of
from agent.runtimes.venvs import VenvCache, make_readable
from agent.settings import AgentSettings
from miaas.identity import AGENT, CONTROLLER
from miaas.schemas import PackageMeta
from miaas.testing import Pki

HOSTILE = Path(__file__).with_name("hostile_model.py").read_text()
SANDBOX_VARIABLES = {
    "PATH", "VIRTUAL_ENV", "HOME", "USER", "LOGNAME", "TMPDIR", "LANG", "PORT", "MIAAS_DEPLOYMENT_ID",
    "MIAAS_MODEL_ID", "MIAAS_MODEL_VERSION", "MIAAS_MODEL_DIR", "MIAAS_WORKDIR", "PYTHONUNBUFFERED",
    "PYTHONPYCACHEPREFIX", "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_NO_INPUT",
    "PWD", "SHLVL", "_",  # bash's own
}


class Listener:
    """A real listening TCP port: what a control-plane service looks like to a model."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.host, self.port = host, int(self.sock.getsockname()[1])

    def accepted(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listeners() -> Iterator[dict[str, Listener]]:
    loopback6 = "::1" if ipv6_enabled() else "127.0.0.1"  # a host without IPv6 checks IPv4 twice
    made = {"control": Listener("127.0.0.1"), "control6": Listener(loopback6), "other": Listener("127.0.0.1")}
    yield made
    for listener in made.values():
        listener.close()


def add_hostile(store: Any, model_id: str) -> Path:
    folder: Path = store.add(model_id, start=["python hostile_model.py"],
                             setup=["pip install -r requirements.txt", "echo setup ran as $(id -u) in $(pwd)"])
    (folder / "hostile_model.py").write_text(HOSTILE)
    return folder


def deploy(
    http: requests.Session, agent_url: str, deployment_id: str, model_id: str, eventually: Any
) -> dict[str, Any]:
    created = http.post(f"{agent_url}/create-vm", json={"deployment_id": deployment_id, "model_id": model_id,
                                                         "version": 1}, timeout=10)
    assert created.status_code == 202, created.text
    return eventually(  # type: ignore[no-any-return]
        lambda: (d := http.get(f"{agent_url}/deployments/{deployment_id}", timeout=5).json())["status"] == "running"
        and d, 60, f"{deployment_id} running",
    )


def probe(url: str, targets: dict[str, Any]) -> dict[str, Any]:
    answer = requests.post(f"{url}/probe", json=targets, timeout=60)
    assert answer.status_code == 200
    return answer.json()  # type: ignore[no-any-return]


def iptables(*args: str, binary: str = "iptables") -> str:
    return subprocess.run([binary, "-w", *args], check=True, capture_output=True, text=True).stdout


@dataclass(frozen=True)
class AgentSecrets:
    """What the agent holds that no model may see: a secret and a join token in its environment and `.env`."""

    secret: str
    join_token: str


@pytest.fixture
def agent_secret(monkeypatch: pytest.MonkeyPatch, pki: Pki, workdir: Path) -> AgentSecrets:
    """A secret and a join token in the agent's environment and in the `.env` of its working folder, as in
    production."""
    secret = "agent-secret-" + secrets.token_hex(16)
    join_token = pki.join_token()
    monkeypatch.setenv("AGENT_JOIN_TOKEN", join_token)
    monkeypatch.setenv("MIAAS_TEST_AGENT_SECRET", secret)
    cwd = workdir / "agent-cwd"
    cwd.mkdir()
    (cwd / ".env").write_text(f"AGENT_JOIN_TOKEN={join_token}\nMIAAS_TEST_AGENT_SECRET={secret}\n")
    monkeypatch.chdir(cwd)
    return AgentSecrets(secret, join_token)


def test_a_hostile_model_sees_nothing_of_the_agent_and_reaches_no_control_plane(  # type: ignore[no-untyped-def]
    make_agent, settings: AgentSettings, store, serve, pki: Pki, signed_session, agent_secret: AgentSecrets,
    broker: str, listeners: dict[str, Listener], eventually,
) -> None:
    # given an agent with secrets in its environment and .env, its own credential in its file (read at start),
    # serving over HTTP, a real broker, a listening control-plane port, and two hostile models deployed on it
    add_hostile(store, "hostile")
    other_folder = add_hostile(store, "other")
    agent_app = make_agent(settings, credential=CredentialHolder())
    agent = serve(agent_app)
    credential_file = settings.credential_path
    own = pki.credential(settings.agent_id, AGENT, url=agent.url)
    own.save(credential_file)
    parts(agent_app).start_metrics(agent.url)
    assert parts(agent_app).credential().cert.serial == own.cert.serial
    assert stat.S_IMODE(credential_file.stat().st_mode) == 0o600
    private_key = json.loads(credential_file.read_text())["private_key"]
    http = signed_session(CONTROLLER)
    mine = deploy(http, agent.url, "dep-h1", "hostile", eventually)
    theirs = deploy(http, agent.url, "dep-h2", "other", eventually)
    broker_host, broker_port = broker.split(",")[0].rsplit(":", 1)
    state = settings.state_dir.absolute()
    venv_root = settings.venv_cache_dir.absolute()
    agent_code = Path(agent_package.__file__).resolve().parents[2]

    # when the first one probes what it can reach
    found = probe(mine["url"], {
        "paths": [str(state), str(state / "dep-h1" / "model.log"), str(state / "dep-h2"), str(Path.cwd() / ".env"),
                  str(Path.cwd()), str(agent_code), str(agent_code / ".env"), str(other_folder),
                  str(other_folder / "hostile_model.py"), str(settings.sandbox_lock_dir), "/etc/shadow", "/home",
                  f"/proc/{os.getpid()}/environ", str(venv_root), str(credential_file), str(pki.ca_key_file),
                  str(pki.root)],
        "connect": [["127.0.0.1", listeners["control"].port],
                    [listeners["control6"].host, listeners["control6"].port],
                    ["127.0.0.1", agent.port], [broker_host, int(broker_port)], ["127.0.0.1", theirs["port"]],
                    ["127.0.0.1", mine["port"]]],
        "writes": ["/app/planted.py", "/usr/planted", "/work/scratch", "/tmp/scratch"],
        "kill": [1],
    })

    # then the agent's secrets, its join token and its private key appear nowhere in what it could read
    dump = json.dumps(found)
    assert agent_secret.secret not in dump and agent_secret.join_token not in dump and private_key not in dump
    assert "AGENT_JOIN_TOKEN" not in found["env"] and "AGENT_CREDENTIAL_FILE" not in found["env"]
    # and its own environment is the sandbox's, built from nothing
    assert set(found["env"]) - {k for k in found["env"] if k.startswith("MIAAS_PORT_")} <= SANDBOX_VARIABLES
    assert found["env"]["HOME"] == "/work" and found["env"]["MIAAS_MODEL_DIR"] == "/app"
    # and it runs as a uid of its own, not the agent's, with no supplementary group
    assert found["uid"] == found["euid"] == found["gid"] != os.getuid()
    assert 61000 <= found["uid"] <= 61999 and 0 not in found["groups"]
    # and /proc shows only the sandbox's own processes (bwrap's init, bash, the model), none of the agent's
    assert 1 <= len(found["procs"]) <= 4
    cmdlines = " ".join(p["cmdline"].get("data", "") for p in found["procs"].values())
    assert "pytest" not in cmdlines and "hostile_model.py" in cmdlines
    seen = cmdlines + json.dumps(found["env"])
    assert str(settings.state_dir) not in seen and str(store.root) not in seen  # not even a host path
    assert found["procs"]["1"]["environ"]["result"] == "denied"  # bwrap's init runs as root
    # (root runs bwrap and setpriv by their absolute paths, never found in the model's PATH, its venv first)
    init = found["procs"]["1"]["cmdline"]["data"].split("\0")
    assert init[0] == shutil.which("bwrap", path=SYSTEM_PATH) and init[1] == "--args"
    assert init[init.index("--") + 1] == shutil.which("setpriv", path=SYSTEM_PATH)
    # and nothing of the agent's folders, settings, credential, the CA's key or another model is there
    files = found["files"]
    for path in [state, state / "dep-h1" / "model.log", state / "dep-h2", Path.cwd() / ".env", Path.cwd(),
                 agent_code, agent_code / ".env", other_folder, other_folder / "hostile_model.py",
                 settings.sandbox_lock_dir, "/etc/shadow", "/home", f"/proc/{os.getpid()}/environ",
                 credential_file, pki.ca_key_file, pki.root]:
        assert files[str(path)]["result"] == "absent", (path, files[str(path)])
    assert files[str(venv_root)] == {"result": "listed", "entries": [".builds"]}  # its own venv only
    # and it connects to no control-plane port, no agent, no broker, no other model; only to its own port
    connect = found["connect"]
    assert connect[f"127.0.0.1:{listeners['control'].port}"] == "refused"
    assert connect[f"{listeners['control6'].host}:{listeners['control6'].port}"] == "refused"
    assert connect[f"127.0.0.1:{agent.port}"] == "refused"
    assert connect[f"{broker_host}:{broker_port}"] == "refused"
    assert connect[f"127.0.0.1:{theirs['port']}"] == "refused"
    assert connect[f"127.0.0.1:{mine['port']}"] == "connected"
    assert listeners["control"].accepted() == 0 and listeners["control6"].accepted() == 0
    # and it writes only to its own /work and /tmp
    assert found["writes"] == {"/app/planted.py": "refused: EROFS", "/usr/planted": "refused: EROFS",
                               "/work/scratch": "written", "/tmp/scratch": "written"}
    assert found["kill"] == {"1": "refused: EPERM"}

    # and meanwhile both models serve their predictions, to clients and to the agent's health check
    assert requests.get(f"{mine['url']}/predict", timeout=5).json()["prediction"] == 42
    assert requests.get(f"{theirs['url']}/predict", timeout=5).json()["prediction"] == 42
    logs = http.get(f"{agent.url}/deployments/dep-h1/logs", params={"tail": 100}, timeout=5).text
    assert f"setup ran as {found['uid']} in /app" in logs and "sandbox: bwrap as uid" in logs

    # and the two models got different uids, each with its own processes
    their_uid = probe(theirs["url"], {})["uid"]
    assert their_uid != found["uid"] and 61000 <= their_uid <= 61999
    assert processes_of(found["uid"]) and processes_of(their_uid)

    # when the first is stopped, its processes, its uid and its own-port rule are gone
    http.post(f"{agent.url}/stop-vm", json={"deployment_id": "dep-h1"}, timeout=30)
    assert processes_of(found["uid"]) == []
    own_rules = iptables("-S", f"MIAAS-OWN-{settings.sandbox_uid_range}")
    assert f"--uid-owner {found['uid']} " not in own_rules and f"--uid-owner {their_uid} " in own_rules


def test_the_allow_list_opens_outbound_connections_but_never_to_denied_ports(  # type: ignore[no-untyped-def]
    make_agent, settings: AgentSettings, store, serve, signed_session, broker: str,
    listeners: dict[str, Listener], eventually,
) -> None:
    # given an agent (a uid range of its own) that allows models all of loopback, but denies one listener's
    # port, and knows the broker
    allowed, denied = listeners["other"], listeners["control"]
    tuned = settings.model_copy(update={
        "sandbox_uid_range": "62100-62119", "sandbox_allow_outbound": ["127.0.0.1/32"],
        "sandbox_deny_ports": [denied.port], "kafka_bootstrap": broker,
    })
    add_hostile(store, "hostile")
    agent = serve(make_agent(tuned))
    http = signed_session(CONTROLLER)
    model = deploy(http, agent.url, "dep-allow", "hostile", eventually)
    broker_host, broker_port = broker.split(",")[0].rsplit(":", 1)

    # when the model connects to each
    found = probe(model["url"], {"connect": [["127.0.0.1", allowed.port], ["127.0.0.1", denied.port],
                                             [broker_host, int(broker_port)]]})

    # then the allow-listed one answers, the denied port and the broker (derived from the agent's settings) do not
    assert 62100 <= found["uid"] <= 62119
    assert found["connect"] == {f"127.0.0.1:{allowed.port}": "connected", f"127.0.0.1:{denied.port}": "refused",
                                f"{broker_host}:{broker_port}": "refused"}
    assert allowed.accepted() == 1 and denied.accepted() == 0


def test_the_rules_are_installed_once_and_removed(tmp_path: Path) -> None:
    # given a firewall of a uid range of its own
    firewall = Firewall(62200, 62209, allow=[parse_endpoint("10.9.8.7:443"), parse_endpoint("udp:[fd00::53]:53")],
                        deny_ports=[8500, 9092])
    binaries = ["iptables", "ip6tables"] if firewall.ipv6 else ["iptables"]
    try:
        # when it is installed twice, with one deployment's own ports
        firewall.install()
        firewall.allow_own_ports(62201, [20001, 20002], "dep-x")
        firewall.install()

        # then OUTPUT jumps once, first, into a chain that rejects by default; the deployment's rule survived
        for binary in binaries:
            output = iptables("-S", "OUTPUT", binary=binary).splitlines()
            jumps = [line for line in output if "MIAAS-MODELS-62200-62209" in line]
            assert jumps == ["-A OUTPUT -m owner --uid-owner 62200-62209 -j MIAAS-MODELS-62200-62209"]
            assert output.index(jumps[0]) == next(i for i, line in enumerate(output) if line.startswith("-A"))
            chain = iptables("-S", "MIAAS-MODELS-62200-62209", binary=binary).splitlines()
            assert "ESTABLISHED" in chain[1] and chain[-1].endswith("-j REJECT --reject-with "
                                                                      + ("icmp-port-unreachable" if binary == "iptables"
                                                                         else "icmp6-port-unreachable"))
            assert sum("--dport 8500" in line or "--dport 9092" in line for line in chain) == 2
            assert any(("10.9.8.7" if binary == "iptables" else "fd00::53") in line for line in chain)
            assert "--uid-owner 62201" in iptables("-S", "MIAAS-OWN-62200-62209", binary=binary)
        firewall.forget_uid(62201)
        assert "--uid-owner 62201" not in iptables("-S", "MIAAS-OWN-62200-62209")
    finally:
        # when it is removed, nothing of it is left
        firewall.remove()
    for binary in binaries:
        assert "62200-62209" not in iptables("-S", binary=binary)


def spec(tmp_path: Path, deployment_id: str = "dep-s") -> DeploymentSpec:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "requirements.txt").write_text("")
    return DeploymentSpec(deployment_id=deployment_id, model_id="m", version=1, model_path=model,
                          meta=PackageMeta(setup_commands=["true"], start_commands=["sleep 60"]), port=20099,
                          workdir=tmp_path / "work")


def test_without_bubblewrap_models_are_refused_with_the_package_to_install(tmp_path: Path, venv_cache: Path) -> None:
    # given a sandbox whose bwrap is not installed
    runtime = ProcessRuntime(VenvCache(venv_cache), sandbox=BwrapSandbox(SandboxConfig(bwrap="no-such-bwrap")))

    # when a model is started, then it is refused, naming the package
    with pytest.raises(ProvisionFailed, match="apt-get install bubblewrap"):
        runtime.start(spec(tmp_path))
    runtime.stop("dep-s")


def test_rules_that_cannot_be_installed_stop_the_agent_from_starting(tmp_path: Path) -> None:
    # given a sandbox whose iptables is missing
    firewall = Firewall(62300, 62309, ipv6=False, binaries={4: "no-such-iptables"})
    runtime = ProcessRuntime(VenvCache(tmp_path / "venvs"),
                             sandbox=BwrapSandbox(SandboxConfig(uid_range=(62300, 62309)), firewall=firewall))

    # when the runtime is prepared (agent start), then it is a clear error naming the package
    with pytest.raises(SandboxUnavailable, match="apt-get install iptables"):
        runtime.prepare()


def test_uids_are_unique_host_wide_and_freed(tmp_path: Path) -> None:
    # given two sandboxes (two agents of one host) sharing a range of two uids
    from agent.runtimes.sandbox import UidPool

    first, second = UidPool(62400, 62401, tmp_path), UidPool(62400, 62401, tmp_path)

    # when each takes one, then they differ and the range is used up
    a, b = first.acquire("dep-a"), second.acquire("dep-b")
    assert {a.uid, b.uid} == {62400, 62401}
    with pytest.raises(SandboxUnavailable, match="in use"):
        first.acquire("dep-c")
    assert first.any_in_use()
    # and once freed, a uid is handed out again
    a.release()
    d = second.acquire("dep-d")
    assert d.uid == a.uid
    for lease in (b, d):
        lease.release()
    assert not first.any_in_use()


def test_a_venv_built_private_is_made_readable_but_not_writable(tmp_path: Path) -> None:
    # given a tree as mkdtemp and a umask of 077 leave it
    root = tmp_path / "venv"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").write_text("#!/bin/sh\n")
    (root / "lib.py").write_text("x = 1\n")
    os.chmod(root / "bin" / "python", 0o700)
    os.chmod(root / "lib.py", 0o666)
    os.chmod(root / "bin", 0o700)
    os.chmod(root, 0o700)
    (root / "link").symlink_to("/etc/hostname")

    make_readable(root)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.lstat().st_mode)

    assert (mode(root), mode(root / "bin"), mode(root / "bin" / "python"), mode(root / "lib.py")) == (
        0o755, 0o755, 0o755, 0o644)


def test_with_sandbox_none_models_run_as_the_agent_and_it_says_so(  # type: ignore[no-untyped-def]
    make_agent, settings: AgentSettings, store, eventually, pki: Pki, caplog: pytest.LogCaptureFixture,
) -> None:
    # given an agent told not to sandbox
    store.add("tiny")
    app = make_agent(settings.model_copy(update={"sandbox": "none"}))
    client = pki.client(app, CONTROLLER)

    # then it warned at start, and a model runs as the agent's user
    assert any("AGENT_SANDBOX=none" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    client.post("/create-vm", json={"deployment_id": "dep-n", "model_id": "tiny", "version": 1})
    eventually(lambda: client.get("/deployments/dep-n").json["status"] == "running", 60, "dep-n running")
    assert "sandbox: bwrap" not in client.get("/deployments/dep-n/logs?tail=100").text


def test_the_sandbox_setting_is_bwrap_by_default_and_validated(pki: Pki) -> None:
    settings = AgentSettings(ca_file=pki.ca_file, port=8601, kafka_bootstrap="10.0.0.1:9093,b:19092",
                             service_registry_url="http://registry:8555")
    assert settings.sandbox == "bwrap" and settings.sandbox_uid_bounds == (61000, 61999)
    assert {8601, 9093, 19092, 8555, 8500, 8510, 8520, 9092} <= set(settings.sandbox_denied_ports)
    for bad in ({"sandbox": "docker"}, {"sandbox_uid_range": "0-100"}, {"sandbox_uid_range": "61000-65534"},
                {"sandbox_allow_outbound": ["example.com:443"]}, {"sandbox_env": {"BAD NAME": "x"}}):
        with pytest.raises(ValueError):
            AgentSettings(ca_file=pki.ca_file, **bad)
    assert str(parse_endpoint("udp:[fd00::1]:53")) == "udp:[fd00::1/128]:53"
    assert str(parse_endpoint("10.0.0.0/8")) == "tcp:10.0.0.0/8"


def test_the_sandbox_environment_is_built_from_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # given an agent whose environment holds secrets, proxies and pip settings
    from agent.runtimes.sandbox import sandbox_env

    for name, value in {"AGENT_JOIN_TOKEN": "secret-token", "AGENT_CREDENTIAL_FILE": "/var/lib/miaas/credential.json",
                        "AWS_SECRET_ACCESS_KEY": "x", "HOME": "/root",
                        "HTTPS_PROXY": "http://user:pw@proxy:3128", "PIP_INDEX_URL": "https://u:p@index",
                        "LANG": "de_DE.UTF-8", "LD_PRELOAD": "/evil.so"}.items():
        monkeypatch.setenv(name, value)
    base = spec(tmp_path)
    deployment = DeploymentSpec(**{**base.__dict__, "env": {"PORT": "1", "FROM_SPEC": "yes"},
                                   "ports": {"web ui": 20099, "grpc": 20100}})

    # when the environment of a sandboxed command is made, with an operator's extra variable
    env = sandbox_env(deployment, Path("/venvs/abc"), extra={"HTTPS_PROXY": "http://10.0.0.9:3128", "PORT": "2"})

    # then it holds the model's variables only, the runtime's values winning, and nothing of the agent's
    assert env["PATH"].startswith("/venvs/abc/bin:") and env["VIRTUAL_ENV"] == "/venvs/abc"
    assert (env["HOME"], env["PORT"], env["MIAAS_PORT_WEB_UI"], env["MIAAS_PORT_GRPC"]) == ("/work", "20099",
                                                                                          "20099", "20100")
    assert env["LANG"] == "de_DE.UTF-8" and env["FROM_SPEC"] == "yes"
    assert env["HTTPS_PROXY"] == "http://10.0.0.9:3128"
    assert not {"AGENT_JOIN_TOKEN", "AGENT_CREDENTIAL_FILE", "AWS_SECRET_ACCESS_KEY", "PIP_INDEX_URL",
                "LD_PRELOAD"} & set(env)
    assert "secret-token" not in json.dumps(env) and "credential.json" not in json.dumps(env)
