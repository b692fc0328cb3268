"""The cluster file of bootstrap.sh: every problem reported at once, each naming its line or host; rendering is
deterministic and scoped (a service's setting changes that service's files only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from miaas.installer import render
from miaas.installer.config import ConfigError, load
from miaas.installer.render import Inputs

GOOD = """\
# three machines
SSH_USER=root
HOST_infra=10.0.0.1
ROLES_infra=broker,database,service-registry,model-registry,portal
HOST_ctl=10.0.0.2
ROLES_ctl=controller
export HOST_worker_1="10.0.0.3"
ROLES_worker_1=agent
AGENT_RUNTIMES='["process"]'
CONTROLLER_LOST_AFTER_S=20   # seconds
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cluster.env"
    p.write_text(text)
    return p


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    return info.value.problems


def test_a_good_file_gives_hosts_roles_and_settings(tmp_path: Path) -> None:
    c = load(write(tmp_path, GOOD))
    assert list(c.hosts) == ["infra", "ctl", "worker_1"]
    assert c.hosts["worker_1"].address == "10.0.0.3" and c.hosts["worker_1"].roles == ("agent",)
    assert c.settings == {"AGENT_RUNTIMES": '["process"]', "CONTROLLER_LOST_AFTER_S": "20"}
    assert c.ssh_known_hosts is None and c.ports["portal"] == 8080


def test_every_problem_is_reported_at_once_naming_its_line_or_host(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
HOST_a=10.0.0.1
ROLES_a=broker,databse
HOST_b=10.0.0.1
ROLES_b=agent
HOST_c=not an address
ROLES_c=agent
ROLES_ghost=agent
this is not a setting
AGENT_PORT_RANGE=1-2
AGENT_PORT_RANGE=3-4
CONTROLLER_HOST=10.0.0.9
FRONTEND_ADMIN_PASSWORD=changeme
AGNET_RUNTIMES=x
TOKEN=$(cat /etc/shadow)
SSH_KEY=/nonexistent/key
""")
    text = "\n".join(found)
    assert "line 2: host a: unknown role 'databse'" in text
    assert "line 3: host b: address 10.0.0.1 is host a's too" in text
    assert "line 5: host c: 'not an address' is not an IP address or DNS name" in text
    assert "line 7: ROLES_ghost names no host" in text
    assert "line 8: not KEY=VALUE" in text
    assert "line 10: AGENT_PORT_RANGE is set twice (first on line 9)" in text
    assert "line 11: CONTROLLER_HOST is set by the installer" in text
    assert "line 12: FRONTEND_ADMIN_PASSWORD is a placeholder" in text
    assert "line 13: unknown setting AGNET_RUNTIMES" in text
    assert "line 14: TOKEN: command substitution is not supported" in text
    assert "SSH_KEY /nonexistent/key is not a file" in text
    for role in ("database", "service-registry", "model-registry", "controller", "portal"):
        assert f"no host has the role {role}" in text


def test_too_many_hosts_for_a_role_is_refused(tmp_path: Path) -> None:
    text = GOOD + "HOST_x=10.0.0.4\nROLES_x=controller\nHOST_y=10.0.0.5\nROLES_y=controller,broker\n"
    found = problems(tmp_path, text)
    assert "role controller is on 3 hosts (ctl, x, y); at most 2" in found
    assert "role broker is on 2 hosts (infra, y); at most 1" in found


def test_a_known_hosts_file_that_is_missing_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD + "SSH_KNOWN_HOSTS=missing_known_hosts\n")
    assert any("SSH_KNOWN_HOSTS" in p and "is not a file" in p for p in found)


def inputs(**tokens: str) -> Inputs:
    return Inputs(release_python="/opt/miaas/releases/abc/venv/bin/python", ca_public=b"ca", ca_key=b"key",
                  credentials={s: s.encode() for s in ("service-registry", "model-registry", "controller",
                                                       "frontend")},
                  secrets={"FRONTEND_SECRET_KEY": "k" * 64, "FRONTEND_ADMIN_PASSWORD": "p" * 20,
                           **{f"PG_{u.upper()}_PASSWORD": "pw" for u in render.DB_USERS.values()}},
                  join_tokens=tokens, supervisor_source=b"#!")


def files_of(plans: dict[str, render.HostPlan]) -> dict[str, bytes]:
    out = {}
    for name, p in plans.items():
        for f in [*p.common, *(f for u in p.units for f in p.unit_files(u))]:
            out[f"{name}:{f.path}"] = f.content
    return out


def test_rendering_is_deterministic_and_a_setting_changes_only_its_service(tmp_path: Path) -> None:
    c = load(write(tmp_path, GOOD))
    first = files_of(render.plan(c, inputs(worker_1="tok")))
    assert first == files_of(render.plan(c, inputs(worker_1="tok")))
    c2 = load(write(tmp_path, GOOD.replace("CONTROLLER_LOST_AFTER_S=20", "CONTROLLER_LOST_AFTER_S=25")))
    second = files_of(render.plan(c2, inputs(worker_1="tok")))
    assert sorted(k for k in first if first[k] != second[k]) == ["ctl:/etc/miaas/env/controller.env"]
    # the env file holds the setting; every unit runs the release's interpreter, so a new release restarts all
    assert b"CONTROLLER_LOST_AFTER_S=25" in second["ctl:/etc/miaas/env/controller.env"]
    assert b"/opt/miaas/releases/abc/venv/bin/python" in first["worker_1:/etc/miaas/units/agent.json"]


def test_secrets_reach_only_the_services_that_need_them(tmp_path: Path) -> None:
    c = load(write(tmp_path, GOOD))
    files = files_of(render.plan(c, inputs(worker_1="tok")))
    agent_env = files["worker_1:/etc/miaas/env/agent.env"].decode()
    assert "FRONTEND_" not in agent_env and "PASSWORD" not in agent_env and "ca-key" not in agent_env
    assert "AGENT_JOIN_TOKEN=tok" in agent_env and "AGENT_MODEL_FILES=http" in agent_env
    assert not any(k.endswith("ca-key.json") for k in files if not k.startswith("ctl:"))
    plan = render.plan(c, inputs())
    modes = {f.path: f.mode for u in plan["ctl"].units for f in plan["ctl"].unit_files(u)}
    assert modes["/etc/miaas/pki/ca-key.json"] == 0o600 and modes["/etc/miaas/env/controller.env"] == 0o600
    hba = next(f for f in plan["infra"].files["postgresql"] if f.path.endswith("pg_hba.conf")).content.decode()
    assert "host miaas_controller miaas_controller 10.0.0.2/32 scram-sha-256" in hba
    assert "0.0.0.0" not in hba and "trust" not in hba


def test_with_an_nfs_host_the_store_is_exported_and_mounted_where_it_is_used(tmp_path: Path) -> None:
    c = load(write(tmp_path, GOOD + "HOST_files=10.0.0.5\nROLES_files=nfs\n"))
    plan = render.plan(c, inputs(worker_1="tok"))
    assert plan["files"].nfs == [{"action": "nfs", "side": "server", "store": render.NFS_STORE,
                                  "clients": ["10.0.0.1", "10.0.0.3"], "script": f"{render.SCRIPTS}/nfs-server.sh"}]
    assert [s["mode"] for s in plan["infra"].nfs] == ["rw"] and [s["mode"] for s in plan["worker_1"].nfs] == ["ro"]
    assert plan["ctl"].nfs == []
    agent_env = files_of(plan)["worker_1:/etc/miaas/env/agent.env"].decode()
    assert f"MODEL_STORE={render.NFS_STORE}" in agent_env and "AGENT_MODEL_FILES=auto" in agent_env
    # without one, the registry keeps the store on its own disk and agents pull over HTTP
    plain = files_of(render.plan(load(write(tmp_path, GOOD)), inputs()))
    assert f"MODEL_STORE={render.MODEL_STORE}" in plain["infra:/etc/miaas/env/model-registry.env"].decode()
