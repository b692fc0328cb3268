"""On the real broker: the agent's metrics and deployment events arrive, keyed and in order."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from agent.app import parts
from agent.credential import CredentialHolder
from agent.settings import AgentSettings
from miaas.bus import DEPLOYMENT_EVENTS, SYSTEM_METRICS, KafkaBus
from miaas.identity import (
    AGENT,
    CONTROLLER,
    Certificate,
    MessageChecker,
    MessageSigner,
    Refused,
    Verifier,
    load_ca_public,
)
from miaas.schemas import AgentMetrics, DeploymentEvent
from miaas.testing import Pki

Seen = list[tuple[str, str, dict[str, Any], Certificate | None]]


def read_all(consumer: Consumer, until: Any, checker: MessageChecker, timeout: float = 60.0) -> Seen:
    """Messages (topic, key, value, signer: None when refused) until until(messages) holds; fails after timeout.

    The broker is shared by the session: other tests' messages (poison included) are read too, and only JSON
    objects are kept.
    """
    seen: Seen = []
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
                    try:
                        signer: Certificate | None = checker.check(
                            str(msg.topic()), msg.partition() or 0, msg.key(), msg.value() or b"", msg.headers(),
                            time.time(), offset=msg.offset())
                    except Refused:
                        signer = None
                    seen.append((str(msg.topic()), key, value, signer))
    return seen


def test_metrics_and_deployment_events_arrive_on_the_broker_signed_by_the_agent(  # type: ignore[no-untyped-def]
    broker: str, make_agent, settings: AgentSettings, store, pki: Pki
) -> None:
    # given an agent with a unique id and its own certificate, signing what it publishes on the real broker
    agent_id = f"agent-{uuid.uuid4().hex[:8]}"
    credential = CredentialHolder(lambda: cred)
    cred = pki.credential(agent_id, AGENT, url="http://agent.test:8600")
    bus = KafkaBus(broker, client_id=agent_id, signer=MessageSigner(credential))
    app = make_agent(settings.model_copy(update={"agent_id": agent_id, "metrics_interval_s": 0.2}), bus,
                     credential=credential)
    client = pki.client(app, CONTROLLER)
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

        def ours(seen: Seen) -> Seen:
            return [m for m in seen if (m[0], m[1]) in ((SYSTEM_METRICS, agent_id), (DEPLOYMENT_EVENTS, deployment_id))]

        def mine(seen: Seen) -> tuple[list[AgentMetrics], list[DeploymentEvent]]:
            metrics = [AgentMetrics.model_validate(v) for t, _, v, _ in ours(seen) if t == SYSTEM_METRICS]
            events = [DeploymentEvent.model_validate(v) for t, _, v, _ in ours(seen) if t == DEPLOYMENT_EVENTS]
            return metrics, events

        def done(seen: Seen) -> bool:
            metrics, events = mine(seen)
            failed_reported = any(d.deployment_id == deployment_id and d.status.value == "failed"
                                  for m in metrics for d in m.deployments)
            return failed_reported and len(events) >= 2

        checker = MessageChecker(Verifier(load_ca_public(pki.ca_file)))
        seen = read_all(consumer, done, checker)
        metrics, events = mine(seen)
    finally:
        consumer.close()
    # every one of them is signed by the agent's own certificate, and its metrics carry the URL it is bound to
    signers = {(s.subject, s.role, s.serial) if s else None for *_, s in ours(seen)}
    assert signers == {(agent_id, AGENT, cred.cert.serial)}
    assert {m.url for m in metrics} == {"http://agent.test:8600"}
    assert all(m.agent_id == agent_id and m.runtimes == ["process"] for m in metrics)
    assert [e.status.value for e in events] == ["provisioning", "failed"]
    assert "failing on purpose" in (events[-1].reason or "")
    assert {e.agent_id for e in events} == {agent_id}
