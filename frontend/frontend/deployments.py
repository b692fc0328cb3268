"""Deployments: the list and one deployment's page (live status, placement explanation, URL, logs, stop), with
their Server-Sent Events streams fed from `deployment-events`."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, abort, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from frontend.backends import Backends
from frontend.live import LiveFeed
from frontend.notices import notify, notify_failure
from frontend.security import current_session_id, require_change_rights, username
from miaas.errors import MiaasError
from miaas.schemas import Deployment, DeploymentEvent, DeploymentStatus

log = logging.getLogger(__name__)
DEPLOYMENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A deployment in one of these states can still be stopped.
STOPPABLE = {
    DeploymentStatus.PENDING, DeploymentStatus.SCHEDULED, DeploymentStatus.PROVISIONING,
    DeploymentStatus.RUNNING, DeploymentStatus.LOST,
}
LOG_TAIL = 200
RAW_LOG_TAIL = 2000
KEEPALIVE_S = 15.0
LOG_POLL_S = 2.0
SESSION_CHECK_S = 15.0  # a stream ends this soon after its session does (logout, password change, removal)
RETRY_MS = 3000
Page = str | tuple[str, int]


def is_web_url(value: object) -> bool:
    """Only http(s) URLs become links: a `javascript:` URL from a backend must never be clickable."""
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def state_of(d: Deployment | DeploymentEvent) -> dict[str, Any]:
    """What a live page needs of a deployment or of one of its events."""
    return {
        "deployment_id": d.deployment_id,
        "status": d.status.value,
        "agent_id": d.agent_id,
        "url": d.url if is_web_url(d.url) else None,
        "url_text": d.url,
        "reason": d.reason,
        "stoppable": d.status in STOPPABLE,
    }


def sse(event: str, data: Any) -> str:
    """One Server-Sent Event (its data is one line of JSON)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class StreamSlots:
    """At most `limit` live streams at once: each holds an HTTP worker thread for as long as it is open."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    def take(self) -> bool:
        return self._free.acquire(blocking=False)

    def give(self) -> None:
        self._free.release()


def check_deployment_id(value: str) -> str:
    if not DEPLOYMENT_ID_RE.fullmatch(value):
        abort(404)
    return value


def build_deployments(backends: Backends, feed: LiveFeed, slots: StreamSlots, follows_bus: bool,
                      max_stream_s: float, session_alive: Callable[[str], bool],
                      clock: Callable[[], float] = time.monotonic) -> Blueprint:
    """`max_stream_s`: a live stream (and the log follow in it) ends after this long, whatever the client does,
    and the browser's EventSource reconnects by itself; `session_alive(session_id)` ends it with its session."""
    bp = Blueprint("deployments", __name__)

    @bp.get("/deployments")
    def deployments() -> Page:
        """Every deployment with its state and URL; the state changes live (Server-Sent Events)."""
        items: list[Deployment] = []
        status = 200
        try:
            items = sorted(backends.list_deployments(username()), key=lambda d: d.created_at, reverse=True)
        except MiaasError as exc:
            status = notify_failure(exc)
        return render_template("deployments.html", deployments=items, stoppable=STOPPABLE,
                               live=follows_bus), status

    @bp.get("/deployments/<deployment_id>")
    def deployment(deployment_id: str) -> Page:
        """One deployment: live state, why it was placed where it is, its URL, its logs, Stop."""
        check_deployment_id(deployment_id)
        d: Deployment | None = None
        logs: str | None = None
        logs_problem: str | None = None
        status = 200
        try:
            d = backends.get_deployment(username(), deployment_id)
        except MiaasError as exc:
            status = notify_failure(exc)
        if d is not None and d.agent_id:
            try:
                logs = backends.logs(username(), d.agent_id, d.deployment_id, LOG_TAIL)
            except MiaasError as exc:
                logs_problem = exc.message
        return render_template("deployment.html", d=d, deployment_id=deployment_id, stoppable=STOPPABLE,
                               logs=logs, logs_problem=logs_problem, live=follows_bus), status

    @bp.get("/deployments/<deployment_id>/logs")
    def logs(deployment_id: str) -> Response:
        """The last lines of the deployment's log, as plain text (from its agent)."""
        check_deployment_id(deployment_id)
        tail = request.args.get("tail", str(RAW_LOG_TAIL))
        n = int(tail) if tail.isdigit() and 0 < int(tail) <= 10_000 else RAW_LOG_TAIL
        d = backends.get_deployment(username(), deployment_id)
        if not d.agent_id:
            return Response("This deployment has no agent yet.\n", 404, mimetype="text/plain")
        text = backends.logs(username(), d.agent_id, d.deployment_id, n)
        return Response(text, mimetype="text/plain", headers={"Content-Disposition": "inline"})

    @bp.post("/deployments/<deployment_id>/stop")
    def stop(deployment_id: str) -> BaseResponse:
        """Ask the controller to stop one deployment."""
        check_deployment_id(deployment_id)
        user = require_change_rights()
        try:
            d = backends.stop(user.username, deployment_id)
            notify("success", f"Stopping deployment {d.deployment_id} of {d.model_name} version {d.version}.")
        except MiaasError as exc:
            notify_failure(exc)
        back = request.form.get("back", "")
        if back == "deployment":
            return redirect(url_for("deployments.deployment", deployment_id=deployment_id), 303)
        return redirect(url_for("deployments.deployments"), 303)

    def stream(deployment_id: str | None, follow_logs: bool) -> Response:
        if not follows_bus:
            return Response("live status is off (FRONTEND_CONSUME_BUS=false)\n", 404, mimetype="text/plain")
        if not slots.take():
            log.warning("refused a live stream: all %d are in use", slots.limit)
            return Response("too many live streams; reload later\n", 503, mimetype="text/plain",
                            headers={"Retry-After": "30"})
        user = username()
        session_id = current_session_id()
        sub = feed.subscribe(deployment_id)  # before reading the state: no event falls between the two
        try:
            first = backends.get_deployment(user, deployment_id) if deployment_id else None
        except MiaasError as exc:
            feed.unsubscribe(sub)
            slots.give()
            return Response(f"{exc.message}\n", exc.status if exc.status < 600 else 502, mimetype="text/plain")

        def events() -> Iterator[str]:
            try:
                yield f"retry: {RETRY_MS}\n\n"
                if first is not None:
                    yield sse("deployment", state_of(first))
                started = last_sent = clock()
                next_log, next_check = started, started + SESSION_CHECK_S  # the guard has just checked it
                agent_id = first.agent_id if first is not None else None
                log_hash = ""
                # Each write either completes or fails within the server's socket timeout, so the deadline below
                # bounds how long one client can hold this worker thread, even one that never reads.
                while clock() - started < max_stream_s and not sub.closed:
                    if clock() >= next_check:
                        next_check = clock() + SESSION_CHECK_S
                        if session_id is None or not session_alive(session_id):
                            return  # logged out meanwhile: the reconnect is sent to the login page

                    event = sub.get(timeout=0.5 if follow_logs else 1.0)
                    if sub.overflowed:
                        yield sse("resync", {})
                        return
                    if event is not None:
                        agent_id = event.agent_id or agent_id
                        yield sse("deployment", state_of(event))
                        last_sent = clock()
                    if follow_logs and agent_id and deployment_id and clock() >= next_log:
                        next_log = clock() + LOG_POLL_S
                        text, problem = _tail(backends, user, agent_id, deployment_id)
                        digest = hashlib.sha256((text or problem or "").encode()).hexdigest()
                        if digest != log_hash:
                            log_hash = digest
                            yield sse("logs", {"text": text, "problem": problem})
                            last_sent = clock()
                    if clock() - last_sent >= KEEPALIVE_S:
                        yield ": keepalive\n\n"  # also how a closed browser tab is noticed
                        last_sent = clock()
            finally:
                feed.unsubscribe(sub)
                slots.give()

        return Response(events(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @bp.get("/deployments/events")
    def all_events() -> Response:
        """Server-Sent Events: every deployment's state changes, as they come on `deployment-events`."""
        return stream(None, follow_logs=False)

    @bp.get("/deployments/<deployment_id>/events")
    def one_events(deployment_id: str) -> Response:
        """Server-Sent Events: one deployment's state now and its changes; with `?logs=1` its log too."""
        check_deployment_id(deployment_id)
        return stream(deployment_id, follow_logs=request.args.get("logs") == "1")

    return bp


def _tail(backends: Backends, user: str, agent_id: str, deployment_id: str) -> tuple[str | None, str | None]:
    try:
        return backends.logs(user, agent_id, deployment_id, LOG_TAIL), None
    except MiaasError as exc:
        return None, exc.message
