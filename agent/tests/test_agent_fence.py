"""The controller's fence: an agent accepts commands of the newest leader it has seen and refuses a deposed
controller's (409 stale_leader), across its own restarts; a fence file it cannot trust stops it from starting."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from agent.fence import FENCE_FILE, Fence, FenceFileError, StaleLeader
from agent.settings import AgentSettings
from miaas.identity import CONTROLLER
from miaas.testing import Pki


def stop(client: Any, fence: int | None) -> Any:
    body: dict[str, Any] = {"deployment_id": "dep-f"}
    if fence is not None:
        body["fence"] = fence
    return client.post("/stop-vm", json=body)


def test_a_lower_fence_is_refused_and_the_highest_is_kept_on_disk(tmp_path: Path) -> None:
    # given a fence that accepted the leader of epoch 3
    path = tmp_path / "state" / FENCE_FILE
    fence = Fence(path)
    assert fence.highest is None
    fence.check(None, "a command of a controller before fences")  # nothing seen yet: accepted
    fence.check(3, "create-vm of d")
    assert json.loads(path.read_text()) == {"fence": 3}
    # when the same leader and a newer one command, both are accepted and the newer is remembered
    fence.check(3, "stop-vm of d")
    fence.check(4, "stop-vm of d")
    assert (fence.highest, json.loads(path.read_text())) == (4, {"fence": 4})
    # then the deposed leader's late command is refused, naming both fences and the file
    with pytest.raises(StaleLeader, match=r"fence 3 is lower than 4") as stale:
        fence.check(3, "create-vm of d")
    assert (stale.value.status, stale.value.code, stale.value.details) == (409, "stale_leader",
                                                                          {"fence": 3, "highest": 4})
    assert str(path) in stale.value.message
    # and so is a command without any fence, now that one was seen
    with pytest.raises(StaleLeader, match="carries no fence"):
        fence.check(None, "stop-vm of d")
    # and after a restart (a new Fence on the same file) the refusal stands
    again = Fence(path)
    assert again.highest == 4
    with pytest.raises(StaleLeader):
        again.check(2, "create-vm of d")
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write leaves nothing behind


@pytest.mark.parametrize("content", ["", "{", "[]", '{"fence": "7"}', '{"fence": 0}', '{"fence": -1}',
                                     '{"fence": true}', '{"fence": 1.5}', '{"other": 7}',
                                     f'{{"fence": {2**63}}}'])
def test_a_fence_file_it_cannot_trust_stops_the_agent(tmp_path: Path, content: str) -> None:
    # given a fence file someone else wrote (the agent writes it atomically: never half of one)
    path = tmp_path / FENCE_FILE
    path.write_text(content)
    # then the agent refuses to start rather than forget which controller leads, saying what to do
    with pytest.raises(FenceFileError, match=f"{path}.*remove it"):
        Fence(path)


def test_the_agent_refuses_a_deposed_controllers_commands_across_a_restart(
    make_agent: Callable[..., Flask], settings: AgentSettings, pki: Pki
) -> None:
    # given an agent commanded by the leader of epoch 5 (the stop of a deployment it does not hold: 404)
    agent = make_agent(settings)
    client = pki.client(agent, CONTROLLER)
    assert stop(client, 5).status_code == 404
    # when the controller of epoch 4, deposed, sends its late commands
    late = stop(client, 4)
    create = client.post("/create-vm", json={"deployment_id": "dep-f", "model_id": "tiny", "version": 1,
                                              "runtime": "none-such", "fence": 4})
    unfenced = stop(client, None)
    # then each is refused before it is carried out
    for resp in (late, create, unfenced):
        assert resp.status_code == 409, resp.json
        assert resp.json["error"]["code"] == "stale_leader"
    assert resp.json["error"]["details"] == {"fence": None, "highest": 5}
    # and the leader's own commands still pass the fence (a bad runtime is refused after it, as ever)
    passed = client.post("/create-vm", json={"deployment_id": "dep-f", "model_id": "tiny", "version": 1,
                                              "runtime": "none-such", "fence": 5})
    assert passed.status_code == 400 and passed.json["error"]["code"] == "unknown_runtime", passed.json
    # and after the agent restarts on the same state folder, the fence it saw still holds
    restarted = pki.client(make_agent(settings), CONTROLLER)
    assert stop(restarted, 4).json["error"]["code"] == "stale_leader"
    assert stop(restarted, 6).status_code == 404
    assert json.loads((settings.state_dir / FENCE_FILE).read_text()) == {"fence": 6}


@pytest.mark.parametrize("fence", [0, -1, "one", 1.5, 2**63, [1]])
def test_a_fence_that_is_not_an_epoch_is_a_bad_request(
    client: Any, fence: object, settings: AgentSettings
) -> None:
    resp = client.post("/stop-vm", json={"deployment_id": "dep-f", "fence": fence})
    assert resp.status_code == 400, resp.json
    assert not (settings.state_dir / FENCE_FILE).exists()  # nothing was accepted
