"""Who may call the controller: every route but /health, /openapi.json and the join wants a signature; deploy and
stop are the portal's and the operators'; the records, agents and bus the model registry's too; an
Idempotency-Key belongs to the identity and the person it acts for."""

from __future__ import annotations

from typing import Any

import pytest

from miaas.identity import ADMIN, FRONTEND, MODEL_REGISTRY, ROLES

PUBLIC = {"/health", "/openapi.json", "/controller/join"}
DEPLOYERS = {FRONTEND, ADMIN}
READERS = {FRONTEND, ADMIN, MODEL_REGISTRY}


def test_every_route_but_the_public_ones_refuses_an_unsigned_request(make_cluster: Any) -> None:
    cluster = make_cluster()
    unsigned = cluster.pki.client(cluster.app, None)
    rules = [r for r in cluster.app.url_map.iter_rules() if r.endpoint != "static"]
    assert {r.rule for r in rules} >= PUBLIC | {"/controller/deploy", "/controller/identities/revoked"}
    for rule in rules:
        path = rule.rule.replace("<deployment_id>", "d-1")
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            resp = unsigned.open(path, method=method, json={})
            if rule.rule in PUBLIC:
                assert resp.status_code != 401, (method, path)
            else:
                assert resp.status_code == 401, (method, path, resp.json)
                assert resp.json["error"]["details"]["reason"] == "unsigned"


@pytest.mark.parametrize("role", ROLES)
def test_each_route_takes_the_roles_of_the_table(make_cluster: Any, role: str) -> None:
    cluster = make_cluster()
    client = cluster.pki.client(cluster.app, role)
    deployed = client.post("/controller/deploy", json={"model_id": "small"})
    assert deployed.status_code == (202 if role in DEPLOYERS else 403), deployed.json
    stopped = client.post("/controller/stop", json={"deployment_id": "d-404"})
    assert stopped.status_code == (404 if role in DEPLOYERS else 403), stopped.json
    for path in ("/controller/deployments", "/controller/agents", "/controller/bus"):
        resp = client.get(path)
        assert resp.status_code == (200 if role in READERS else 403), (path, resp.json)
        if resp.status_code == 403:
            assert resp.json["error"]["code"] == "forbidden_role" and role in resp.json["error"]["message"]
    assert client.get("/controller/deployments/d-404").status_code == (404 if role in READERS else 403)


def test_only_the_portal_acts_for_a_person(make_cluster: Any) -> None:
    cluster = make_cluster()
    for role in (ADMIN, MODEL_REGISTRY):  # roles that may read, but not for someone else
        resp = cluster.pki.client(cluster.app, role, user="alice").get("/controller/deployments")
        assert resp.status_code == 403 and resp.json["error"]["code"] == "forbidden_user_header", role
    portal = cluster.pki.client(cluster.app, FRONTEND, user="alice")
    assert portal.post("/controller/deploy", json={"model_id": "small"}).status_code == 202


def test_an_idempotency_key_is_the_callers_own(make_cluster: Any) -> None:
    # given the same key sent by two people through the portal, and by an operator
    cluster = make_cluster()
    callers = {"alice": cluster.pki.client(cluster.app, FRONTEND, user="alice"),
               "bob": cluster.pki.client(cluster.app, FRONTEND, user="bob"),
               "operator": cluster.pki.client(cluster.app, ADMIN, subject="alice")}
    made = {}
    for name, client in callers.items():
        resp = client.post("/controller/deploy", json={"model_id": "small"}, headers={"Idempotency-Key": '"k-1"'})
        assert resp.status_code == 202, resp.json
        made[name] = resp.json["deployment_id"]
    # then each got a deployment of its own
    assert len(set(made.values())) == 3
    # and a retry by one of them answers that one's
    again = callers["alice"].post("/controller/deploy", json={"model_id": "small"},
                                  headers={"Idempotency-Key": '"k-1"'})
    assert again.json["deployment_id"] == made["alice"]
    assert len(cluster.controller.store.all()) == 3
