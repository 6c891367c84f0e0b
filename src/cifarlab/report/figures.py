"""The evaluation's figures, each a function writing one PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

GRID_LIMIT = 20  # above this many classes a full confusion grid is unreadable


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = 0.5 * k + 2.5
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side))
    for ax, data, title, fmt in (
        (axes[0], cm, "Counts", "d"),
        (axes[1], norm, "Share of true class", ".2f"),
    ):
        ax.imshow(data, cmap="Blues")
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        high = data.max() * 0.6
        for i in range(k):
            for j in range(k):
                ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=7,
                        color="white" if data[i, j] > high else "black")  # fmt: skip
    _save(fig, path)


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


def mistakes(groups: list[tuple[str, list[dict]]], path: Path) -> None:
    """One row per class: its most confidently wrong images, titled true / predicted / confidence."""
    cols = max([len(items) for _, items in groups] + [1])
    fig, axes = plt.subplots(
        len(groups), cols, figsize=(2.2 * cols, 2.6 * len(groups)), squeeze=False
    )
    for row, (cls, items) in enumerate(groups):
        for col in range(cols):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(items):
                item = items[col]
                ax.imshow(item["image"], interpolation="nearest")
                ax.set_title(
                    f"true {cls}\npred {item['predicted']}\n{item['confidence']:.0%}", fontsize=8
                )
        if not items:
            axes[row][0].text(0.5, 0.5, f"no mistakes on {cls}", ha="center", va="center")
    _save(fig, path)


def reliability(calib: dict, path: Path) -> None:
    edges = np.asarray(calib["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    acc = np.asarray([a if a is not None else np.nan for a in calib["accuracy"]])
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.bar(
        centers,
        np.nan_to_num(acc),
        width=edges[1] - edges[0],
        edgecolor="k",
        color="#4f81bd",
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {calib['ece']:.3f})")
    ax.legend(loc="upper left")
    _save(fig, path)


def curves(rows: list[dict], path: Path) -> None:
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in rows], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(epochs, [r["train_acc"] for r in rows], "o-", label="train")
    axes[1].plot(epochs, [r["val_acc"] for r in rows], "o-", label="val")
    axes[1].set_title("accuracy")
    axes[2].plot(epochs, [r["lr"] for r in rows], "o-")
    axes[2].set_title("learning rate (epoch start)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    _save(fig, path)
