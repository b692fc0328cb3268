"""Metrics ingest: messages/s the controller folds into its view, as a ratio to a bare consume + json.loads loop.

Starts the embedded broker (Tansu), produces --messages AgentMetrics messages from --agents agents to
`system-metrics` (key: agent id, as agents do: 0-3 running deployments each, a GPU on some, load that moves), then
reads the whole topic in the same run, --rounds times each, alternating:
- bare: one confluent-kafka consumer, `consume()` in batches of the controller's size, `json.loads` each value.
- controller: the controller's own metrics consumer (`Controller.metrics_consumer`: the PartitionConsumer, handler,
  ClusterView and ReportFilter that `Controller.start` runs) from the beginning of the topic, a fresh controller
  each round (empty view), with a SQLite database that already holds the deployments the agents report (the
  steady state: reports that change nothing). Within a batch it reads only the latest snapshot of each agent
  (the others are counted as superseded); --read-all validates and folds every message instead.
Every message is signed as the controller believes them (DESIGN §7): by its agent, with a credential of role
`agent` from a throwaway CA (`miaas.cluster.Pki`) whose certificate binds the URL the agent reports; the controller
runs on that CA's controller credential. So the controller's figure includes checking the signature of each message
it reads (an Ed25519 verification; superseded ones are passed over unchecked), while the bare loop verifies nothing:
it is the floor of reading. The cost of the check alone is printed too (`signature check`: a fresh checker over
the last messages produced), to tell the crypto from the fold.
Both clocks start before the consumer is created (so both include assigning the partitions) and stop when every
message is consumed (bare) or handled (controller). The best round of each is printed, with the CPU time of this
process per message (steadier than wall time on a busy machine). The controller's freshness window and the age
its checker accepts a signed message at are widened: the bench replays a burst, and what it measures is the fold,
not the clock.

Goal (issue 4): controller >= 0.8x bare. Prints the figures; never fails on them.
Run: .venv/bin/python bench/ingest.py [--messages 200000] [--agents 1000] [--rounds 3] [--read-all]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from controller.app import create_app
from controller.provenance import ReadOrderChecker
from controller.service import Controller
from controller.settings import ControllerSettings
from controller.store import DeploymentRow
from embedded_broker.launcher import EmbeddedBroker
from miaas import identity
from miaas.bus import SYSTEM_METRICS
from miaas.cluster import Pki
from miaas.schemas import (
    AgentCapacity,
    AgentLoad,
    AgentMetrics,
    ConsumerStats,
    DeploymentReport,
    DeploymentStatus,
    GpuMetrics,
)


def agents(n: int, rnd: random.Random) -> list[AgentMetrics]:
    """One template message per agent: identity, capacity and what it runs."""
    out = []
    for i in range(n):
        agent_id = f"agent-{i:05d}"
        host = f"10.{i // 250}.{i % 250}.{rnd.randint(1, 250)}"
        gpus = rnd.choice([0, 0, 0, 1, 2])
        out.append(AgentMetrics(
            agent_id=agent_id, url=f"http://{host}:8600",
            runtimes=["process"] if i % 4 else ["process", "vagrant"],
            capacity=AgentCapacity(cpus=rnd.choice([4, 8, 16, 32]), memory_mb=rnd.choice([8192, 16384, 65536]) * 1.0,
                                   disk_mb=512_000.0, gpus=gpus),
            load=AgentLoad(cpu_percent=0, memory_percent=0, gpus=[
                GpuMetrics(index=g, name="NVIDIA A100-SXM4-40GB", memory_total_mb=40960.0) for g in range(gpus)]),
            deployments=[DeploymentReport(deployment_id=f"d-{i:05d}-{k}", status=DeploymentStatus.RUNNING,
                                          url=f"http://{host}:{20000 + k}") for k in range(rnd.choice([0, 1, 2, 3]))],
            sent_at=datetime.now(UTC),
        ))
    return out


Sample = tuple[bytes, bytes, list[tuple[str, bytes | None]]]  # key, value, headers of a produced message
SAMPLE = 2000  # messages kept to time the signature check alone
MAX_AGE_S = 86_400.0  # how old a signed message the controller's checker accepts here (in production 300 s)


def signers(pki: Pki, templates: list[AgentMetrics]) -> dict[str, identity.MessageSigner]:
    """A signer per agent: its own credential (role agent, subject its id, its URL bound), as a joined agent has."""
    ca, now = pki.ca(), time.time()
    return {t.agent_id: identity.MessageSigner(identity.fixed(ca.credential(t.agent_id, identity.AGENT, now=now,
                                                                            url=t.url)))
            for t in templates}


def produce(bootstrap: str, templates: list[AgentMetrics], signed_by: dict[str, identity.MessageSigner], n: int,
            rnd: random.Random) -> tuple[float, list[Sample]]:
    """Publish n messages, round-robin over the agents, each with fresh load and signed by its agent; the seconds
    it took (signing included), and the last messages (key, value, headers) to time the check alone."""
    sample: list[Sample] = []
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True,
                         "queue.buffering.max.messages": 1_000_000})
    start = datetime.now(UTC)
    began = time.perf_counter()
    for i in range(n):
        t = templates[i % len(templates)]
        load = t.load.model_copy(update={
            "cpu_percent": round(rnd.uniform(0, 100), 1), "memory_percent": round(rnd.uniform(5, 95), 1),
            "disk_percent": round(rnd.uniform(10, 60), 1),
            "gpus": [g.model_copy(update={"utilization_percent": round(rnd.uniform(0, 100), 1),
                                          "memory_used_mb": round(rnd.uniform(0, 40960), 1)}) for g in t.load.gpus],
        })
        m = t.model_copy(update={"load": load, "sent_at": start + timedelta(microseconds=i)})
        key, value = t.agent_id.encode(), m.model_dump_json().encode()
        headers = signed_by[t.agent_id].headers(SYSTEM_METRICS, key, value)
        if i >= n - SAMPLE:
            sample.append((key, value, [(h, v.encode() if isinstance(v, str) else v) for h, v in headers]))
        while True:
            try:
                producer.produce(SYSTEM_METRICS, key=key, value=value, headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
    if producer.flush(60) != 0:
        raise RuntimeError("messages left unsent")
    return time.perf_counter() - began, sample


def check_alone(controller: Controller, sample: list[Sample]) -> float:
    """CPU seconds per message of the controller's signature check alone (a fresh checker, one partition)."""
    checker = ReadOrderChecker(controller.trust.verifier, max_age_s=MAX_AGE_S)
    now = time.time()
    cpu = time.process_time()
    for offset, (key, value, headers) in enumerate(sample):
        checker.check(SYSTEM_METRICS, 0, key, value, headers, now, offset)
    return (time.process_time() - cpu) / max(1, len(sample))


def bare(bootstrap: str, n: int, batch: int) -> tuple[float, float]:
    """Seconds (wall, and CPU of this process) for a plain consumer to read n messages and json.loads each."""
    began, cpu = time.perf_counter(), time.process_time()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-bare", "enable.auto.commit": False})
    meta = consumer.list_topics(SYSTEM_METRICS, timeout=10).topics[SYSTEM_METRICS]
    consumer.assign([TopicPartition(SYSTEM_METRICS, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)])
    seen = 0
    try:
        while seen < n:
            for msg in consumer.consume(num_messages=batch, timeout=0.2):
                if msg.error() is not None:
                    continue
                json.loads(msg.value() or b"")
                seen += 1
        return time.perf_counter() - began, time.process_time() - cpu
    finally:
        consumer.close()


def controller_path(controller: Controller, n: int, read_all: bool = False) -> tuple[float, float, ConsumerStats]:
    """Seconds (wall, and CPU of this process) for the controller's metrics consumer to handle n messages, and what
    it counted."""
    began, cpu = time.perf_counter(), time.process_time()
    consumer = controller.metrics_consumer(start="beginning")
    consumer.checker = ReadOrderChecker(controller.trust.verifier, max_age_s=MAX_AGE_S)  # the one it has, older ok
    if read_all:
        consumer.latest_only = {}
    consumer.start()
    try:
        while consumer.handled < n:
            time.sleep(0.005)
        took, used = time.perf_counter() - began, time.process_time() - cpu
    finally:
        consumer.stop()
    return took, used, consumer.stats()


def seed_deployments(controller: Controller, templates: list[AgentMetrics]) -> int:
    now = datetime.now(UTC)
    count = 0
    for t in templates:
        for r in t.deployments:
            controller.store.add(DeploymentRow(
                id=r.deployment_id, model_id="m-bench", model_name="bench", version=1, status="running",
                agent_id=t.agent_id, url=r.url, reason=None, runtime="process", cpus=1, memory_mb=512, gpus=0,
                placement=[], created_by=None, created_at=now, updated_at=now,
            ))
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--agents", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3, help="bare and controller reads each, alternating; best of")
    parser.add_argument("--read-all", action="store_true",
                        help="validate and fold every message, even those a later one of the same agent supersedes")
    args = parser.parse_args()
    rnd = random.Random(4)
    templates = agents(args.agents, rnd)
    with tempfile.TemporaryDirectory(prefix="miaas-bench-ingest-") as tmp, \
            EmbeddedBroker(log_file=Path(tmp) / "tansu.log") as broker:
        pki = Pki.ensure(Path(tmp) / "pki")
        took, sample = produce(broker.bootstrap, templates, signers(pki, templates), args.messages, rnd)
        print(f"produced {args.messages:,} signed messages from {args.agents:,} agents in {took:.2f}s "
              f"({args.messages / took:,.0f}/s)")
        settings = ControllerSettings(
            ca_file=pki.ca_file, credential_file=pki.credentials["controller"],
            database_url=f"sqlite:///{Path(tmp) / 'controller.db'}", kafka_bootstrap=broker.bootstrap,
            max_clock_skew_s=86_400,
        )
        def fresh() -> Controller:  # an empty view and memory each round, as after a restart
            app = create_app(settings, locate=lambda name: "http://127.0.0.1:9")
            return cast(Controller, app.extensions["controller"])

        print(f"controller database holds the {seed_deployments(fresh(), templates):,} reported deployments")
        batch = fresh().metrics_consumer().batch_size
        bare_s: list[float] = []
        real_s: list[float] = []
        bare_cpu: list[float] = []
        real_cpu: list[float] = []
        for _ in range(args.rounds):
            took, used = bare(broker.bootstrap, args.messages, batch)
            bare_s.append(took)
            bare_cpu.append(used)
            controller = fresh()
            took, used, stats = controller_path(controller, args.messages, args.read_all)
            real_s.append(took)
            real_cpu.append(used)
            if stats.skipped:
                print(f"warning: the controller skipped {stats.skipped:,} messages: {stats.skipped_by_reason}")
        folded = len(controller.view.agents(datetime.now(UTC)))
        n = args.messages
        b, r = n / min(bare_s), n / min(real_s)
        print(f"bare consume + json.loads : {b:>10,.0f} messages/s  ({min(bare_s):.2f}s, batches of {batch}; "
              f"CPU {min(bare_cpu) / n * 1e6:.1f} us/message)")
        print(f"controller fold           : {r:>10,.0f} messages/s  ({min(real_s):.2f}s; CPU "
              f"{min(real_cpu) / n * 1e6:.1f} us/message; {folded:,} agents in view, {stats.superseded:,} "
              f"superseded in their batch)")
        print(f"ratio                     : {r / b:.2f}x  (goal >= 0.80x; best of {args.rounds} rounds; "
              f"CPU ratio {min(bare_cpu) / min(real_cpu):.2f}x)")
        checked, per_check = n - stats.superseded, check_alone(controller, sample)
        print(f"signature check           : CPU {per_check * 1e6:.1f} us/message checked "
              f"(the controller checked {checked:,} of the {n:,}; the bare loop none)")
        rest = max(1e-9, min(real_cpu) - checked * per_check)
        print(f"controller less the checks: CPU {rest / n * 1e6:.1f} us/message, CPU ratio "
              f"{min(bare_cpu) / rest:.2f}x (estimated: its CPU less {checked:,} checks at the cost above)")

if __name__ == "__main__":
    main()
