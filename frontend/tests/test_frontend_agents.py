"""Agents: paging, filters, load charts (inline SVG) from the recent metrics, the deployments on an agent."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from flask import Flask

from frontend.charts import Line, chart, sparkline, thin
from frontend.live import LoadHistory
from miaas.schemas import AgentCapacity, AgentLoad, AgentMetrics, GpuMetrics


def metrics(agent_id: str, cpu: float, mem: float, gpus: list[GpuMetrics] | None = None) -> AgentMetrics:
    return AgentMetrics(agent_id=agent_id, url="http://x", capacity=AgentCapacity(cpus=4, memory_mb=8192),
                        load=AgentLoad(cpu_percent=cpu, memory_percent=mem, gpus=gpus or []),
                        sent_at=datetime.now(UTC))


def test_the_history_keeps_only_the_window() -> None:
    history = LoadHistory(window_s=60)
    for t in range(0, 200, 10):
        history.observe(metrics("a1", cpu=t / 2, mem=10), now=float(t))
    kept = history.series("a1", now=190.0)
    assert [s.at for s in kept] == [130.0, 140.0, 150.0, 160.0, 170.0, 180.0, 190.0]
    assert history.series("nobody", now=190.0) == []


def test_gpu_load_is_the_mean_of_the_gpus() -> None:
    history = LoadHistory(window_s=60)
    gpus = [GpuMetrics(index=0, utilization_percent=20, memory_used_mb=1000, memory_total_mb=4000),
            GpuMetrics(index=1, utilization_percent=60, memory_used_mb=3000, memory_total_mb=4000)]
    history.observe(metrics("a1", cpu=1, mem=2, gpus=gpus), now=0.0)
    [sample] = history.series("a1", now=0.0)
    assert (sample.gpu_percent, sample.gpu_memory_percent) == (40.0, 50.0)


def test_thinning_keeps_the_shape_and_the_last_point() -> None:
    points = [(float(t), float(t % 10)) for t in range(1000)]
    thinned = thin(points, 40)
    assert len(thinned) == 40 and thinned[-1] == points[-1]
    assert all(0 <= v <= 9 for _, v in thinned)
    assert thin(points[:5], 40) == points[:5]


def test_a_chart_is_an_svg_with_an_accessible_summary() -> None:
    svg = chart([Line("CPU", "cpu", [(0.0, 10.0), (60.0, 50.0)]), Line("Memory", "mem", [(60.0, 30.0)])],
                now=60.0, window_s=600, title="CPU and memory")
    assert svg.startswith('<svg class="chart"') and svg.endswith("</svg>")
    assert 'role="img" aria-label="CPU and memory: CPU 50%, Memory 30%"' in svg
    assert '<polyline class="line line-cpu" points="36,143 632,83"/>' in svg
    assert '<circle class="line line-mem"' in svg  # a single sample is a dot
    assert "−60 s" in svg  # the span of the samples, not the empty window
    assert "style=" not in svg  # the CSP allows no inline style


def test_a_sparkline_without_samples_is_a_dash() -> None:
    assert "—" in sparkline([], now=0, window_s=600, css="cpu", label="CPU")
    assert 'aria-label="CPU 42%"' in sparkline([(0.0, 42.0)], now=0.0, window_s=600, css="cpu", label="CPU")


def test_agents_are_paged_and_filtered(admin: Any, controller: Any) -> None:
    for i in range(120):
        controller.add_agent(f"agent-{i:03d}", cpu=10, mem=20, state="lost" if i % 10 == 0 else "alive")
    page = admin.get("/agents").text
    shown = re.findall(r'href="/agents/(agent-\d+)"', page)
    assert shown == [f"agent-{i:03d}" for i in range(50)]
    assert "120 agents:" in page and "108 alive" in page and "12 lost" in page
    assert 'rel="next" href="?page=2"' in page
    lost = admin.get("/agents?state=lost").text
    assert re.findall(r'href="/agents/(agent-\d+)"', lost) == [f"agent-{i:03d}" for i in range(0, 120, 10)]
    found = admin.get("/agents?q=agent-11").text
    assert re.findall(r'href="/agents/(agent-\d+)"', found) == [f"agent-{i}" for i in range(110, 120)]


def test_the_agents_page_draws_each_agents_recent_load(portal: Flask, admin: Any, controller: Any) -> None:
    controller.add_agent("agent-1", cpu=42, mem=61)
    controller.add_agent("agent-2", cpu=5, mem=5)
    history: LoadHistory = portal.extensions["frontend.history"]
    now = time.monotonic()
    for k in range(10):
        history.observe(metrics("agent-1", cpu=40 + k, mem=60), now - 50 + 5 * k)
    page = admin.get("/agents").text
    assert page.count('<svg class="spark"') == 2  # CPU and memory of agent-1
    assert 'aria-label="CPU 49%"' in page
    fragment = admin.get("/agents?fragment=1").text
    assert fragment.lstrip().startswith("<p") and "<html" not in fragment


def test_an_agent_page_has_charts_capacity_and_its_deployments(portal: Flask, admin: Any, controller: Any) -> None:
    controller.add_agent("agent-1", cpu=42, mem=61, deployments=1)
    controller.add_deployment("d0", "running", agent_id="agent-1", url="http://agent-1:7001")
    history: LoadHistory = portal.extensions["frontend.history"]
    history.observe(metrics("agent-1", cpu=42, mem=61), time.monotonic())
    page = admin.get("/agents/agent-1").text
    assert "4 CPUs · 8.0 GiB memory" in page
    assert 'aria-label="CPU and memory: CPU 42%, Memory 61%"' in page
    assert '<a href="/deployments/d0"><code>d0</code></a>' in page
    assert '<a href="/models/m-iris">iris</a> v1' in page
    assert 'data-refresh="/agents/agent-1?fragment=1"' in page


def test_an_unknown_agent_is_a_404(admin: Any, controller: Any) -> None:
    controller.add_agent("agent-1", cpu=1, mem=1)
    page = admin.get("/agents/agent-9")
    assert page.status_code == 404 and "No agent agent-9 is known to the controller." in page.text
