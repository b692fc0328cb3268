"""Messages shown at the top of the next page: successes, and failures of other services with their details."""

from __future__ import annotations

from typing import Any

from flask import flash

from miaas.errors import MiaasError

MAX_DETAILS = 100


def notify(level: str, text: str, details: Any = None) -> None:
    """Show `text` (level: success, info, warning or error), with details as a list under it."""
    # Flask types the message as str, but stores any JSON-able value in the session; a dict keeps the details.
    flash({"text": text, "details": detail_lines(details)}, level)  # type: ignore[arg-type]


def notify_failure(exc: MiaasError) -> int:
    """Show a failure the way a person can act on it; returns the status the page should answer with."""
    notify("error", exc.message, exc.details)
    return exc.status if 400 <= exc.status < 600 else 502


def detail_lines(details: Any) -> list[tuple[str, str]]:
    """Details of an error body as (where, what) pairs: a file or field name, and its message."""
    if details is None or details == []:
        return []
    if isinstance(details, dict):
        items: list[Any] = [{"file": k, "message": v} for k, v in details.items()]
    elif isinstance(details, list):
        items = details
    else:
        items = [details]
    lines: list[tuple[str, str]] = []
    for item in items[:MAX_DETAILS]:
        if isinstance(item, dict):
            where = item.get("file") or item.get("field") or item.get("path") or ""
            what = item.get("message", "" if where else item)
            lines.append((str(where), str(what)))
        else:
            lines.append(("", str(item)))
    if len(items) > MAX_DETAILS:
        lines.append(("", f"… and {len(items) - MAX_DETAILS} more"))
    return lines
