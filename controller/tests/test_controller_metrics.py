"""The controller's /metrics: deployments and agents by state and placement latency with real agents over HTTP,
and the bus messages consumed and refused per reason on the real broker."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Producer
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from controller.service import Controller
from miaas.bus import SYSTEM_METRICS
from miaas.identity import AGENT, MessageSigner, fixed
from miaas.metrics import CONTENT_TYPE_LATEST
from miaas.schemas import AgentCapacity, AgentLoad, AgentMetrics
from miaas.testing import Pki, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: Any) -> Samples:
    resp = client.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def metrics(agent_id: str, url: str) -> bytes:
    return AgentMetrics(agent_id=agent_id, url=url, capacity=AgentCapacity(cpus=4, memory_mb=8192),
                        load=AgentLoad(cpu_percent=10, memory_percent=20), sent_at=datetime.now(UTC),
                        ).model_dump_json().encode()


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_deployments_and_agents_by_state_and_the_placement_latency(make_cluster: Any) -> None:
    # given a controller with one agent, room for one small model
    cluster = make_cluster(preemption=False)
    cluster.add_agent("a", cpus=1)
    wait_for(lambda: cluster.client.get("/controller/agents").json["agents"], 30, "agent a seen")
    before = scrape(cluster.client)
    assert value(before, "miaas_deployments", state="running") == 0  # every state listed, 0 included
    # when one model is deployed and runs, and a second waits for room
    assert cluster.deploy("small", wait=10).json["status"] == "running"
    assert cluster.deploy("small").json["status"] == "pending"
    samples = scrape(cluster.client)
    # then the deployments and the agent are counted by state
    assert value(samples, "miaas_deployments", state="running") == 1
    assert value(samples, "miaas_deployments", state="pending") == 1
    assert value(samples, "miaas_deployments", state="stopped") is None  # final states are not kept as gauges
    assert value(samples, "miaas_agents", state="alive") == 1
    assert value(samples, "miaas_agents", state="lost") == 0
    # and each placement decision was timed
    placed = value(samples, "miaas_placement_duration_seconds_count") or 0
    assert placed >= 2 > (value(before, "miaas_placement_duration_seconds_count") or 0)
    # and the deploys are counted under their route
    deploys = {dict(labels)["status"]: v for (name, labels), v in samples.items()
               if name == "miaas_http_requests_total" and ("route", "/controller/deploy") in labels}
    assert sum(deploys.values()) == 2 and set(deploys) <= {"200", "201", "202"}, deploys
    # when the agent goes silent for longer than its grace period, it is counted as lost
    cluster.silence("a")
    wait_for(lambda: value(scrape(cluster.client), "miaas_agents", state="lost") == 1, 30, "agent a lost")


def test_bus_messages_consumed_and_refused_by_reason(broker: str, pki: Pki,
                                                     on_broker: tuple[Controller, FlaskClient]) -> None:
    # given a controller on the real broker
    controller, client = on_broker
    agent_id = f"agent-{uuid.uuid4().hex[:6]}"
    url = "http://127.0.0.1:7201"
    producer = Producer({"bootstrap.servers": broker})
    signer = MessageSigner(fixed(pki.credential(agent_id, AGENT, url=url)))
    # when an unsigned message (of another key: a later snapshot of the same key would supersede it unread) and
    # one signed by the agent itself are published
    stranger = f"{agent_id}-unsigned"
    producer.produce(SYSTEM_METRICS, key=stranger.encode(), value=metrics(stranger, url))
    good = metrics(agent_id, url)
    producer.produce(SYSTEM_METRICS, key=agent_id.encode(), value=good,
                     headers=signer.headers(SYSTEM_METRICS, agent_id.encode(), good))
    producer.flush(30)
    wait_for(lambda: controller.view.get(agent_id) is not None, 30, "the agent's signed metrics believed")

    def refused_unsigned() -> float | None:
        return value(scrape(client), "miaas_bus_messages_refused_total", topic=SYSTEM_METRICS, reason="unsigned")

    wait_for(lambda: refused_unsigned() == 1, 30, "the unsigned message counted")
    # then the refusal is counted by its reason, the others as consumed, and the broker is said to answer
    samples = scrape(client)
    assert (value(samples, "miaas_bus_messages_consumed_total", topic=SYSTEM_METRICS) or 0) >= 1
    assert {r for (name, labels) in samples if name == "miaas_bus_messages_refused_total"
            for k, r in labels if k == "reason"} == {"unsigned"}
    assert value(samples, "miaas_agents", state="alive") == 1
    assert value(samples, "miaas_liveness_suspended") is not None
    assert value(samples, "miaas_bus_broker_answering") is not None
