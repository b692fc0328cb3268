"""On the real broker: the agent's metrics and deployment events arrive, keyed and in order."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from agent.app import parts
from agent.settings import AgentSettings
from miaas.bus import DEPLOYMENT_EVENTS, SYSTEM_METRICS, KafkaBus
from miaas.schemas import AgentMetrics, DeploymentEvent


def read_all(consumer: Consumer, until: Any, timeout: float = 60.0) -> list[tuple[str, str, dict[str, Any]]]:
    """Messages (topic, key, value) until until(messages) holds; fails after timeout.

    The broker is shared by the session: other tests' messages (poison included) are read too, and only JSON
    objects are kept.
    """
    seen: list[tuple[str, str, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    while not until(seen):
        assert time.monotonic() < deadline, f"timed out; saw {len(seen)} messages"
        for msg in consumer.consume(num_messages=100, timeout=0.2):
            if msg.error() is None:
                try:
                    value = json.loads(msg.value() or b"{}")
                except ValueError:
                    continue
                key = (msg.key() or b"").decode("utf-8", "replace")
                if isinstance(value, dict):
                    seen.append((str(msg.topic()), key, value))
    return seen


def test_metrics_and_deployment_events_arrive_on_the_broker(  # type: ignore[no-untyped-def]
    broker: str, make_agent, settings: AgentSettings, store, service_token: str
) -> None:
    # given an agent publishing on the real broker, with a unique id
    agent_id = f"agent-{uuid.uuid4().hex[:8]}"
    bus = KafkaBus(broker, client_id=agent_id)
    app = make_agent(settings.model_copy(update={"agent_id": agent_id, "metrics_interval_s": 0.2}), bus)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {service_token}"
    store.add("broken", start=["echo failing on purpose", "exit 4"])

    # when its metrics start and a deployment fails
    parts(app).start_metrics("http://agent.test:8600")
    deployment_id = f"dep-{uuid.uuid4().hex[:8]}"
    client.post("/create-vm", json={"deployment_id": deployment_id, "model_id": "broken", "version": 1})

    # then a consumer of every partition reads the metrics (with the failed deployment) and the events in order
    consumer = Consumer({"bootstrap.servers": broker, "group.id": f"test-{agent_id}", "enable.auto.commit": False})
    try:
        topics = consumer.list_topics(timeout=10).topics
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                         for t in (SYSTEM_METRICS, DEPLOYMENT_EVENTS) for p in topics[t].partitions])

        def mine(seen: list[tuple[str, str, dict[str, Any]]]) -> tuple[list[AgentMetrics], list[DeploymentEvent]]:
            metrics = [AgentMetrics.model_validate(v) for t, k, v in seen if t == SYSTEM_METRICS and k == agent_id]
            events = [DeploymentEvent.model_validate(v) for t, k, v in seen
                      if t == DEPLOYMENT_EVENTS and k == deployment_id]
            return metrics, events

        def done(seen: list[tuple[str, str, dict[str, Any]]]) -> bool:
            metrics, events = mine(seen)
            failed_reported = any(d.deployment_id == deployment_id and d.status.value == "failed"
                                  for m in metrics for d in m.deployments)
            return failed_reported and len(events) >= 2

        metrics, events = mine(read_all(consumer, done))
    finally:
        consumer.close()
    assert {m.url for m in metrics} == {"http://agent.test:8600"}
    assert all(m.agent_id == agent_id and m.runtimes == ["process"] for m in metrics)
    assert [e.status.value for e in events] == ["provisioning", "failed"]
    assert "failing on purpose" in (events[-1].reason or "")
    assert {e.agent_id for e in events} == {agent_id}
