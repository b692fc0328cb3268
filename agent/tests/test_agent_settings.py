"""Agent settings: the port range is validated, unknown runtimes are a configuration error."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agent.runtimes import build_runtimes
from agent.settings import AgentSettings


def test_port_range_is_parsed(service_token: str) -> None:
    assert AgentSettings(service_token=service_token, port_range="21000 - 21010").port_bounds == (21000, 21010)


@pytest.mark.parametrize("bad", ["20000", "b-c", "30000-20000", "80-90", "60000-70000"])
def test_a_bad_port_range_is_refused(service_token: str, bad: str) -> None:
    with pytest.raises(ValidationError, match="port range"):
        AgentSettings(service_token=service_token, port_range=bad)


def test_an_unknown_runtime_is_a_configuration_error(service_token: str) -> None:
    with pytest.raises(ValueError, match="warp-drive"):
        build_runtimes(AgentSettings(service_token=service_token, runtimes=["process", "warp-drive"]))


def test_the_agent_id_defaults_to_the_host_name(service_token: str) -> None:
    assert AgentSettings(service_token=service_token).agent_id.startswith("agent-")
