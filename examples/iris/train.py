"""Train the iris classifier: softmax regression with numpy, weights saved to model.pth.

The data is Fisher's iris data set (150 flowers, 4 measurements, 3 species), in data/iris.csv.
`python train.py` is deterministic: the same seed gives the same weights and the same accuracy.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
CLASSES = ["setosa", "versicolor", "virginica"]
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def load() -> tuple[np.ndarray, np.ndarray]:
    with open(HERE / "data" / "iris.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]  # the first row is a header: count, features, class names
    x = np.array([[float(v) for v in r[:4]] for r in rows])
    y = np.array([int(r[4]) for r in rows])
    return x, y


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train(x: np.ndarray, y: np.ndarray, epochs: int = 2000, lr: float = 0.1, l2: float = 1e-3) -> dict[str, np.ndarray]:
    mean, std = x.mean(axis=0), x.std(axis=0)
    xs = (x - mean) / std
    onehot = np.eye(len(CLASSES))[y]
    w = np.zeros((x.shape[1], len(CLASSES)))
    b = np.zeros(len(CLASSES))
    for _ in range(epochs):
        p = softmax(xs @ w + b)
        grad = (p - onehot) / len(xs)
        w -= lr * (xs.T @ grad + l2 * w)
        b -= lr * grad.sum(axis=0)
    return {"w": w, "b": b, "mean": mean, "std": std, "classes": np.array(CLASSES)}


def predict(model: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return softmax(((x - model["mean"]) / model["std"]) @ model["w"] + model["b"])


def main() -> None:
    x, y = load()
    rng = np.random.default_rng(7)
    order = rng.permutation(len(x))
    test, fit = order[:30], order[30:]
    model = train(x[fit], y[fit])
    accuracy = float((predict(model, x[test]).argmax(axis=1) == y[test]).mean())
    print(f"held-out accuracy on 30 flowers: {accuracy:.3f}")
    final = train(x, y)  # ship weights trained on all 150 flowers
    buf = io.BytesIO()
    np.savez(buf, **final)
    (HERE / "model.pth").write_bytes(buf.getvalue())
    print(f"wrote {HERE / 'model.pth'} ({len(buf.getvalue())} bytes)")


if __name__ == "__main__":
    main()
