"""Log follows cannot hold the agent's worker threads: a maximum duration, a write timeout, a cap on how many."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flask import Flask

from agent.logtail import LogFollower
from agent.settings import AgentSettings
from miaas.identity import CONTROLLER
from miaas.testing import Pki


def test_a_follow_ends_when_its_reader_is_too_slow(tmp_path: Path) -> None:
    # given a log that keeps growing, and a reader that takes 5 s of the clock per line
    log = tmp_path / "model.log"
    log.write_text("")
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds
        with log.open("a") as out:
            out.write("line\nline\n")

    follower = LogFollower([log])
    lines = follower.follow(done=lambda: False, max_s=3600, write_timeout_s=2, poll_s=1, clock=lambda: now[0],
                            sleep=sleep)

    # when it reads
    taken = []
    for line in lines:
        taken.append(line)
        now[0] += 5

    # then the follow ended after the first line that took longer than the write timeout, not after an hour
    assert taken == ["line\n"]
    assert follower.ended == "write_timeout" and now[0] < 10


def test_a_follow_reader_that_keeps_up_is_not_cut(tmp_path: Path) -> None:
    log = tmp_path / "model.log"
    log.write_text("")
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds
        with log.open("a") as out:
            out.write("line\n")

    follower = LogFollower([log])
    taken = list(follower.follow(done=lambda: now[0] >= 20, max_s=3600, write_timeout_s=2, poll_s=1,
                                 check_every_s=1, clock=lambda: now[0], sleep=sleep))
    assert len(taken) >= 19 and follower.ended == "done"


def running(client: Any, store: Any, eventually: Any, deployment_id: str = "dep-l") -> None:
    store.add("tiny")
    client.post("/create-vm", json={"deployment_id": deployment_id, "model_id": "tiny", "version": 1})
    eventually(lambda: client.get(f"/deployments/{deployment_id}").json["status"] == "running", 60,
               f"{deployment_id} running")


def test_a_follow_asked_for_longer_ends_at_the_agents_maximum(  # type: ignore[no-untyped-def]
    make_agent, settings: AgentSettings, store, eventually, pki: Pki
) -> None:
    # given an agent that follows a log for 2 s at most, and a running deployment
    app: Flask = make_agent(settings.model_copy(update={"logs_follow_max_s": 2.0}))
    client = pki.client(app, CONTROLLER)
    running(client, store, eventually)

    # when a client asks to follow it for an hour
    started = time.monotonic()
    followed = client.get("/deployments/dep-l/logs?tail=1&follow=true&max_s=3600", buffered=False)
    text = b"".join(followed.response).decode()
    followed.close()

    # then the stream ended after the agent's maximum, and said so
    assert 2 <= time.monotonic() - started < 10
    assert text.rstrip().endswith("[agent] log follow ended after 2 s; ask again to go on")


def test_follows_beyond_the_cap_are_refused_until_one_ends(  # type: ignore[no-untyped-def]
    make_agent, settings: AgentSettings, store, eventually, pki: Pki
) -> None:
    # given an agent that serves one follow at once, and a running deployment followed by a client
    app: Flask = make_agent(settings.model_copy(update={"logs_max_follows": 1}))
    client = pki.client(app, CONTROLLER)
    running(client, store, eventually)
    first = client.get("/deployments/dep-l/logs?follow=true", buffered=False)
    assert first.status_code == 200

    # when a second client follows it, then it is refused (503), while a plain tail still answers
    second = client.get("/deployments/dep-l/logs?follow=true")
    assert second.status_code == 503 and second.json["error"]["code"] == "too_many_follows"
    assert client.get("/deployments/dep-l/logs?tail=5").status_code == 200

    # and once the first one hangs up, a follow is served again
    first.close()
    third = client.get("/deployments/dep-l/logs?follow=true&max_s=1")
    assert third.status_code == 200 and "ended after 1 s" in third.text
