"""The process runtime on its own: its environment, and a stop that overtakes a start."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ProvisionCancelled
from agent.runtimes.base import DeploymentSpec
from agent.runtimes.process import ProcessRuntime, model_env
from agent.runtimes.venvs import VenvCache
from miaas.schemas import DeploymentStatus, PackageMeta


def spec(tmp_path: Path) -> DeploymentSpec:
    return DeploymentSpec(
        deployment_id="dep-r", model_id="m", version=3, model_path=tmp_path / "model",
        meta=PackageMeta(setup_commands=["true"], start_commands=["python app.py"], ports={"web ui": 8501}),
        port=20001, workdir=tmp_path / "work", env={"EXTRA": "1", "PORT": "1"}, ports={"web ui": 20001},
    )


def test_the_model_environment_is_filtered_and_names_its_ports(tmp_path: Path) -> None:
    agent_env = {"PATH": "/usr/bin", "HOME": "/home/a", "LC_ALL": "C.UTF-8", "HTTPS_PROXY": "http://proxy:3128",
                 "AGENT_JOIN_TOKEN": "secret-token-value", "AGENT_CREDENTIAL_FILE": "/var/lib/agent/credential.json",
                 "AGENT_AGENT_ID": "a", "AWS_SECRET_ACCESS_KEY": "x"}
    env = model_env(spec(tmp_path), Path("/venvs/abc"), agent_env)
    assert env["PATH"] == "/venvs/abc/bin:/usr/bin"
    assert env["VIRTUAL_ENV"] == "/venvs/abc"
    assert env["PORT"] == "20001"  # the runtime's value wins over spec.env
    assert env["MIAAS_PORT_WEB_UI"] == "20001"
    assert (env["MIAAS_DEPLOYMENT_ID"], env["MIAAS_MODEL_ID"], env["MIAAS_MODEL_VERSION"]) == ("dep-r", "m", "3")
    assert env["MIAAS_MODEL_DIR"] == str(tmp_path / "model")
    assert env["MIAAS_WORKDIR"] == str(tmp_path / "work")
    assert (env["HOME"], env["LC_ALL"], env["HTTPS_PROXY"], env["EXTRA"]) == ("/home/a", "C.UTF-8",
                                                                              "http://proxy:3128", "1")
    assert not {"AGENT_JOIN_TOKEN", "AGENT_CREDENTIAL_FILE", "AGENT_AGENT_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)


def test_a_stop_that_overtakes_the_start_cancels_it(tmp_path: Path) -> None:
    runtime = ProcessRuntime(VenvCache(tmp_path / "venvs"))
    runtime.stop("dep-r")
    with pytest.raises(ProvisionCancelled):
        runtime.start(spec(tmp_path))
    assert not (tmp_path / "venvs").exists()
    assert runtime.status("dep-r").status is DeploymentStatus.STOPPED
    assert runtime.logs("dep-r", 10) == []
