"""`GET /metrics` of a service app, over real HTTP: the HTTP counters and latency histogram move with requests, a
request is labelled by its URL rule (never its raw path or an invented method), and only a signed identity, or a
scraper with the bearer token MIAAS_METRICS_TOKEN when one is set, may read it."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from miaas import identity
from miaas.client import Signer
from miaas.metrics import CONTENT_TYPE_LATEST, UNMATCHED, ServiceMetrics, gauge
from miaas.serve import Server
from miaas.testing import Pki
from service_registry.app import create_app
from service_registry.settings import ServiceRegistrySettings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def registry_app(pki: Pki, **settings: Any) -> Any:
    return create_app(ServiceRegistrySettings(**pki.settings("service-registry"), ttl_s=30, **settings))


def signed(pki: Pki, role: str = identity.ADMIN) -> Signer:
    return Signer(identity.fixed(pki.credential(f"reader-{role}", role,
                                                url="http://127.0.0.1:1" if role == identity.AGENT else None)))


def scrape(server: Server, **kw: Any) -> Samples:
    """Every sample of the service's /metrics, keyed by name and labels."""
    resp = requests.get(f"{server.url}/metrics", timeout=10, **kw)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def label_values(samples: Samples, label: str) -> set[str]:
    return {v for (_, labels) in samples for k, v in labels if k == label}


@pytest.fixture
def server(pki: Pki, serve: Callable[[Any], Server]) -> Server:
    return serve(registry_app(pki))


def test_each_request_moves_its_counter_and_its_latency_histogram(pki: Pki, server: Server) -> None:
    # given a first look at the service's metrics
    auth = signed(pki)
    before = scrape(server, auth=auth)
    # when /health is asked three times and /services once, signed
    for _ in range(3):
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/services", timeout=10, auth=auth).status_code == 200
    after = scrape(server, auth=auth)
    # then each is counted under its route, method and status, and timed
    health = {"service": "service-registry", "route": "/health", "method": "GET"}
    assert value(after, "miaas_http_requests_total", **health, status="200") \
        - value(before, "miaas_http_requests_total", **health, status="200") == 3
    assert value(after, "miaas_http_request_duration_seconds_count", **health) \
        - value(before, "miaas_http_request_duration_seconds_count", **health) == 3
    assert value(after, "miaas_http_request_duration_seconds_sum", **health) > \
        value(before, "miaas_http_request_duration_seconds_sum", **health)
    assert value(after, "miaas_http_requests_total", service="service-registry", route="/services", method="GET",
                 status="200") == 1
    # and the first scrape itself was counted by the second
    assert value(after, "miaas_http_requests_total", service="service-registry", route="/metrics", method="GET",
                 status="200") >= 1


def test_a_request_is_labelled_by_its_rule_never_by_its_raw_path_or_method(pki: Pki, server: Server) -> None:
    # given requests to one rule with many ids, to paths no rule matches, and with an invented method
    auth = signed(pki)
    for n in range(5):
        requests.delete(f"{server.url}/register/instance-{n}", timeout=10, auth=auth)
        requests.get(f"{server.url}/no/such/path-{n}", timeout=10)
    requests.request("BREW", f"{server.url}/health", timeout=10)
    samples = scrape(server, auth=auth)
    # then the ids and paths are nowhere among the labels: the rule, `<unmatched>` and `other` stand for them
    routes = label_values(samples, "route")
    assert "/register/<instance_id>" in routes and UNMATCHED in routes
    assert not [r for r in routes if "instance-" in r or "path-" in r], routes
    assert value(samples, "miaas_http_requests_total", service="service-registry", route=UNMATCHED, method="GET",
                 status="404") == 5
    assert label_values(samples, "method") <= {"GET", "DELETE", "other"}
    assert value(samples, "miaas_http_requests_total", service="service-registry", route=UNMATCHED,
                 method="other", status="405") == 1  # no rule takes BREW
    assert sum(v for (name, labels), v in samples.items() if name == "miaas_http_requests_total"
               and ("route", "/register/<instance_id>") in labels) == 5


def test_metrics_are_refused_to_an_unsigned_request_and_to_another_ca(pki: Pki, server: Server, tmp_path: Any) -> None:
    # when /metrics is asked with no credential, with a bearer token while none is set, and signed by another CA
    anonymous = requests.get(f"{server.url}/metrics", timeout=10)
    bearer = requests.get(f"{server.url}/metrics", timeout=10, headers={"Authorization": "Bearer " + "x" * 32})
    foreign = requests.get(f"{server.url}/metrics", timeout=10, auth=signed(Pki(tmp_path / "other")))
    # then each is refused, saying why
    assert (anonymous.status_code, anonymous.json()["error"]["details"]["reason"]) == (401, identity.UNSIGNED)
    assert (bearer.status_code, bearer.json()["error"]["details"]["reason"]) == (401, identity.UNSIGNED)
    assert (foreign.status_code, foreign.json()["error"]["details"]["reason"]) == (401, "bad_certificate")
    assert "miaas_http_requests_total" not in anonymous.text
    # and the refusals are counted too, by status and by reason
    samples = scrape(server, auth=signed(pki))
    assert value(samples, "miaas_http_requests_total", service="service-registry", route="/metrics", method="GET",
                 status="401") == 3
    assert value(samples, "miaas_http_refused_total", service="service-registry", reason=identity.UNSIGNED) == 2
    assert value(samples, "miaas_http_refused_total", service="service-registry", reason="bad_certificate") == 1


@pytest.mark.parametrize("role", identity.ROLES)
def test_every_signed_identity_may_read_the_metrics(pki: Pki, role: str) -> None:
    app = registry_app(pki)
    resp = pki.client(app, role, url="http://127.0.0.1:1" if role == identity.AGENT else None).get("/metrics")
    assert resp.status_code == 200, resp.json
    assert "miaas_http_requests_total" in resp.text


def test_a_scraper_with_the_token_may_read_the_metrics_and_nothing_else(pki: Pki,
                                                                       serve: Callable[[Any], Server]) -> None:
    # given a service with a metrics token
    token = secrets.token_hex(16)
    server = serve(registry_app(pki, metrics_token=token))
    # then the token opens /metrics, unsigned, and a signed identity still may
    scrape(server, headers={"Authorization": f"Bearer {token}"})
    samples = scrape(server, auth=signed(pki))
    assert value(samples, "miaas_http_requests_total", service="service-registry", route="/metrics", method="GET",
                 status="200") == 1
    # but a wrong token is refused as such, and the token opens no other route
    wrong = requests.get(f"{server.url}/metrics", timeout=10, headers={"Authorization": f"Bearer {token[:-1]}x"})
    assert (wrong.status_code, wrong.json()["error"]["details"]["reason"]) == (401, "bad_metrics_token")
    assert "MIAAS_METRICS_TOKEN" in wrong.json()["error"]["message"]
    assert value(scrape(server, auth=signed(pki)), "miaas_http_refused_total", service="service-registry",
                 reason="bad_metrics_token") == 1
    other = requests.get(f"{server.url}/services", timeout=10, headers={"Authorization": f"Bearer {token}"})
    assert (other.status_code, other.json()["error"]["details"]["reason"]) == (401, identity.UNSIGNED)


@pytest.mark.parametrize("token", ["short-token", "change-me-" + "x" * 30, "password"])
def test_a_weak_metrics_token_is_refused_at_start(pki: Pki, token: str) -> None:
    with pytest.raises(ValidationError, match="MIAAS_METRICS_TOKEN"):
        ServiceRegistrySettings(**pki.settings("service-registry"), metrics_token=token)


def test_two_apps_of_one_process_keep_their_own_counts(pki: Pki) -> None:
    first, second = registry_app(pki), registry_app(pki)
    for _ in range(4):
        first.test_client().get("/health")
    count = 'miaas_http_requests_total{method="GET",route="/health",service="service-registry",status="200"}'
    assert f"{count} 4.0" in pki.client(first).get("/metrics").text
    assert count not in pki.client(second).get("/metrics").text


def test_a_failing_metrics_source_is_counted_and_the_scrape_still_answers(pki: Pki) -> None:
    # given a service with a source that works and one that fails
    app = registry_app(pki)
    metrics: ServiceMetrics = app.extensions["miaas_metrics"]
    metrics.collect_with("good", lambda: [gauge("miaas_test_things", "things", ["state"], {("on",): 2})])

    def broken() -> list[Any]:
        raise RuntimeError("the store is gone")

    metrics.collect_with("broken", broken)
    # when scraped three times
    client = pki.client(app)
    client.get("/metrics")
    client.get("/metrics")
    resp = client.get("/metrics")
    # then the good source shows, and the broken one is counted at each scrape (visible from the next one)
    assert resp.status_code == 200
    assert 'miaas_test_things{state="on"} 2.0' in resp.text
    assert 'miaas_metrics_collect_errors_total{source="broken"} 2.0' in resp.text


def test_a_gauge_refuses_samples_that_do_not_match_its_labels() -> None:
    with pytest.raises(ValueError, match="does not match the labels"):
        gauge("miaas_x", "x", ["a", "b"], {("only-one",): 1})
    with pytest.raises(ValueError, match="a bare value has no labels"):
        gauge("miaas_x", "x", ["a"], 3)


def test_the_grafana_dashboard_reads_only_metrics_the_services_expose() -> None:
    root = Path(__file__).resolve().parents[1]
    dashboard = json.loads((root / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    sources = "".join(p.read_text() for folder in ("miaas", "controller/controller", "agent/agent",
                                                   "model-registry/model_registry")
                      for p in (root / folder).rglob("*.py"))
    declared = set(re.findall(r'"(miaas_[a-z_]+)"', sources))

    def exposed(name: str) -> bool:
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        return name in declared or base in declared

    used = {n for e in exprs for n in re.findall(r"\bmiaas_[a-z_]+", e)}
    assert used and not {n for n in used if not exposed(n)}, sorted(n for n in used if not exposed(n))
    assert {"miaas_http_requests_total", "miaas_http_request_duration_seconds_bucket", "miaas_deployments",
            "miaas_bus_messages_refused_total", "miaas_placement_duration_seconds_bucket",
            "miaas_agent_cpu_percent"} <= used
