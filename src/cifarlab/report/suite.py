"""A suite's results table (CSV and Markdown), its curves of all runs, its Mixup examples and
its index page, swapped into --out together."""

from __future__ import annotations

import csv
import html
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cifarlab.report import PANELS, REPORT_FILES, figures
from cifarlab.report.html import CSS, PAGE, Raw, cards, table
from cifarlab.rundir import moved_in_when_complete, temp_folder

NO_VAL_TEST = "Test accuracy per epoch, all runs (no validation split: best.pt is the last epoch's)"


def _recorded(rows: list[dict]) -> list[str]:
    """The PANELS columns some run's metrics.csv filled (not NaN on every row)."""
    return [
        key
        for key in PANELS
        if any(not math.isnan(e.get(key, math.nan)) for r in rows for h in r.get("histories") or [] for e in h)
    ]  # fmt: skip


def _filled(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _pct(value, signed=False) -> str:
    if not _filled(value):
        return "–"
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"


def _best(r: dict, split: str) -> str:
    """The best accuracy, ± its std over seeds; "–" for a run without the split (val_size 0)."""
    value = r.get(f"best_{split}_acc")
    if value is None or r.get("seeds", 1) <= 1:
        return _pct(value)
    return f"{_pct(value)} ± {r[f'best_{split}_acc_std'] * 100:.2f}"


@dataclass(frozen=True)
class Column:
    key: str  # results.csv name
    header: str  # results.md and index.html heading
    cell: Callable[[dict], str]  # the row's text, for a run that ran
    optional: bool = True  # shown only when some row has `key` (no column of empty cells)


COLUMNS = [
    Column("run", "run", lambda r: r["run"], optional=False),
    Column("changes", "what changed", lambda r: r["changes"], optional=False),
    Column("seeds", "", lambda r: "", optional=False),  # CSV only
    Column("best_val_acc", "best val acc % (mean ± std)", lambda r: _best(r, "val")),
    Column("best_val_acc_std", "", lambda r: ""),  # CSV only: inside best_val_acc's cell
    Column("final_val_acc", "final val acc %", lambda r: _pct(r.get("final_val_acc"))),
    Column("tta_val_acc", "final with TTA %", lambda r: _pct(r.get("tta_val_acc"))),
    Column("best_test_acc", "best test acc % over epochs", lambda r: _best(r, "test")),
    Column("best_test_acc_std", "", lambda r: ""),  # CSV only: inside best_test_acc's cell
    Column("final_test_acc", "final test acc %", lambda r: _pct(r.get("final_test_acc"))),
    Column("test_acc", "test acc of best.pt %", lambda r: _pct(r.get("test_acc"))),
    Column("gain", "gain", lambda r: _pct(r.get("gain"), signed=True)),
    Column("step_gain", "gain over previous", lambda r: _pct(r.get("step_gain"), signed=True)),
    Column("epochs", "epochs", lambda r: str(r["epochs"]), optional=False),
    Column("seconds", "train time", lambda r: f"{r['seconds'] / 60:.1f} min"),
    Column("images_per_s", "img/s", lambda r: f"{r['images_per_s']:.0f}"),
    Column("status", "", lambda r: "", optional=False),  # CSV only: why a run did not run
]


def columns(rows: list[dict]) -> list[Column]:
    """Every column, less the optional ones no row fills (test columns only when the data has a
    test split, validation ones only with a validation split)."""
    return [c for c in COLUMNS if not c.optional or any(_filled(r.get(c.key)) for r in rows)]


def _shown(rows: list[dict]) -> list[Column]:
    return [c for c in columns(rows) if c.header]


def _cells(r: dict, shown: list[Column]) -> list[str]:
    """The row's texts; a run that never ran shows its status where its accuracy would be."""
    if "epochs" not in r:
        return [r["run"], r["changes"], r.get("status", "not run")] + [""] * (len(shown) - 3)
    return [c.cell(r) for c in shown]


def write_suite_report(suite, rows: list[dict], out: Path, redraw: bool = True) -> None:
    """The report written into a temporary folder, then swapped in with index.html last: `out`
    never holds files of two tables, nor a figure not drawn now; a suite stopped in between
    leaves part of one, which its next run rewrites. Unless `redraw`, the Mixup examples in
    `out` are kept: drawing them reads the data."""
    part = temp_folder(out / "results")
    with moved_in_when_complete(part, out, "index.html", REPORT_FILES):
        _write_files(suite, rows, out, part, redraw)


def _write_files(suite, rows: list[dict], out: Path, part: Path, redraw: bool) -> None:
    with open(part / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c.key for c in columns(rows)], extrasaction="ignore")
        w.writeheader()  # floats to 6 places: differences of accuracies read -0.05499999999999999
        w.writerows(
            {k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows
        )
    (part / "results.md").write_text(_markdown(suite, rows))
    runs = [(r["run"], r.get("histories") or []) for r in rows]
    recorded = _recorded(rows)
    for key in recorded:
        figures.runs_curves(runs, [(key, PANELS[key][0])], part / f"curves_{key}.png")
    if recorded:
        figures.runs_curves(runs, [(k, PANELS[k][0]) for k in recorded], part / "curves.png")
    if suite.examples == "mixup" and not redraw and (out / "mixup_examples.png").is_file():
        shutil.copyfile(out / "mixup_examples.png", part / "mixup_examples.png")
    elif suite.examples == "mixup":
        mixup_examples(suite, part / "mixup_examples.png")
    (part / "index.html").write_text(_index(suite, rows, out, part))


def mixup_examples(suite, path: Path) -> None:
    """Training images mixed at each of the suite's Mixup alphas (0.2 when it sets none)."""
    from cifarlab.data import load_splits

    alphas = sorted({r.config.mixup_alpha for r in suite.runs if r.config.mixup_alpha}) or [0.2]
    splits = load_splits(suite.runs[0].config)
    names = [splits.classes[k] for k in splits.train.labels]
    figures.mixup_examples(splits.train.images, names, alphas, path)


# What runs are compared on (`gain_basis`): (its words in a card, its words in the notes)
BASIS = {
    "best_val_acc": ("best val acc", "best validation accuracy"),
    "test_acc": ("test acc", "test accuracy of best.pt (chosen on validation)"),
    "best_test_acc": ("best test acc", "best test accuracy over epochs (no validation split: "
                      "chosen on test, optimistic, as the lesson reports it)"),
}  # fmt: skip


def gain_basis(rows: list[dict]) -> str:
    """What runs are compared on: test accuracy when every run that ran has it (that of best.pt,
    chosen on validation; without validation the best epoch's, as the lesson compares), else
    the best validation accuracy."""
    ran = [r for r in rows if "epochs" in r]
    key = "test_acc" if any("best_val_acc" in r for r in ran) else "best_test_acc"
    return key if ran and all(r.get(key) is not None for r in ran) else "best_val_acc"


def _notes(suite, rows: list[dict]) -> list[str]:
    notes = [f"Gain: {BASIS[gain_basis(rows)][1]} minus that of `{suite.reference}`, in points."]
    if any(r.get("step_gain") is not None for r in rows):
        notes.append("Gain over previous: the gain over the run in the row above, in points.")
    return notes


def _markdown(suite, rows: list[dict]) -> str:
    shown = _shown(rows)
    lines = [f"# Suite `{suite.name}`", "", suite.description, "", *_notes(suite, rows), ""]
    lines.append("| " + " | ".join(c.header for c in shown) + " |")
    lines.append("|" + " --- |" * len(shown))
    # a '|' in a name, a change or a status would end its cell early
    lines += [
        "| " + " | ".join(t.replace("|", "\\|") for t in _cells(r, shown)) + " |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def _report_links(out: Path, run: str) -> Raw:
    """Links to the reports of `out/<run>` or `out/<run>-seed<N>` only (not crop-flip-jitter's)."""
    own = re.compile(re.escape(run) + r"(-seed\d+)?")
    links = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and own.fullmatch(p.name)):
        seed = folder.name[len(run) :].lstrip("-")
        for page in sorted(folder.glob("eval-*/report.html")):
            label = " ".join(filter(None, [seed, page.parent.name.removeprefix("eval-")]))
            href = quote(str(page.relative_to(out)))
            links.append(f'<a href="{html.escape(href)}">{html.escape(label)}</a>')
    return Raw(" · ".join(links) or "–")


def _cards(rows: list[dict]) -> str:
    ran = [r for r in rows if "epochs" in r]
    key = gain_basis(rows)
    scored = [r for r in ran if _filled(r.get(key))]
    shown = [("runs finished", f"{len(ran)} of {len(rows)}")]
    if scored:
        top = max(scored, key=lambda r: r[key])
        shown.append((f"best run by {BASIS[key][0]}", f"{_pct(top[key])}% · {top['run']}"))
    minutes = sum(r["seconds"] * max(r.get("seeds", 1), 1) for r in ran) / 60
    shown.append(("training time", f"{minutes:.1f} min"))
    return cards(shown)


# The results table mixes text and figures: text columns read better left-aligned.
_SUITE_CSS = "td:nth-child(2),th:nth-child(2),td:last-child,th:last-child{text-align:left}"


def _index(suite, rows: list[dict], out: Path, part: Path) -> str:
    """The page for `out` (its runs' reports linked), its figures those drawn into `part`."""
    shown = _shown(rows)
    results = table(
        [c.header for c in shown] + ["reports"],
        [[*_cells(r, shown), _report_links(out, r["run"])] for r in rows],
    )
    notes = "".join(f"<p>{html.escape(n).replace('`', '')}</p>" for n in _notes(suite, rows))
    files = '<p><a href="results.md">results.md</a> · <a href="results.csv">results.csv</a></p>'
    recorded = _recorded(rows)
    pictures = [(NO_VAL_TEST if k == "test_acc" and "val_acc" not in recorded else PANELS[k][1],
                 f"curves_{k}.png", f"{PANELS[k][0]} of every run per epoch") for k in recorded]  # fmt: skip
    if (part / "mixup_examples.png").is_file():
        pictures.append(("Mixup examples", "mixup_examples.png", "mixup examples"))
    sections = "".join(
        f'\n<section><h2>{html.escape(title)}</h2><img src="{src}" alt="{alt}"></section>'
        for title, src, alt in pictures
    )
    name = html.escape(suite.name)
    return PAGE.format(
        title=f"cifarlab suite {name}", css=CSS + _SUITE_CSS, heading=f"Suite {name}",
        sub=html.escape(suite.description), cards=_cards(rows),
        body=f"<section><h2>Results</h2>{results}{notes}\n{files}</section>{sections}",
    )  # fmt: skip
