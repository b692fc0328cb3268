"""The controller on the real broker: poison on its topics is counted per reason where a user sees it
(`GET /controller/bus`), and the good messages after it still reach the agents' view. The poison is signed by an
agent, so that it passes the signature check and is refused for what it holds (unsigned messages are refused
before anything else: test_controller_provenance.py)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Producer
from flask.testing import FlaskClient

from controller.service import Controller
from miaas.bus import DEPLOYMENT_EVENTS, SYSTEM_METRICS
from miaas.identity import AGENT, MessageSigner, fixed
from miaas.testing import Pki


def eventually(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def metrics(agent_id: str, **load: float) -> bytes:
    return json.dumps({
        "schema_version": 1, "agent_id": agent_id, "url": "http://127.0.0.1:9", "runtimes": ["process"],
        "capacity": {"cpus": 4, "memory_mb": 8192}, "load": {"cpu_percent": 10, "memory_percent": 20, **load},
        "sent_at": datetime.now(UTC).isoformat(),
    }).encode()


def test_poison_is_counted_per_reason_on_the_bus_route_and_good_metrics_still_arrive(
    broker: str, pki: Pki, on_broker: tuple[Controller, FlaskClient]
) -> None:
    controller, client = on_broker
    suffix = uuid.uuid4().hex[:6]
    good, bad = f"agent-good-{suffix}", f"agent-bad-{suffix}"
    signer = {agent: MessageSigner(fixed(pki.credential(agent, AGENT, url="http://127.0.0.1:9")))
              for agent in (good, bad)}

    def produce(topic: str, agent: str, key: bytes, value: bytes) -> None:
        producer.produce(topic, key=key, value=value, headers=signer[agent].headers(topic, key, value))

    # given a controller following the bus; when poison of every kind lands on both of its topics
    producer = Producer({"bootstrap.servers": broker, "message.max.bytes": 12_000_000})
    for value in [b"{oops", b"[]", metrics(bad).replace(b'"schema_version": 1', b'"schema_version": 7'),
                  metrics(bad, cpu_percent=float("nan")), metrics(bad, memory_percent=-1),
                  b'{"x": "' + b"y" * 10_000_000 + b'"}']:
        produce(SYSTEM_METRICS, bad, bad.encode(), value)
        producer.flush(30)  # one at a time: each is the latest of its key in its batch, so each is read
    produce(DEPLOYMENT_EVENTS, bad, b"d-poison", b"\x00\x01 not json")
    # and then a good metrics message
    produce(SYSTEM_METRICS, good, good.encode(), metrics(good))
    producer.flush(30)
    # then the agents' view has the good agent only
    eventually(lambda: [a["agent_id"] for a in client.get("/controller/agents").json["agents"]] == [good],
               "the good agent in the view")
    # and GET /controller/bus counts each poison message under its reason
    def consumers() -> dict[tuple[str, ...], dict[str, Any]]:
        return {tuple(c["topics"]): c for c in client.get("/controller/bus").json["consumers"]}

    eventually(lambda: consumers()[(SYSTEM_METRICS,)]["skipped"] == 6, "six poison metrics counted")
    eventually(lambda: consumers()[(DEPLOYMENT_EVENTS,)]["skipped_by_reason"].get("bad_json"), "bad event counted")
    on_metrics = consumers()[(SYSTEM_METRICS,)]
    assert on_metrics["skipped_by_reason"] == {
        "bad_json": 2, "schema_version": 1, "not_finite": 1, "out_of_range": 1, "too_large": 1,
    }
    assert on_metrics["consumed"] >= 1
    assert on_metrics["last_skipped"].startswith(("bad_json", "schema_version", "not_finite", "out_of_range",
                                                  "too_large"))
    assert controller.view.get(bad) is None
