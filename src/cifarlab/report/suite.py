"""A suite's results table (CSV and Markdown), curves plot and index page."""

from __future__ import annotations

import csv
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

COLUMNS = ["run", "changes", "seeds", "best_val_acc", "best_val_acc_std", "final_val_acc",
           "tta_val_acc", "gain",
           "epochs", "seconds", "images_per_s", "status"]  # fmt: skip


def _pct(value, signed=False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"


def write_suite_report(suite, rows: list[dict], out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"# Suite `{suite.name}`",
        "",
        suite.description,
        "",
        f"Gain: best validation accuracy minus that of `{suite.reference}`, in points.",
        "",
        "| run | what changed | best val acc % (mean ± std) | final val acc % | final with TTA % | gain | epochs | train time | img/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "best_val_acc" not in r:
            lines.append(
                f"| {r['run']} | {r['changes']} | {r.get('status', 'not run')} | | | | | | |"
            )
            continue
        std = f" ± {r['best_val_acc_std'] * 100:.2f}" if r["seeds"] > 1 else ""
        lines.append(
            f"| {r['run']} | {r['changes']} | {_pct(r['best_val_acc'])}{std} | {_pct(r['final_val_acc'])} | {_pct(r.get('tta_val_acc'))} | "
            f"{_pct(r.get('gain'), signed=True)} | {r['epochs']} | {r['seconds'] / 60:.1f} min | {r['images_per_s']:.0f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _curves(rows, out / "curves.png")
    _index(suite, rows, out)


def _curves(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        hist = r.get("histories") or []
        if not hist:
            continue
        n = min(len(h) for h in hist)
        acc = np.asarray([[row["val_acc"] for row in h[:n]] for h in hist])
        epochs = np.arange(1, n + 1)
        (line,) = ax.plot(epochs, acc.mean(0), "o-", label=r["run"])
        if len(hist) > 1:
            ax.fill_between(epochs, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _index(suite, rows: list[dict], out: Path) -> None:
    items = []
    for r in rows:
        reports = sorted(out.glob(f"{r['run']}*/eval-val/report.html"))
        links = " ".join(
            f'<a href="{html.escape(str(p.relative_to(out)))}">{html.escape(p.parts[-3])}</a>'
            for p in reports
        )
        acc = (
            _pct(r.get("best_val_acc"))
            if "best_val_acc" in r
            else html.escape(r.get("status", "not run"))
        )
        items.append(
            f"<tr><td>{html.escape(r['run'])}</td><td>{html.escape(r['changes'])}</td><td>{acc}</td>"
            f"<td>{_pct(r.get('gain'), signed=True)}</td><td>{links}</td></tr>"
        )
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>suite {html.escape(suite.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:30px auto;color:#1d2330}}
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:6px;text-align:left}}
img{{max-width:100%}}</style></head><body><h1>Suite {html.escape(suite.name)}</h1><p>{html.escape(suite.description)}</p>
<table><tr><th>run</th><th>what changed</th><th>best val acc %</th><th>gain (points)</th><th>reports</th></tr>
{"".join(items)}</table><h2>Validation accuracy per epoch</h2><img src="curves.png" alt="curves"></body></html>"""
    (out / "index.html").write_text(page)
