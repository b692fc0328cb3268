"""Iris classifier as a web service: POST /predict, GET /health. Listens on $PORT (default 5000)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, request

HERE = Path(__file__).parent
with np.load(HERE / "model.pth", allow_pickle=False) as weights:
    MODEL = {k: weights[k] for k in weights.files}
CLASSES = [str(c) for c in MODEL["classes"]]
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]

app = Flask(__name__)


def probabilities(x: np.ndarray) -> np.ndarray:
    z = ((x - MODEL["mean"]) / MODEL["std"]) @ MODEL["w"] + MODEL["b"]
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def error(message: str, status: int = 400):  # type: ignore[no-untyped-def]
    return jsonify({"error": {"code": "bad_request", "message": message}}), status


@app.get("/health")
def health():  # type: ignore[no-untyped-def]
    return jsonify({"status": "ok", "model": "iris-softmax", "classes": CLASSES})


@app.post("/predict")
def predict():  # type: ignore[no-untyped-def]
    """Body: {"features": [5.1, 3.5, 1.4, 0.2]} or {"features": [[...], [...]]} (cm, in FEATURES order)."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "features" not in body:
        return error(f'send JSON {{"features": [{", ".join(FEATURES)}]}}')
    try:
        x = np.asarray(body["features"], dtype=float)
    except (TypeError, ValueError):
        return error("features must be numbers")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != len(FEATURES) or len(x) == 0 or len(x) > 10_000:
        return error(f"features must be 1 to 10000 rows of {len(FEATURES)} numbers: {', '.join(FEATURES)}")
    if not np.isfinite(x).all():
        return error("features must be finite numbers")
    p = probabilities(x)
    return jsonify(
        {
            "predictions": [CLASSES[i] for i in p.argmax(axis=1)],
            "probabilities": [dict(zip(CLASSES, map(float, row), strict=True)) for row in p],
        }
    )


if __name__ == "__main__":
    import logging

    from waitress import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # waitress says where it serves
    port = int(os.environ.get("PORT", "5000"))
    print(f"iris model: {len(CLASSES)} classes, {MODEL['w'].shape[0]} features, starting on port {port}", flush=True)
    serve(app, host=os.environ.get("HOST", "0.0.0.0"), port=port, threads=4)
