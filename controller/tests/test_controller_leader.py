"""Two controllers on one database: one leads (the lease), the other stands by and takes over when the leader
stops (at once) or dies (once its lease expired), with a higher epoch; a deposed leader's late writes fail the
store's guard and its late commands are refused by the agents (stale_leader); nothing is placed twice and a
deployment keeps running through a takeover. The lease's arithmetic on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from controller_kit import Cluster, Loopback, fake_registry, signed_session, wait_for
from flask import Flask
from pydantic import BaseModel
from sqlalchemy import func, select, update

from agent.app import parts
from controller.app import create_app as create_controller
from controller.commands import Refused, send_command
from controller.leader import Deposed, Leader, LeaseStore, NotLeader, lease_table
from controller.service import Controller
from controller.settings import ControllerSettings
from controller.store import DeploymentRow, DeploymentStore
from miaas import identity
from miaas.bus import DEPLOYMENT_EVENTS, SYSTEM_METRICS, MemoryBus
from miaas.schemas import AgentMetrics, DeploymentEvent
from miaas.serve import Server
from miaas.testing import Pki, postgres_schema

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    with postgres_schema(request.getfixturevalue("postgres_url"), "leader") as url:
        yield url


# ---------------------------------------------------------------------------------------------- the lease alone


def lease_on(url: str) -> LeaseStore:
    """The lease of a database made by the controller's migrations (as a controller starting on it makes it)."""
    return LeaseStore(DeploymentStore(url).engine)


def expire(lease: LeaseStore) -> None:
    """The lease runs out now (its holder died without a word, and the time passed)."""
    with lease.engine.begin() as conn:
        conn.execute(update(lease_table).values(expires_at=T0))


def test_one_claimant_holds_the_lease_and_a_takeover_adds_one_to_the_epoch(database_url: str) -> None:
    lease = lease_on(database_url)
    # given a free lease: the first claimant takes it at epoch 1, the second finds it held
    won, held = lease.claim("a", "http://a:1", None, ttl_s=30)
    assert won and (held.holder_id, held.holder_url, held.epoch) == ("a", "http://a:1", 1)
    assert 29 < held.expires_in_s <= 30  # by the database's clock
    lost, seen = lease.claim("b", "http://b:1", None, ttl_s=30)
    assert not lost and (seen.holder_id, seen.epoch) == ("a", 1)
    # when the holder renews, the epoch stays; a renewal at a wrong epoch is no renewal
    assert lease.claim("a", "http://a:1", 1, ttl_s=30)[0]
    assert not lease.claim("b", "http://b:1", 1, ttl_s=30)[0]
    # when it expires, the other takes it with the next epoch, and the old holder cannot renew
    expire(lease)
    won, taken = lease.claim("b", "http://b:1", None, ttl_s=30)
    assert won and (taken.holder_id, taken.epoch) == ("b", 2)
    assert not lease.claim("a", "http://a:1", 1, ttl_s=30)[0]
    # and a release by anyone but the holder at its epoch changes nothing; the holder's frees it at once
    assert not lease.release("a", 1) and not lease.release("b", 1)
    assert lease.release("b", 2)
    assert lease.read().expires_in_s <= 0
    won, third = lease.claim("a", "http://a:1", None, ttl_s=30)
    assert won and third.epoch == 3
    lease.engine.dispose()


def test_claimants_at_once_take_an_expired_lease_once(database_url: str) -> None:
    # given an expired lease and eight controllers claiming it together
    lease = lease_on(database_url)
    lease.claim("first", None, None, ttl_s=30)
    expire(lease)
    start = threading.Barrier(8)
    outcomes: dict[str, bool] = {}

    def claim(name: str) -> None:
        start.wait()
        outcomes[name] = lease.claim(name, None, None, ttl_s=30)[0]

    threads = [threading.Thread(target=claim, args=(f"c{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # then exactly one won, at the next epoch
    winners = [name for name, won in outcomes.items() if won]
    assert len(winners) == 1, outcomes
    assert (lease.read().holder_id, lease.read().epoch) == (winners[0], 2)
    lease.engine.dispose()


def test_a_leader_stops_acting_before_its_lease_ends(tmp_path: Path) -> None:
    # given a leader on a clock of its own, with a lease of 6 s (it stops acting 1 s before the end)
    now = [100.0]
    leader = Leader(lease_on(f"sqlite:///{tmp_path / 'l.db'}"), "a", url=None, ttl_s=6,
                    monotonic=lambda: now[0])
    assert leader.claim() and leader.fence() == 1
    now[0] += 4.9
    assert leader.leading_now()
    # when its renewals fail (here the table is gone: every claim is a database error), it ends its term by
    # itself, 1 s before the lease would
    lease_table.drop(leader.lease.engine)
    assert leader.claim() and leader.last_error is not None  # a failed claim leaves the term as it was
    now[0] += 0.2
    assert not leader.leading_now()
    with pytest.raises(NotLeader, match="standby"):
        leader.fence()


# ---------------------------------------------------------------------------------------------- two controllers


class Fanout(Loopback):
    """The bus between the agents and both controllers: each folds what every agent publishes."""

    def __init__(self) -> None:
        super().__init__()
        self.controllers: list[Controller] = []

    def bus_for(self, agent_id: str) -> Any:
        loop = self

        class AgentBus(MemoryBus):
            def publish(self, topic: str, key: str, message: BaseModel) -> None:
                super().publish(topic, key, message)
                if agent_id in loop.paused:
                    return
                for c in list(loop.controllers):
                    if topic == SYSTEM_METRICS and isinstance(message, AgentMetrics):
                        c.observe_metrics(message)
                    elif topic == DEPLOYMENT_EVENTS and isinstance(message, DeploymentEvent):
                        c.observe_event(message)

        return AgentBus()


@pytest.fixture
def make_pair(pki: Pki, tmp_path: Path, serve: Callable[[Flask], Server]
              ) -> Iterator[Callable[..., tuple[Cluster, Cluster]]]:
    """make_pair(database_url, lease_s): controllers `a` (leading) and `b` (standing by) on one database, their
    reconcile loops running, sharing the agents that `a.add_agent` adds."""
    made: list[Cluster] = []

    def make(database_url: str, lease_s: float = 1.0) -> tuple[Cluster, Cluster]:
        registry = serve(fake_registry(pki))
        loop = Fanout()
        pair = []
        for name in ("a", "b"):
            settings = ControllerSettings(
                **pki.settings(identity.CONTROLLER), database_url=database_url, controller_id=f"controller-{name}",
                public_url=f"http://controller-{name}.test:8520", leader_lease_s=lease_s, lost_after_s=3.0,
                suspect_after_intervals=3, reconcile_interval_s=0.05, agent_timeout_s=2, retry_base_s=0.1,
                retry_max_s=0.5)
            app = create_controller(settings, locate=lambda _name: registry.url, bus=MemoryBus())
            controller: Controller = app.extensions["controller"]
            assert controller.leader.claim() is (name == "a")  # a first: it leads
            loop.controllers.append(controller)
            cluster = Cluster(controller, app, pki, loop, tmp_path, serve, pki.client(app, identity.ADMIN),
                              signed_session(pki.credential(identity.ADMIN)))
            pair.append(cluster)
            made.append(cluster)
        a, b = pair
        b.agents = a.agents  # one set of agents, both controllers hear them
        for cluster in pair:
            cluster.controller.started_at = cluster.controller.clock()
            cluster.controller.reconciler.start()
        return a, b

    yield make
    for cluster in made:
        cluster.loop.controllers.clear()
        cluster.controller.reconciler.stop()
        cluster.controller.leader.stop(release=False)
        cluster.http.close()
    for cluster in made[::2]:
        for agent in cluster.agents.values():
            parts(agent.app).shutdown()


def die(cluster: Cluster) -> None:
    """The controller stops as if killed: no more passes, claims or commands, and its lease is not released."""
    cluster.loop.controllers.remove(cluster.controller)
    cluster.controller.reconciler.stop()
    cluster.controller.leader.stop(release=False)


def test_one_leads_and_the_standby_refuses_writes_naming_the_leader(make_pair: Any, tmp_path: Path) -> None:
    a, b = make_pair(f"sqlite:///{tmp_path / 'shared.db'}", lease_s=30)
    # given two controllers on one database: a leads, b stands by
    assert (a.controller.leader.role(), b.controller.leader.role()) == ("leader", "standby")
    assert a.client.get("/health").json["role"] == "leader" and b.client.get("/health").json["role"] == "standby"
    status = b.client.get("/controller/leader").json
    assert (status["controller_id"], status["role"], status["holder_id"], status["holder_url"], status["epoch"]) \
        == ("controller-b", "standby", "controller-a", "http://controller-a.test:8520", 1)
    # when deploy and stop are sent to the standby
    for resp in (b.deploy("small"), b.stop("d-1")):
        # then each is refused with the leader's URL and when to retry
        assert resp.status_code == 503, resp.json
        error = resp.json["error"]
        assert error["code"] == "not_leader" and "controller-a" in error["message"]
        assert error["details"]["leader_url"] == "http://controller-a.test:8520"
        assert int(resp.headers["Retry-After"]) >= 1
    # while its reads work, and the leader deploys
    assert b.client.get("/controller/deployments").status_code == 200
    assert a.deploy("small").status_code == 202
    assert len(b.client.get("/controller/deployments").json["deployments"]) == 1


def test_the_standby_takes_over_at_once_when_the_leader_stops(make_pair: Any, database_url: str) -> None:
    a, b = make_pair(database_url, lease_s=30)
    # when the leader stops cleanly, it releases the lease
    a.controller.reconciler.stop()
    a.controller.leader.stop(release=True)
    # then the standby takes it at its next claim, without waiting for the 30 s lease, at a higher epoch
    assert b.controller.leader.claim()
    assert b.controller.leader.fence() == 2
    assert b.deploy("small").status_code == 202
    assert a.deploy("small").status_code == 503


def test_the_standby_takes_over_once_a_dead_leaders_lease_expired(make_pair: Any, database_url: str) -> None:
    a, b = make_pair(database_url, lease_s=1.0)
    agent = a.add_agent("agent-1")
    # given a deployment placed by the leader and running
    d = a.until(a.deploy("small").json["deployment_id"], lambda x: x["status"] == "running", "running on a")
    # when the leader dies without releasing its lease
    die(a)
    # then the standby leads once the lease ran out, at a higher epoch
    wait_for(lambda: b.controller.leading(), 30, "b to take the lease")
    assert b.controller.leader.fence() == 2
    # and the deployment keeps running where it was, same placement, nothing started again
    after = b.get(d["deployment_id"])
    assert (after["status"], after["agent_id"], after["generation"]) == ("running", "agent-1", d["generation"])
    assert agent.runtime.started == [d["deployment_id"]]
    # and the new leader's passes go on with it: a stop reaches the agent with the new fence
    assert b.stop(d["deployment_id"]).json["status"] == "stopped"
    assert d["deployment_id"] not in agent.runtime.running
    assert agent.runtime.started == [d["deployment_id"]]
    # and new deploys are placed by the new leader
    e = b.deploy("small").json
    b.until(e["deployment_id"], lambda x: x["status"] == "running", "running on b")


def test_a_deposed_leaders_late_write_and_command_are_refused(make_pair: Any, database_url: str) -> None:
    a, b = make_pair(database_url, lease_s=30)
    agent = a.add_agent("agent-1")
    wait_for(lambda: b.controller.view.get("agent-1"), 10, "b to hear the agent")
    # given a leader that stalled (a long pause): its lease expired and the standby took it, epoch 2
    a.controller.reconciler.stop()
    expire(a.controller.leader.lease)
    assert b.controller.leader.claim() and b.controller.leader.fence() == 2
    # and the new leader commanded the agent (the stop of a deployment it does not hold: 404), fence 2
    with pytest.raises(Refused) as unknown:
        b.controller._command("agent-1", "/stop-vm", {"deployment_id": "d-none"})
    assert unknown.value.status == 404
    # when the old leader, which still believes it leads by its own clock, writes and commands
    assert a.controller.leader.leading_now()
    with pytest.raises(Deposed, match="epoch 2"):
        a.controller.store.add(DeploymentRow(
            id="d-late", model_id="small", model_name="small", version=1, status="pending", agent_id=None,
            url=None, reason=None, runtime="process", cpus=1, memory_mb=256, gpus=0, placement=[], created_by=None,
            created_at=T0, updated_at=T0))
    # then its write is not made, and it stops acting
    assert b.client.get("/controller/deployments/d-late").status_code == 404
    assert not a.controller.leader.leading_now()
    # and a late command (sent as it had it planned) is refused by the real agent with stale_leader
    with pytest.raises(Refused) as stale:
        send_command(agent.url, a.controller.credential, "/create-vm",
                     {"deployment_id": "d-late", "model_id": "small", "version": 1, "fence": 1},
                     timeout=5, retries=0)
    assert (stale.value.status, stale.value.code) == (409, "stale_leader")
    assert agent.runtime.started == []


def test_a_leader_told_stale_by_an_agent_stops_acting(make_pair: Any, tmp_path: Path) -> None:
    a, b = make_pair(f"sqlite:///{tmp_path / 'shared.db'}", lease_s=30)
    a.add_agent("agent-1")
    wait_for(lambda: b.controller.view.get("agent-1"), 10, "b to hear the agent")
    a.controller.reconciler.stop()
    expire(a.controller.leader.lease)
    assert b.controller.leader.claim()
    with pytest.raises(Refused):
        b.controller._command("agent-1", "/stop-vm", {"deployment_id": "d-none"})
    # when the old leader commands the agent before it noticed anything
    with pytest.raises(Deposed, match="refused its fence 1"):
        a.controller._command("agent-1", "/stop-vm", {"deployment_id": "d-none"})
    # then it is deposed at once: it refuses what only a leader does
    assert a.controller.leader.role() == "standby"
    assert a.deploy("small").status_code == 503


def test_nothing_is_placed_twice_while_both_run_passes(make_pair: Any, database_url: str) -> None:
    a, b = make_pair(database_url, lease_s=1.0)
    agents = [a.add_agent(f"agent-{i}", cpus=4) for i in range(3)]
    # when deployments are made while both controllers run their passes (the standby folding every message)
    ids = [a.deploy("half").json["deployment_id"] for _ in range(8)]
    for deployment_id in ids:
        a.until(deployment_id, lambda x: x["status"] == "running", "running")
    passes = b.controller.reconciler.passes
    wait_for(lambda: b.controller.reconciler.passes > passes + 5, 10, "the standby's passes")
    # then each is placed once, started once, on one agent; the standby decided nothing
    for deployment_id in ids:
        assert a.get(deployment_id)["generation"] == 1
    started = [d for agent in agents for d in agent.runtime.started]
    assert sorted(started) == sorted(ids)
    assert b.controller.leader.role() == "standby"
    assert not [e for e in b.controller.bus.on(DEPLOYMENT_EVENTS)]  # type: ignore[attr-defined]


def test_a_standby_decides_nothing_even_with_work_due(make_pair: Any, tmp_path: Path) -> None:
    a, b = make_pair(f"sqlite:///{tmp_path / 'shared.db'}", lease_s=30)
    a.controller.reconciler.stop()  # the leader is slow to act: the queue waits
    # given a pending deployment and a live agent
    d = a.deploy("small").json
    a.add_agent("agent-1")
    wait_for(lambda: b.controller.view.get("agent-1"), 10, "b to hear the agent")
    # when the standby runs passes
    for _ in range(5):
        b.controller.reconciler.tick()
    # then it places nothing: only the leader does
    assert b.get(d["deployment_id"])["status"] == "pending"
    # and once it leads (the old leader gone, its lease run out), its passes place it
    a.controller.leader.stop(release=False)
    expire(b.controller.leader.lease)
    assert b.controller.leader.claim()
    b.controller.reconciler.tick()
    placed = b.until(d["deployment_id"], lambda x: x["status"] == "running", "placed by b")
    assert (placed["agent_id"], placed["generation"]) == ("agent-1", 1)


def test_the_lease_is_timed_by_the_database_on_postgresql(request: pytest.FixtureRequest) -> None:
    # given the lease on PostgreSQL, whose clock the claims read (now()), not the host's
    with postgres_schema(request.getfixturevalue("postgres_url"), "lease") as url:
        lease = lease_on(url)
        won, held = lease.claim("a", None, None, ttl_s=5)
        with lease.engine.begin() as conn:
            stored = conn.execute(lease_table.select()).one()
            db_now = conn.execute(select(func.now())).scalar_one()
        # then it expires 5 s after the database's now, whatever the host's clock says
        assert won and abs((stored.expires_at - db_now).total_seconds() - 5) < 1
        assert stored.expires_at.tzinfo is not None
        with lease.engine.begin() as conn:
            conn.execute(update(lease_table).values(expires_at=db_now - timedelta(seconds=1)))
        # and once past it by the database's clock, another takes the lease at the next epoch
        won, taken = lease.claim("b", None, None, ttl_s=5)
        assert won and (taken.holder_id, taken.epoch) == ("b", 2)
        lease.engine.dispose()
