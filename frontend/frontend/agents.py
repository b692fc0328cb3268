"""Agents: capacity, state, live load charts (inline SVG) and the deployments on each; the bus view."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from flask import Blueprint, abort, render_template, request

from frontend.backends import Backends
from frontend.busview import BusInspector, BusView
from frontend.charts import chart, lines_of, sparkline
from frontend.live import BusFollower, LiveFeed, LoadHistory
from frontend.notices import notify_failure
from frontend.security import username
from frontend.settings import FrontendSettings
from miaas import identity
from miaas.errors import MiaasError
from miaas.schemas import AgentView, Deployment

PAGE_SIZE = 50
REFUSAL_TEXT = {  # why a bus message was not believed, as the bus page says it
    identity.UNSIGNED: "not signed",
    identity.BAD_CERTIFICATE: "a certificate not of this cluster, or expired",
    identity.BAD_SIGNATURE: "a signature that does not match",
    identity.REVOKED: "signed by a revoked identity",
    identity.REPLAYED: "replayed (a sequence number already seen)",
    identity.STALE: "signed too long ago",
    identity.IMPERSONATION: "signed by one identity, speaking for another",
}
STATES = ("alive", "suspect", "lost")
Page = str | tuple[str, int]


def build_agents(backends: Backends, history: LoadHistory, clock: Callable[[], float]) -> Blueprint:
    bp = Blueprint("agents", __name__)

    @bp.get("/agents")
    def agents() -> Page:
        """Agents a page at a time (filter by state, search by id), with their load over the last minutes."""
        state = request.args.get("state", "")
        state = state if state in STATES else ""
        q = request.args.get("q", "").strip()[:128]
        number = request.args.get("page", "1")
        page_no = int(number) if number.isdigit() and 0 < int(number) < 1_000_000 else 1
        items: list[dict[str, Any]] = []
        on_page: list[AgentView] = []
        status = 200
        try:
            items = backends.agents_raw(username())
        except MiaasError as exc:
            status = notify_failure(exc)
        counts = Counter(a["state"] for a in items)
        needle = q.lower()
        shown = sorted((a for a in items if (not state or a["state"] == state) and needle in a["agent_id"].lower()),
                       key=lambda a: a["agent_id"])
        pages = max(1, math.ceil(len(shown) / PAGE_SIZE))
        try:
            on_page = backends.to_views(shown[(page_no - 1) * PAGE_SIZE:page_no * PAGE_SIZE])
        except MiaasError as exc:
            status = notify_failure(exc)
        now = clock()
        sparks = {}
        for a in on_page:
            samples = history.series(a.agent_id, now)
            sparks[a.agent_id] = (
                sparkline([(s.at, s.cpu_percent) for s in samples], now, history.window_s, "cpu", "CPU"),
                sparkline([(s.at, s.memory_percent) for s in samples], now, history.window_s, "mem", "Memory"),
            )
        template = "_agents_table.html" if request.args.get("fragment") else "agents.html"
        return render_template(template, agents=on_page, total=len(items), matching=len(shown), counts=counts,
                               states=STATES, state=state, q=q, page=page_no, pages=pages, sparks=sparks,
                               minutes=history.window_s / 60), status

    @bp.get("/agents/<agent_id>")
    def agent(agent_id: str) -> Page:
        """One agent: capacity, state, load charts, and the deployments it runs."""
        if len(agent_id) > 128:
            abort(404)
        found: AgentView | None = None
        placed: dict[str, Deployment] = {}
        status = 200
        try:
            raw = next((a for a in backends.agents_raw(username()) if a["agent_id"] == agent_id), None)
            if raw is None:
                abort(404, f"No agent {agent_id} is known to the controller.")
            [found] = backends.to_views([raw])
            placed = {d.deployment_id: d for d in backends.list_deployments(username(), active="true")
                      if d.agent_id == agent_id}
        except MiaasError as exc:
            status = notify_failure(exc)
        now = clock()
        lines = lines_of(history.series(agent_id, now))
        charts = [chart([ln for ln in lines if ln.css in ("cpu", "mem")], now, history.window_s, "CPU and memory")]
        if any(ln.css.startswith("gpu") for ln in lines):
            charts.append(chart([ln for ln in lines if ln.css.startswith("gpu")], now, history.window_s, "GPU"))
        template = "_agent_charts.html" if request.args.get("fragment") else "agent.html"
        return render_template(template, agent_id=agent_id, a=found, placed=placed, charts=charts, lines=lines,
                               minutes=history.window_s / 60), status

    return bp


def build_bus(inspector: BusInspector, settings: FrontendSettings, feed: LiveFeed,
              follower: BusFollower | None) -> Blueprint:
    bp = Blueprint("bus", __name__)

    @bp.get("/bus")
    def bus() -> Page:
        """Topics, partitions, offsets, consumer groups and lag, message rates: read from the broker itself; and
        what the portal's own consumer skipped or refused, per reason."""
        view: BusView | None = None
        status = 200
        try:
            view = inspector.inspect()
        except MiaasError as exc:
            status = notify_failure(exc)
        stats = follower.stats() if follower is not None else None
        skips = sorted((stats.skipped_by_reason if stats else {}).items())
        template = "_bus_body.html" if request.args.get("fragment") else "bus.html"
        return render_template(template, view=view, kafka_ui_url=settings.kafka_ui_url,
                               followers=feed.subscribers, consumer=stats,
                               refusals=[(r, n) for r, n in skips if r in identity.REFUSAL_REASONS],
                               skips=[(r, n) for r, n in skips if r not in identity.REFUSAL_REASONS],
                               reasons=REFUSAL_TEXT), status

    return bp
