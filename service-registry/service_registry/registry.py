"""The phone book: instances by name, renewed by heartbeats, expired by a TTL. Pure logic: the clock is passed in."""

from __future__ import annotations

import itertools
import threading
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from miaas.errors import Conflict, Forbidden, NotFound
from miaas.schemas import RegisterRequest, ServiceInstance


@dataclass(frozen=True)
class Instance:
    instance_id: str
    name: str
    url: str
    metadata: dict[str, Any]
    registered_at: datetime
    last_heartbeat: datetime
    owner: str = ""
    """The identity (certificate subject) that registered it: only it may renew, change or remove it."""

    def expires_at(self, ttl: timedelta) -> datetime:
        return self.last_heartbeat + ttl

    def to_wire(self, ttl: timedelta) -> ServiceInstance:
        return ServiceInstance(
            instance_id=self.instance_id,
            name=self.name,
            url=self.url,
            metadata=self.metadata,
            registered_at=self.registered_at,
            last_heartbeat=self.last_heartbeat,
            expires_at=self.expires_at(ttl),
        )


@dataclass
class Registry:
    """Live instances of every service. Thread-safe."""

    ttl: timedelta
    _instances: dict[str, Instance] = field(default_factory=dict)
    _turns: dict[str, itertools.count[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, req: RegisterRequest, now: datetime, owner: str = "") -> Instance:
        """Add an instance, or renew one that presents its own id again; an id is never handed to another name
        nor to another owner."""
        with self._lock:
            self._expire(now)
            if req.instance_id and req.instance_id in self._instances:
                known = self._instances[req.instance_id]
                _check_owner(known, owner)
                if known.name != req.name:
                    raise Conflict(
                        f"instance id '{req.instance_id}' belongs to service '{known.name}', not '{req.name}'"
                    )
                inst = replace(known, url=req.url, metadata=dict(req.metadata), last_heartbeat=now)
            else:
                inst = Instance(
                    instance_id=req.instance_id or uuid.uuid4().hex,
                    name=req.name,
                    url=req.url.rstrip("/"),
                    metadata=dict(req.metadata),
                    registered_at=now,
                    last_heartbeat=now,
                    owner=owner,
                )
            self._instances[inst.instance_id] = inst
            return inst

    def heartbeat(self, instance_id: str, now: datetime, owner: str = "") -> Instance:
        with self._lock:
            self._expire(now)
            inst = self._instances.get(instance_id)
            if inst is None:
                raise NotFound(f"instance '{instance_id}' is not registered (expired?); register again")
            _check_owner(inst, owner)
            inst = replace(inst, last_heartbeat=now)
            self._instances[instance_id] = inst
            return inst

    def deregister(self, instance_id: str, owner: str = "") -> None:
        with self._lock:
            inst = self._instances.get(instance_id)
            if inst is None:
                raise NotFound(f"instance '{instance_id}' is not registered")
            _check_owner(inst, owner)
            del self._instances[instance_id]

    def lookup(self, name: str, now: datetime) -> Instance:
        """A live instance of `name`, taking turns among several."""
        with self._lock:
            self._expire(now)
            live = sorted((i for i in self._instances.values() if i.name == name), key=lambda i: i.instance_id)
            if not live:
                raise NotFound(f"no live instance of service '{name}'")
            turn = next(self._turns.setdefault(name, itertools.count()))
            return live[turn % len(live)]

    def instances(self, now: datetime) -> dict[str, list[Instance]]:
        with self._lock:
            self._expire(now)
            out: dict[str, list[Instance]] = {}
            for inst in sorted(self._instances.values(), key=lambda i: (i.name, i.instance_id)):
                out.setdefault(inst.name, []).append(inst)
            return out

    def _expire(self, now: datetime) -> None:
        dead = [k for k, i in self._instances.items() if i.expires_at(self.ttl) <= now]
        for k in dead:
            del self._instances[k]


def _check_owner(inst: Instance, owner: str) -> None:
    if inst.owner != owner:
        raise Forbidden(f"instance '{inst.instance_id}' of '{inst.name}' belongs to another identity",
                        code="not_owner")
