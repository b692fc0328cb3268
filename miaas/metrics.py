"""Prometheus metrics of one service, served at `GET /metrics` in the text exposition format.

Each app holds its own `CollectorRegistry` (`ServiceMetrics.registry`), never prometheus_client's global one:
tests build many apps in one process, and two apps of one process must not mix their counts.

Glossary:
- **route**: the URL rule that matched (`/deployments/<deployment_id>`), never the raw path, so the number of
  series stays bounded whatever a caller sends; `<unmatched>` for a request no rule matched (a 404).
- **snapshot collector**: a function called at each scrape that reads the service's current state (deployments
  by state, agent load) into metric families; nothing is kept between scrapes.

Who may read `/metrics` is decided by `miaas.web` (any signed identity, or the scrapers' bearer token
`MIAAS_METRICS_TOKEN` when one is set).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# The `_created` series double every counter's and histogram's series and no dashboard here reads them.
prometheus_client.disable_created_metrics()

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics", "counter", "gauge", "method_label", "UNMATCHED"]

UNMATCHED = "<unmatched>"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds: from a cached read (a millisecond) to a streamed upload or a deploy that waits (tens of seconds).
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def method_label(method: str) -> str:
    """The method as a label: one of the standard methods, else `other` (a caller may send any token)."""
    upper = method.upper()
    return upper if upper in METHODS else "other"


class SnapshotCollector(Collector):
    """A collector that asks `read()` for its metric families at each scrape.

    A failing read is logged and yields nothing, so one broken source never fails the whole scrape; the failures
    are counted in `miaas_metrics_collect_errors_total`."""

    def __init__(self, name: str, read: Callable[[], Iterable[Metric]], errors: Counter) -> None:
        self.name = name
        self.read = read
        self.errors = errors

    def collect(self) -> Iterable[Metric]:
        try:
            families = list(self.read())
        except Exception:  # noqa: BLE001 - a scrape shows what it can; the log and the counter say what failed
            log.exception("metrics source %s failed", self.name)
            self.errors.labels(source=self.name).inc()
            return []
        return families

    def describe(self) -> Iterable[Metric]:
        return []  # not read at registration: the source may not be ready yet


class ServiceMetrics:
    """The registry of one service app, with the HTTP metrics every service has."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "miaas_http_requests", "HTTP requests answered, by route (the URL rule), method and status",
            ["service", "route", "method", "status"], registry=self.registry)
        self.duration = Histogram(
            "miaas_http_request_duration_seconds",
            "Time from a request's arrival to its response (a streamed body's transfer not included)",
            ["service", "route", "method"], buckets=HTTP_BUCKETS, registry=self.registry)
        self.collect_errors = Counter(
            "miaas_metrics_collect_errors", "Scrapes at which a metrics source of the service failed (see its log)",
            ["source"], registry=self.registry)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method_label(method)
        self.requests.labels(self.service, route, method, str(status)).inc()
        self.duration.labels(self.service, route, method).observe(seconds)

    def register(self, collector: Collector) -> None:
        """Add a metric the service keeps itself (a Histogram made with `registry=None`, for instance)."""
        self.registry.register(collector)

    def collect_with(self, name: str, read: Callable[[], Iterable[Metric]]) -> None:
        """Call `read()` at every scrape for the current values of some metric families (see `gauge`)."""
        self.registry.register(SnapshotCollector(name, read, self.collect_errors))

    def exposition(self) -> bytes:
        """Every metric of the service in the text format (`CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)


def gauge(name: str, documentation: str, labels: Iterable[str], values: Mapping[tuple[str, ...], float] | float,
          ) -> GaugeMetricFamily:
    """A gauge family from its samples, keyed by label values (in `labels`' order); a bare number without labels."""
    return _family(GaugeMetricFamily, name, documentation, list(labels), values)


def counter(name: str, documentation: str, labels: Iterable[str], values: Mapping[tuple[str, ...], float] | float,
            ) -> CounterMetricFamily:
    """A counter family (a total kept elsewhere, read at the scrape); `name` without `_total`."""
    return _family(CounterMetricFamily, name, documentation, list(labels), values)


def _family(kind: Any, name: str, documentation: str, labels: list[str],
            values: Mapping[tuple[str, ...], float] | float) -> Any:
    if not isinstance(values, Mapping):
        if labels:
            raise ValueError(f"{name}: a bare value has no labels, but {labels} were named")
        return kind(name, documentation, value=float(values))
    family = kind(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        if len(key) != len(labels):
            raise ValueError(f"{name}: sample {key} does not match the labels {labels}")
        family.add_metric(list(key), float(value))
    return family
