"""Classification metrics from probabilities and labels: plain numpy, no plotting."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    return np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": recall,
        "support": support,
    }


def _largest_cells(counts: np.ndarray, n: int) -> list[tuple[int, int]]:
    """(row, column) of the `n` largest non-zero cells, largest first, ties in reading order."""
    order = np.argsort(-counts, axis=None, kind="stable")[:n]
    cells = [divmod(int(flat), counts.shape[1]) for flat in order]
    return [(r, c) for r, c in cells if counts[r, c] > 0]


def most_confused(cm: np.ndarray, classes: list[str], n: int = 10) -> list[dict]:
    """The largest off-diagonal cells: true -> predicted, count, share of the true class."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    return [
        {
            "true": classes[t],
            "predicted": classes[p],
            "count": int(off[t, p]),
            "share": float(off[t, p] / cm[t].sum()),
        }
        for t, p in _largest_cells(off, n)
    ]


def most_confused_pairs(cm: np.ndarray, classes: list[str], n: int = 10) -> list[dict]:
    """The class pairs mistaken for each other most, both directions summed (cat<->dog):
    each direction's count, their sum, and the sum's share of both classes' images."""
    both = np.triu(cm + cm.T, k=1)
    return [
        {
            "classes": [classes[a], classes[b]],
            "count": int(both[a, b]),
            "forward": int(cm[a, b]),  # true classes[a] predicted classes[b]
            "backward": int(cm[b, a]),
            "share": float(both[a, b] / (cm[a].sum() + cm[b].sum())),
        }
        for a, b in _largest_cells(both, n)  # non-zero cells: both classes have images
    ]


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error and the per-bin confidence/accuracy of the top prediction."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, conf, minlength=bins)
    right = np.bincount(which, correct, minlength=bins)
    return {
        "edges": edges.tolist(),
        "confidence": [float(s / k) if k else None for s, k in zip(conf_sum, count, strict=True)],
        "accuracy": [float(s / k) if k else None for s, k in zip(right, count, strict=True)],
        "count": count.tolist(),
        "ece": float(np.abs(conf_sum - right).sum() / len(labels)),
    }


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == labels[:, None]).any(1).mean())
