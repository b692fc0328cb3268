"""Deployment logs: lines as a person reads them, and following files as they grow (the logs route's `follow`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests

from agent.logtail import LogFollower, clean_line


def test_colours_and_redrawn_progress_are_cleaned() -> None:
    assert clean_line("\x1b[0;32m==> vm: up\x1b[0m") == "==> vm: up"
    assert clean_line("\x1b[KProgress: 1%\rProgress: 50%\rProgress: 100%\r") == "Progress: 100%"
    assert clean_line("plain") == "plain"


def test_a_follower_reads_what_is_appended_to_any_file_from_its_start(tmp_path: Path) -> None:
    first, second = tmp_path / "model.log", tmp_path / "model-output.log"  # the second does not exist yet
    first.write_text("before\n")
    follower = LogFollower([first, second])
    assert follower.read() == []
    with first.open("a") as out:
        out.write("one\ntwo-with-no-end")
    second.write_text("\x1b[1mmodel says hi\x1b[0m\n")
    assert follower.read() == ["one", "model says hi"]
    with first.open("a") as out:
        out.write(" yet\n")
    assert follower.read() == ["two-with-no-end yet"]
    first.write_text("rotated\n")  # shorter than what was read: read it again from its start
    assert follower.read() == ["rotated"]


def test_following_ends_when_the_deployment_does_and_reads_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "model.log"
    log.write_text("")
    now = [0.0]
    ended = [False]

    def sleep(seconds: float) -> None:
        now[0] += seconds
        with log.open("a") as out:
            out.write(f"t={now[0]:g}\n")
        if now[0] >= 2:
            ended[0] = True
            with log.open("a") as out:
                out.write("stopped, last words without a newline")

    lines = list(LogFollower([log]).follow(done=lambda: ended[0], max_s=60, poll_s=1, check_every_s=1,
                                           clock=lambda: now[0], sleep=sleep))
    assert lines[-1] == "stopped, last words without a newline\n"
    assert lines[:2] == ["t=1\n", "t=2\n"]


def test_following_ends_after_max_s(tmp_path: Path) -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    lines = list(LogFollower([tmp_path / "none.log"]).follow(done=lambda: False, max_s=5, poll_s=1,
                                                              clock=lambda: now[0], sleep=sleep))
    assert lines == [] and now[0] == 5


def test_the_process_runtime_log_is_followed_over_http(client: Any, store: Any, eventually: Any) -> None:
    # given a running deployment
    store.add("tiny")
    created = client.post("/create-vm", json={"deployment_id": "dep-f", "model_id": "tiny", "version": 1}).json
    eventually(lambda: client.get("/deployments/dep-f").json["status"] == "running", 60, "dep-f running")

    # when its log is followed
    started = time.monotonic()
    followed = client.get("/deployments/dep-f/logs?tail=1&follow=true&max_s=60", buffered=False)
    chunks = iter(followed.response)
    assert b"answers" in next(chunks)  # the tail comes first: "running: port ... answers"
    requests.get(f"{created['url']}/hello", timeout=5)
    client.post("/stop-vm", json={"deployment_id": "dep-f"})
    rest = b"".join(chunks).decode()
    followed.close()

    # then the new lines came through, and the stream ended with the deployment, long before max_s
    assert "tiny model served /hello" in rest
    assert time.monotonic() - started < 30
