"""The service registry: registration, heartbeats, expiry, several instances, identity, ownership, auth."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import requests

from miaas import identity
from miaas.client import ServiceClient
from miaas.discovery import Discovery, Registration
from miaas.errors import RemoteError, Unavailable, UpstreamError
from miaas.testing import Pki
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
def app(pki: Pki, clock: Clock):  # type: ignore[no-untyped-def]
    return create_app(ServiceRegistrySettings(**pki.settings("service-registry"), ttl_s=15), clock)


@pytest.fixture
def client(pki: Pki, app):  # type: ignore[no-untyped-def]
    return pki.client(app, "admin")  # an operator may register any name


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


def test_every_route_but_health_and_openapi_needs_a_signed_request(pki: Pki, app) -> None:  # type: ignore[no-untyped-def]
    anonymous = pki.client(app, None)
    assert anonymous.get("/health").status_code == 200
    assert anonymous.get("/openapi.json").status_code == 200
    other_ca = Pki(pki.root / "other")
    for method, path in [("get", "/services"), ("get", "/getServiceInfo?name=x"), ("post", "/register"),
                         ("post", "/heartbeat"), ("delete", "/register/x")]:
        resp = getattr(anonymous, method)(path, headers={"Authorization": "Bearer anything"})
        assert resp.status_code == 401, path
        assert resp.json["error"]["details"]["reason"] == "unsigned"
        foreign = getattr(other_ca.client(app, "admin"), method)(path)
        assert foreign.status_code == 401, path
        assert foreign.json["error"]["details"]["reason"] == "bad_certificate"


def test_a_service_registers_only_under_its_own_name_and_an_agent_only_at_its_url(pki: Pki, app) -> None:  # type: ignore[no-untyped-def]
    registry = pki.client(app, "model-registry")
    assert register(registry, name="model-registry", url="http://mr:1").status_code == 201
    posing = register(registry, name="controller", url="http://evil:1")
    assert posing.status_code == 403
    assert posing.json["error"]["code"] == "forbidden_name"
    agent = pki.client(app, "agent", "agent-1", url="http://agent-1:9000")
    assert register(agent, name="agent", url="http://agent-1:9000").status_code == 201
    elsewhere = register(agent, name="agent", url="http://evil:9000")
    assert elsewhere.status_code == 403
    assert elsewhere.json["error"]["code"] == "forbidden_url"
    assert [i["url"] for i in registry.get("/services").json["services"]["agent"]] == ["http://agent-1:9000"]


def test_only_the_owner_renews_changes_or_removes_an_instance(pki: Pki, app) -> None:  # type: ignore[no-untyped-def]
    owner = pki.client(app, "controller")
    other = pki.client(app, "controller", "controller-b")  # same role, another identity
    mine = register(owner, name="controller", url="http://c:1", instance_id="c-1").json["instance_id"]
    taken = register(other, name="controller", url="http://evil:1", instance_id=mine)
    assert taken.status_code == 403
    assert taken.json["error"]["code"] == "not_owner"
    assert other.post("/heartbeat", json={"instance_id": mine}).status_code == 403
    assert other.delete(f"/register/{mine}").status_code == 403
    assert owner.get("/getServiceInfo?name=controller").json["url"] == "http://c:1"
    assert owner.post("/heartbeat", json={"instance_id": mine}).status_code == 200
    assert owner.delete(f"/register/{mine}").status_code == 204


def test_a_person_header_from_a_service_and_a_revoked_or_replayed_request_are_refused(pki: Pki, app) -> None:  # type: ignore[no-untyped-def]
    as_alice = pki.client(app, "controller", user="alice")
    resp = as_alice.get("/services")
    assert resp.status_code == 403
    assert resp.json["error"]["code"] == "forbidden_user_header"
    assert pki.client(app, "frontend", user="alice").get("/services").status_code == 200

    cred = pki.credential("model-registry")
    c = pki.client(app, credential=cred)
    assert c.get("/services").status_code == 200
    app.extensions["miaas_trust"].revocations.update([cred.cert.serial])
    revoked = c.get("/services")
    assert revoked.status_code == 401
    assert revoked.json["error"]["details"]["reason"] == "revoked"

    headers = identity.sign_request(pki.credential("frontend"), "GET", "/services", "localhost",
                                    identity.body_digest(b""), __import__("time").time())
    plain = pki.client(app, None)
    assert plain.get("/services", headers=headers).status_code == 200
    again = plain.get("/services", headers=headers)
    assert again.status_code == 401
    assert again.json["error"]["details"]["reason"] == "replayed"
    other_path = plain.get("/getServiceInfo?name=x", headers=headers)
    assert other_path.status_code == 401
    assert other_path.json["error"]["details"]["reason"] == "bad_signature"


def test_openapi_documents_the_routes_from_their_schemas(client) -> None:  # type: ignore[no-untyped-def]
    doc = client.get("/openapi.json").json
    assert {"/register", "/heartbeat", "/getServiceInfo", "/services", "/register/{instance_id}", "/health"} <= set(
        doc["paths"]
    )
    assert "RegisterRequest" in doc["components"]["schemas"]
    assert doc["paths"]["/getServiceInfo"]["get"]["parameters"][0]["name"] == "name"


def test_registration_and_discovery_over_real_http(pki: Pki, serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(create_app(ServiceRegistrySettings(**pki.settings("service-registry"), ttl_s=30)))
    reg = Registration(server.url, pki.credential("model-registry"), name="model-registry", url="http://mr:9",
                       interval_s=0.05)
    reg.start()
    try:
        assert Discovery(server.url, pki.credential("frontend")).lookup("model-registry") == "http://mr:9"
    finally:
        reg.stop()
    with pytest.raises(Unavailable, match="model-registry"):
        Discovery(server.url, pki.credential("frontend")).lookup("model-registry")
    resp = requests.get(f"{server.url}/services", timeout=5)
    assert resp.status_code == 401
    assert resp.json()["error"]["details"]["reason"] == "unsigned"
    # Signed over real HTTP, with a query string and a JSON body: what the signer signs is what arrives.
    client = ServiceClient(server.url, pki.credential("controller"))
    assert client.post("/register", json={"name": "controller", "url": "http://c:1"})["name"] == "controller"
    assert client.get("/getServiceInfo", params={"name": "controller"})["url"] == "http://c:1"
    with pytest.raises(RemoteError) as gone:  # a percent-encoded path is signed as sent: past auth, a plain 404
        client.delete("/register/no such id")
    assert gone.value.status == 404
    stranger = ServiceClient(server.url, Pki(pki.root / "stranger").credential("controller"))
    with pytest.raises(UpstreamError, match="401"):
        stranger.get("/services")
