"""The controller's /metrics: deployments and agents by state and placement latency with real agents over HTTP,
and the bus messages consumed and refused per reason on the real broker."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Producer
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import bus_families
from controller.service import Controller
from miaas.bus import DEPLOYMENT_EVENTS, SYSTEM_METRICS
from miaas.metrics import CONTENT_TYPE_LATEST
from miaas.schemas import BusStats, ConsumerStats, DeploymentEvent, DeploymentStatus
from miaas.testing import wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: Any) -> Samples:
    resp = client.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


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


def test_bus_messages_refused_on_the_real_broker_are_counted_by_reason(
        broker: str, on_broker: tuple[Controller, FlaskClient]) -> None:
    # given a controller on the real broker (an unsigned event, not metrics: every controller reads the events from
    # the start and the tests count them at least, while a later test may want to be the only one seeing metrics)
    controller, client = on_broker

    def refused_unsigned() -> float:
        return value(scrape(client), "miaas_bus_messages_refused_total", topic=DEPLOYMENT_EVENTS,
                     reason="unsigned") or 0

    before = refused_unsigned()
    # when an unsigned deployment event is published
    producer = Producer({"bootstrap.servers": broker})
    producer.produce(DEPLOYMENT_EVENTS, key=b"d-metrics", value=DeploymentEvent(
        deployment_id="d-metrics", agent_id="agent-x", status=DeploymentStatus.FAILED, reason="forged",
        source="agent", at=datetime.now(UTC), generation=1).model_dump_json().encode())
    producer.flush(30)
    # then it is counted under its topic and reason, and each consumer's count and the broker's state are shown
    wait_for(lambda: refused_unsigned() == before + 1, 30, "the unsigned event counted")
    samples = scrape(client)
    for topic in (SYSTEM_METRICS, DEPLOYMENT_EVENTS):
        assert value(samples, "miaas_bus_messages_consumed_total", topic=topic) is not None, topic
    assert value(samples, "miaas_bus_broker_answering") is not None
    assert value(samples, "miaas_liveness_suspended") is not None


def test_bus_counts_are_those_of_each_consumer() -> None:
    stats = BusStats(consumers=[
        ConsumerStats(topics=[SYSTEM_METRICS], consumed=7, skipped=4,
                      skipped_by_reason={"unsigned": 3, "replayed": 1}),
        ConsumerStats(topics=[DEPLOYMENT_EVENTS], consumed=2, skipped=1, skipped_by_reason={"impersonation": 1}),
    ])
    families = {f.name: f for f in bus_families(stats)}
    consumed = {s.labels["topic"]: s.value for s in families["miaas_bus_messages_consumed"].samples
                if s.name.endswith("_total")}
    refused = {(s.labels["topic"], s.labels["reason"]): s.value
               for s in families["miaas_bus_messages_refused"].samples if s.name.endswith("_total")}
    assert consumed == {SYSTEM_METRICS: 7, DEPLOYMENT_EVENTS: 2}
    assert refused == {(SYSTEM_METRICS, "unsigned"): 3, (SYSTEM_METRICS, "replayed"): 1,
                       (DEPLOYMENT_EVENTS, "impersonation"): 1}
    assert "miaas_bus_broker_answering" not in families  # no broker watch: nothing said about it
