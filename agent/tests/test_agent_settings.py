"""Agent settings: the port range is validated, unknown runtimes are a configuration error."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agent.runtimes import build_runtimes
from agent.settings import AgentSettings
from miaas.testing import Pki


def test_port_range_is_parsed(pki: Pki) -> None:
    assert AgentSettings(ca_file=pki.ca_file, port_range="21000 - 21010").port_bounds == (21000, 21010)


@pytest.mark.parametrize("bad", ["20000", "b-c", "30000-20000", "80-90", "60000-70000"])
def test_a_bad_port_range_is_refused(pki: Pki, bad: str) -> None:
    with pytest.raises(ValidationError, match="port range"):
        AgentSettings(ca_file=pki.ca_file, port_range=bad)


def test_an_unknown_runtime_is_a_configuration_error(pki: Pki) -> None:
    with pytest.raises(ValueError, match="warp-drive"):
        build_runtimes(AgentSettings(ca_file=pki.ca_file, runtimes=["process", "warp-drive"]))


def test_the_agent_id_defaults_to_the_host_name(pki: Pki) -> None:
    assert AgentSettings(ca_file=pki.ca_file).agent_id.startswith("agent-")


def test_the_vagrant_runtime_is_built_from_settings(pki: Pki, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = AgentSettings(ca_file=pki.ca_file, runtimes=["process", "vagrant"], state_dir=tmp_path,
                             vagrant_acceleration="tcg", vagrant_nfs_server="10.1.2.3", vagrant_min_memory_mb=1024)
    runtimes = build_runtimes(settings)
    assert sorted(runtimes) == ["process", "vagrant"]
    vagrant = runtimes["vagrant"]
    assert vagrant.config.acceleration == "tcg"  # type: ignore[attr-defined]
    assert vagrant.config.nfs_server == "10.1.2.3"  # type: ignore[attr-defined]
    assert vagrant.config.min_memory_mb == 1024  # type: ignore[attr-defined]
    assert vagrant.recover() == []  # type: ignore[attr-defined]  # an empty state folder holds no VM


def test_the_model_store_is_the_cluster_wide_variable(pki: Pki, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MODEL_STORE", str(tmp_path / "nfs"))
    assert AgentSettings(ca_file=pki.ca_file).model_store == tmp_path / "nfs"


def test_an_unknown_acceleration_is_refused(pki: Pki) -> None:
    with pytest.raises(ValidationError, match="vagrant_acceleration"):
        AgentSettings(ca_file=pki.ca_file, vagrant_acceleration="hvf")  # type: ignore[arg-type]
