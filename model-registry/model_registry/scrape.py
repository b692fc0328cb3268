"""What the model registry's `/metrics` shows beside the HTTP metrics.

- `miaas_registry_uploads_total{result}`: uploads (`POST /registry/upload-and-validate`) by result: `published`,
  or the error code of the refusal (`validation_error`, `too_large`, `unauthenticated`...; our codes, a bounded set)
- `miaas_registry_quarantined_files`: entries still in the store's quarantine (the count `/health` reports)

The bytes stored are not shown: the store keeps no running total, and summing every version at each scrape is not
cheap.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask, Response, request
from prometheus_client import Counter

from miaas.metrics import ServiceMetrics, gauge

UPLOAD_ENDPOINT = "model_registry.upload_and_validate"
PUBLISHED = "published"


def install(app: Flask, quarantined: Callable[[], int]) -> None:
    """Count the app's uploads by result and show the quarantine's size at each scrape."""
    metrics: ServiceMetrics = app.extensions["miaas_metrics"]
    uploads = Counter("miaas_registry_uploads", "Model uploads, by result (published, or the refusal's error code)",
                      ["result"], registry=metrics.registry)

    @app.after_request
    def _count_upload(response: Response) -> Response:
        if request.endpoint == UPLOAD_ENDPOINT:
            uploads.labels(upload_result(response)).inc()
        return response

    metrics.collect_with("quarantine", lambda: [gauge(
        "miaas_registry_quarantined_files", "Entries still in the model store's quarantine", [], quarantined())])


def upload_result(response: Response) -> str:
    """`published` for a 201, else the code of the JSON error body (`status_<n>` without one)."""
    if response.status_code == 201:
        return PUBLISHED
    body = response.get_json(silent=True) if response.is_json else None
    code = body.get("error", {}).get("code") if isinstance(body, dict) else None
    if isinstance(code, str) and code.isidentifier() and len(code) <= 64:
        return code
    return f"status_{response.status_code}"
