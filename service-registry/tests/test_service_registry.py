"""The service registry: registration, heartbeats, expiry, several instances, identity, auth."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import requests

from miaas.discovery import Discovery, Registration
from miaas.errors import Unavailable
from service_registry.app import create_app
from service_registry.settings import ServiceRegistrySettings


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(service_token: str, clock: Clock):  # type: ignore[no-untyped-def]
    app = create_app(ServiceRegistrySettings(service_token=service_token, ttl_s=15), clock)
    c = app.test_client()
    c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {service_token}"
    return c


def register(client, name: str = "agent", url: str = "http://h:1", **kw):  # type: ignore[no-untyped-def]
    return client.post("/register", json={"name": name, "url": url, **kw})


def test_registered_instance_is_found_by_name(client) -> None:  # type: ignore[no-untyped-def]
    given = register(client, metadata={"zone": "a"})
    assert given.status_code == 201
    found = client.get("/getServiceInfo?name=agent")
    assert found.status_code == 200
    assert found.json["url"] == "http://h:1"
    assert found.json["metadata"] == {"zone": "a"}
    assert found.json["instance_id"] == given.json["instance_id"]


def test_instance_expires_without_heartbeats_and_heartbeats_renew(client, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    a = register(client, url="http://a:1").json["instance_id"]
    register(client, url="http://b:1")
    clock.advance(10)
    assert client.post("/heartbeat", json={"instance_id": a}).status_code == 200
    clock.advance(10)  # b is 20 s old now, a only 10 s
    services = client.get("/services").json["services"]
    assert [i["url"] for i in services["agent"]] == ["http://a:1"]
    clock.advance(20)
    assert client.get("/getServiceInfo?name=agent").status_code == 404
    gone = client.post("/heartbeat", json={"instance_id": a})
    assert gone.status_code == 404
    assert "register again" in gone.json["error"]["message"]


def test_several_instances_take_turns(client) -> None:  # type: ignore[no-untyped-def]
    register(client, url="http://a:1")
    register(client, url="http://b:1")
    urls = {client.get("/getServiceInfo?name=agent").json["url"] for _ in range(4)}
    assert urls == {"http://a:1", "http://b:1"}


def test_an_instance_id_cannot_be_taken_by_another_service(client) -> None:  # type: ignore[no-untyped-def]
    register(client, name="agent", instance_id="node-1")
    stolen = register(client, name="controller", instance_id="node-1")
    assert stolen.status_code == 409
    assert "belongs to service 'agent'" in stolen.json["error"]["message"]


def test_re_registering_with_own_id_updates_instead_of_duplicating(client) -> None:  # type: ignore[no-untyped-def]
    register(client, instance_id="node-1", url="http://old:1")
    register(client, instance_id="node-1", url="http://new:1")
    assert [i["url"] for i in client.get("/services").json["services"]["agent"]] == ["http://new:1"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"url": "http://h:1"}, "name"),
        ({"name": "Bad Name!", "url": "http://h:1"}, "name"),
        ({"name": "agent", "url": "ftp://h"}, "url"),
        ({"name": "agent", "url": "http://h:1", "colour": "red"}, "colour"),
    ],
)
def test_bad_registration_is_a_400_naming_the_field(client, body, field) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/register", json=body)
    assert resp.status_code == 400
    assert resp.json["error"]["code"] == "validation_error"
    assert field in resp.json["error"]["message"]


def test_every_route_but_health_needs_the_service_token(service_token: str, clock: Clock) -> None:
    app = create_app(ServiceRegistrySettings(service_token=service_token), clock)
    anonymous = app.test_client()
    assert anonymous.get("/health").status_code == 200
    for method, path in [("get", "/services"), ("get", "/getServiceInfo?name=x"), ("post", "/register"),
                         ("get", "/openapi.json")]:
        resp = getattr(anonymous, method)(path, headers={"Authorization": "Bearer wrong-token"})
        assert resp.status_code == 401, path
        assert resp.json["error"]["code"] == "unauthorized"


def test_openapi_documents_the_routes_from_their_schemas(client) -> None:  # type: ignore[no-untyped-def]
    doc = client.get("/openapi.json").json
    assert {"/register", "/heartbeat", "/getServiceInfo", "/services", "/register/{instance_id}", "/health"} <= set(
        doc["paths"]
    )
    assert "RegisterRequest" in doc["components"]["schemas"]
    assert doc["paths"]["/getServiceInfo"]["get"]["parameters"][0]["name"] == "name"


def test_registration_and_discovery_over_real_http(service_token: str, serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(create_app(ServiceRegistrySettings(service_token=service_token, ttl_s=30)))
    reg = Registration(server.url, service_token, name="model-registry", url="http://mr:9", interval_s=0.05)
    reg.start()
    try:
        assert Discovery(server.url, service_token).lookup("model-registry") == "http://mr:9"
    finally:
        reg.stop()
    with pytest.raises(Unavailable, match="model-registry"):
        Discovery(server.url, service_token).lookup("model-registry")
    resp = requests.get(f"{server.url}/services", timeout=5)
    assert resp.status_code == 401
