"""The evaluation's figures, each a function writing one PNG."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

# class and run names are folder names: a `$` in one is text, not mathtext (which fails to parse
# `$\frac$`); set for our figures only, not for the caller's process
_plain_text = matplotlib.rc_context({"text.parse_math": False})

GRID_LIMIT = 20  # above this many classes a full confusion grid is unreadable


def _save(fig, path: Path) -> None:
    """Into the temporary folder of a report, moved into place whole (`moved_in_when_complete`)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@_plain_text
def confusion_matrix(cm: np.ndarray, classes: list[str], pairs: list[dict], path: Path) -> None:
    k = len(classes)
    if k > GRID_LIMIT:
        top = pairs[:25]
        fig, ax = plt.subplots(figsize=(8, 0.32 * len(top) + 1.2))
        labels = [f"{p['true']} → {p['predicted']}" for p in top][::-1]
        ax.barh(labels, [p["count"] for p in top][::-1], color="#c0504d")
        ax.set_xlabel("images")
        ax.set_title(f"Most confused pairs (of {k} classes)")
        _save(fig, path)
        return
    empty = cm.sum(1) == 0  # a class with no images here: its shares are none, not 0
    norm = np.where(empty[:, None], np.nan, cm / np.maximum(cm.sum(1, keepdims=True), 1))
    rows = [f"{c} (no images)" if e else c for c, e in zip(classes, empty, strict=True)]
    side = 0.5 * k + 2.5
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side))
    for ax, data, title, fmt in (
        (axes[0], cm, "Counts", "d"),
        (axes[1], norm, "Share of true class", ".2f"),
    ):
        ax.imshow(data, cmap="Blues")
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), rows)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        high = np.nanmax(data) * 0.6
        for i in range(k):
            for j in range(k):
                text = "–" if np.isnan(data[i, j]) else format(data[i, j], fmt)
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if data[i, j] > high else "black")  # fmt: skip
    _save(fig, path)


@_plain_text
def per_class(accuracy: np.ndarray, classes: list[str], path: Path) -> None:
    order = np.argsort(accuracy)
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(classes) + 1.2))
    ax.barh([classes[i] for i in order], accuracy[order], color="#4f81bd")
    ax.axvline(float(np.mean(accuracy)), color="k", ls="--", lw=1, label="mean")
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (recall)")
    ax.set_title("Per-class accuracy, hardest first")
    ax.legend(loc="lower right")
    _save(fig, path)


@_plain_text
def mistakes(groups: list[tuple[str, list[dict]]], path: Path) -> None:
    """One row per class: its most confidently wrong images (then a few correct ones), titled
    true / predicted / confidence; items with a `cam` get a second row, the Grad-CAM heat map of
    the predicted class over the image."""
    cols = max([len(items) for _, items in groups] + [1])
    with_cam = any("cam" in item for _, items in groups for item in items)
    per_group = 2 if with_cam else 1
    fig, axes = plt.subplots(
        per_group * len(groups), cols, figsize=(2.2 * cols, (2.6 + 2.0 * with_cam) * len(groups)),
        squeeze=False,
    )  # fmt: skip
    for g, (cls, items) in enumerate(groups):
        rows = axes[per_group * g : per_group * (g + 1)]
        for ax in rows.ravel():
            ax.axis("off")
        for col, item in enumerate(items):
            rows[0][col].imshow(item["image"], interpolation="nearest")
            if item.get("correct"):
                color, title = "#2e7d32", f"{cls}, correct"
            else:
                color, title = "black", f"true {cls}\npred {item['predicted']}"
            rows[0][col].set_title(f"{title}\n{item['confidence']:.0%}", fontsize=8, color=color)
            if "cam" in item:
                rows[1][col].imshow(item["image"], interpolation="nearest")
                rows[1][col].imshow(item["cam"], cmap="jet", alpha=0.45, vmin=0, vmax=1,
                                    interpolation="bilinear")  # fmt: skip
                rows[1][col].set_title(f"Grad-CAM: {item['predicted']}", fontsize=7)
        if not any(not item.get("correct") for item in items) and len(items) < cols:
            free = rows[0][cols - 1]
            free.text(0.5, 0.5, f"no mistakes\non {cls}", ha="center", va="center",
                      transform=free.transAxes)  # fmt: skip
    _save(fig, path)


@_plain_text
def reliability(calib: dict, path: Path, before: dict | None = None, temperature: float = 1.0):
    """The reliability diagram; with `before` (the uncalibrated probabilities) both, side by side."""
    panels = [(before, "Before (T = 1)"), (calib, f"After (T = {temperature:.2f})")]
    panels = panels if before is not None else [(calib, "Reliability")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (data, title) in zip(axes[0], panels, strict=True):
        edges = np.asarray(data["edges"])
        acc = np.asarray([a if a is not None else np.nan for a in data["accuracy"]])
        ax.bar((edges[:-1] + edges[1:]) / 2, np.nan_to_num(acc), width=edges[1] - edges[0],
               edgecolor="k", color="#4f81bd", label="accuracy")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title} (ECE {data['ece']:.3f})")
        ax.legend(loc="upper left")
    _save(fig, path)


@_plain_text
def curves(rows: list[dict], path: Path) -> None:
    """One run's loss, accuracy (test, when recorded, is a record, not for selection) and
    learning rate per epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric in zip(axes, ("loss", "acc"), strict=False):
        splits = [(split, [rows], f"{split}_{metric}") for split in ("train", "val", "test")]
        _runs_panel(ax, splits, metric, "accuracy" if metric == "acc" else metric)
    _runs_panel(axes[2], [("lr", [rows])], "lr", "learning rate (epoch start)")
    _save(fig, path)


def _per_epoch(histories: list[list[dict]], key: str) -> np.ndarray:
    """(seeds, epochs) of `key` over the epochs every seed reached; NaN where not recorded."""
    n = min(len(h) for h in histories)
    return np.array([[row.get(key) for row in h[:n]] for h in histories], dtype=float)


def _runs_panel(ax, runs: list[tuple], key: str, label: str) -> None:
    """(name, seeds' histories) per line, of column `key`, or of the column a third item names."""
    drawn = 0
    for name, histories, *column in runs:
        values = _per_epoch(histories, *column or [key]) if histories else np.empty((0, 0))
        if values.size == 0 or np.isnan(values).all():
            continue
        epochs = np.arange(1, values.shape[1] + 1)
        with warnings.catch_warnings():  # an epoch no seed recorded stays a gap (NaN)
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, lo, hi = np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)
        (line,) = ax.plot(epochs, mean, "o-", ms=3, label=name)
        if len(values) > 1:  # seeds: the band spans their min and max
            ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.2)
        drawn += 1
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # not 1.5, 2.0, 2.5 for 5 epochs
    ax.grid(alpha=0.3)
    ax.set_ylabel(label)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no run recorded {label}", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip


@_plain_text
def runs_curves(
    runs: list[tuple[str, list[list[dict]]]], panels: list[tuple[str, str]], path: Path
) -> None:
    """All runs on one graph per panel: (metrics.csv column, axis label); seeds as mean + band."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels) + 1.5, 4.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        _runs_panel(ax, runs, key, label)
    _save(fig, path)


@_plain_text
def mixup_examples(images: np.ndarray, names: list[str], alphas: list[float], path: Path) -> None:
    """Four pairs of `images` (uint8, NHWC; `names` their labels) mixed at each alpha, one row
    per alpha, titled with both labels and their weights."""
    rng = np.random.default_rng(0)
    pairs = rng.choice(len(images), size=(4, 2), replace=False)
    fig, axes = plt.subplots(len(alphas), 4, figsize=(11, 3.2 * len(alphas)), squeeze=False)
    for row, alpha in zip(axes, alphas, strict=True):
        for ax, (a, b) in zip(row, pairs, strict=True):
            lam = float(rng.beta(alpha, alpha))
            ax.imshow((lam * images[a] + (1 - lam) * images[b]) / 255, interpolation="nearest")
            ax.set_title(f"{names[a]} {lam:.2f}\n{names[b]} {1 - lam:.2f}", fontsize=10)
            ax.axis("off")
        row[0].text(-0.15, 0.5, f"alpha {alpha:g}", transform=row[0].transAxes, rotation=90,
                    va="center", ha="right", fontsize=11)  # fmt: skip
    fig.suptitle("Mixup: label weights = lambda, 1 - lambda, lambda ~ Beta(alpha, alpha)")
    _save(fig, path)
