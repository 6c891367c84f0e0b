"""The suite's results table, its all-runs curves and index page, from rows built by hand."""

import csv
import re
from types import SimpleNamespace

from PIL import Image

from cifarlab.report import figures
from cifarlab.report.suite import write_suite_report

SUITE = SimpleNamespace(
    name="augmentation", description="crop, flip, jitter", reference="plain", examples=""
)


def _history(epochs: int, start: float) -> list[dict]:
    return [
        {"epoch": e, "lr": 0.1, "train_loss": 2.0 / e, "train_acc": start + 0.05 * e,
         "val_loss": 1.5 / e, "val_acc": start + 0.04 * e, "seconds": 30.0, "images_per_s": 900.0}
        for e in range(1, epochs + 1)
    ]  # fmt: skip


def _row(run: str, start: float, seeds: int = 1, **extra) -> dict:
    hist = [_history(5, start + 0.01 * s) for s in range(seeds)]
    best = max(h[-1]["val_acc"] for h in hist)
    return {"run": run, "changes": f"+ {run}", "seeds": seeds, "histories": hist,
            "best_val_acc": best, "best_val_acc_std": 0.0, "final_val_acc": best,
            "epochs": 5, "seconds": 150.0, "images_per_s": 900.0, "gain": start - 0.3, **extra}  # fmt: skip


def _rows(**extra) -> list[dict]:
    return [
        _row("plain", 0.3, **extra),
        _row("crop-flip", 0.4, seeds=2, **extra),
        _row("crop-flip-jitter", 0.45, **extra),
        {"run": "transfer", "changes": "+ weights", "seeds": 0, "histories": [],
         "status": "cannot start: no weights"},
    ]  # fmt: skip


def _fake_runs(out, rows):
    """Run folders as run_suite leaves them: <run> or <run>-seed<N>, each with eval-val/report.html."""
    for r in rows:
        names = (
            [r["run"]] if r["seeds"] == 1 else [f"{r['run']}-seed{s}" for s in range(r["seeds"])]
        )
        for name in names:
            (out / name / "eval-val").mkdir(parents=True)
            (out / name / "eval-val" / "report.html").write_text("<html></html>")


def test_index_shows_both_all_runs_graphs_as_images(tmp_path):
    write_suite_report(SUITE, _rows(), tmp_path)
    page = (tmp_path / "index.html").read_text()
    for name in ("curves_val_acc.png", "curves_train_loss.png"):
        assert f'<img src="{name}"' in page
        width, height = Image.open(tmp_path / name).size
        assert width > 600 and height > 300
    assert (tmp_path / "curves.png").is_file()


def test_reports_column_links_each_runs_own_reports_not_a_name_prefix(tmp_path):
    rows = _rows()
    _fake_runs(tmp_path, rows)
    write_suite_report(SUITE, rows, tmp_path)
    page = (tmp_path / "index.html").read_text()
    row = re.search(r"<tr><td>crop-flip</td>.*?</tr>", page).group(0)
    assert re.findall(r'href="([^"]+)"', row) == [
        "crop-flip-seed0/eval-val/report.html",
        "crop-flip-seed1/eval-val/report.html",
    ]
    row = re.search(r"<tr><td>crop-flip-jitter</td>.*?</tr>", page).group(0)
    assert re.findall(r'href="([^"]+)"', row) == ["crop-flip-jitter/eval-val/report.html"]


def test_test_acc_and_step_gain_columns_appear_only_when_rows_have_them(tmp_path):
    write_suite_report(SUITE, _rows(), tmp_path)
    assert "test acc" not in (tmp_path / "results.md").read_text()
    assert "test acc" not in (tmp_path / "index.html").read_text()
    write_suite_report(SUITE, _rows(test_acc=0.8123, step_gain=0.015), tmp_path)
    md = (tmp_path / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run"))
    assert "| test acc of best.pt % |" in header and "| gain over previous |" in header
    assert "| 81.23 |" in md and "| +1.50 |" in md
    with open(tmp_path / "results.csv") as f:
        first = next(csv.DictReader(f))
    assert float(first["test_acc"]) == 0.8123 and float(first["step_gain"]) == 0.015
    page = (tmp_path / "index.html").read_text()
    assert "<th>test acc of best.pt %</th>" in page and "<td>81.23</td>" in page


def test_a_run_that_did_not_run_shows_its_status_in_every_table(tmp_path):
    write_suite_report(SUITE, _rows(), tmp_path)
    assert (
        "| transfer | + weights | cannot start: no weights |"
        in (tmp_path / "results.md").read_text()
    )
    assert "cannot start: no weights" in (tmp_path / "index.html").read_text()


def test_index_uses_the_evaluation_reports_style(tmp_path):
    from cifarlab.report.html import CSS

    write_suite_report(SUITE, _rows(), tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert CSS in page and '<div class="cards">' in page and "<header>" in page


def test_epoch_axes_tick_at_whole_epochs_only(tmp_path, monkeypatch):
    ticks = []
    real_save = figures._save

    def spy(fig, path):
        fig.canvas.draw()
        ticks.extend(t for ax in fig.axes for t in ax.get_xticks())
        real_save(fig, path)

    monkeypatch.setattr(figures, "_save", spy)
    figures.runs_curves([("a", [_history(5, 0.3)])], [("val_acc", "val acc")], tmp_path / "a.png")
    figures.curves(_history(5, 0.3), tmp_path / "b.png")
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_runs_without_validation_are_left_off_the_val_graph(tmp_path):
    import matplotlib.pyplot as plt

    no_val = [{**row, "val_acc": float("nan")} for row in _history(4, 0.3)]
    _fig, ax = plt.subplots()
    figures._runs_panel(ax, [("full-train", [no_val]), ("held-out", [_history(4, 0.3)])],
                        "val_acc", "validation accuracy")  # fmt: skip
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["held-out"]
    _fig, ax = plt.subplots()
    figures._runs_panel(ax, [("full-train", [no_val])], "val_acc", "validation accuracy")
    assert ax.get_legend() is None
    plt.close("all")
    assert [t.get_text() for t in ax.texts] == ["no run recorded validation accuracy"]


def test_a_pipe_in_a_run_name_or_change_keeps_the_markdown_table_whole(tmp_path):
    rows = [_row("plain", 0.3), {**_row("a|b", 0.4), "changes": "flip | jitter"}]
    write_suite_report(SUITE, rows, tmp_path)
    table = [line for line in (tmp_path / "results.md").read_text().splitlines() if line[:1] == "|"]
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in table]
    assert len(set(cells)) == 1 and "| a\\|b | flip \\| jitter |" in table[-1]


def test_a_run_of_several_seeds_without_validation_is_reported_beside_one_with_it(tmp_path):
    no_val = {k: v for k, v in _row("full-train", 0.4, seeds=2).items() if "val_acc" not in k}
    rows = [_row("plain", 0.3), {**no_val, "best_test_acc": 0.42, "best_test_acc_std": 0.01}]
    write_suite_report(SUITE, rows, tmp_path)
    table = (tmp_path / "results.md").read_text()
    line = next(x for x in table.splitlines() if x.startswith("| full-train"))
    assert "| – |" in line and "42.00 ± 1.00" in line


def test_a_rewritten_suite_report_replaces_each_file_whole_never_writing_into_it(tmp_path):
    # each file of the first report is also linked from `kept`: a file written into in place
    # (truncated, then filled; a kill meanwhile leaves it cut short) would change there too
    import os

    (tmp_path / "out").mkdir()
    (tmp_path / "kept").mkdir()
    write_suite_report(SUITE, _rows(), tmp_path / "out")
    before = {}
    for f in (tmp_path / "out").iterdir():
        if f.is_file():
            os.link(f, tmp_path / "kept" / f.name)
            before[f.name] = f.read_bytes()
    write_suite_report(SUITE, _rows()[1:], tmp_path / "out")
    assert {"results.csv", "results.md", "index.html", "curves.png"} <= set(before)
    assert {f.name: f.read_bytes() for f in (tmp_path / "kept").iterdir()} == before
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left


def test_a_suite_without_validation_never_says_best_pt_is_chosen_on_validation(tmp_path):
    no_val = [{**e, "val_acc": float("nan"), "test_acc": e["val_acc"]} for e in _history(3, 0.3)]
    row = {k: v for k, v in _row("full-train", 0.3).items() if "val_acc" not in k}
    write_suite_report(SUITE, [{**row, "histories": [no_val], "best_test_acc": 0.42}], tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert '<img src="curves_test_acc.png"' in page and "chosen on validation" not in page
    assert "no validation split: best.pt is the last epoch" in page


def _killed_at(step: int, out, write) -> int:
    """`write()` in a child process SIGKILLed just before its `step`-th removal or renaming of a
    file in `out` (what a reader of `out` can see); its wait status (0: it finished first)."""
    import os
    import signal
    from pathlib import Path

    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    seen, unlink, replace = [0], os.unlink, os.replace

    def counted(op, name, *args, **kw):
        if Path(name).parent == out and "dir_fd" not in kw:
            seen[0] += 1
            if seen[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
        return op(name, *args, **kw)

    os.unlink = lambda p, *a, **kw: counted(unlink, p, *a, **kw)
    os.replace = lambda s, d, *a, **kw: counted(lambda _d, *x, **k: replace(s, d, **k), d)
    write()
    os._exit(0)


def test_a_suite_killed_while_writing_its_report_never_leaves_files_of_two_tables(
    tmp_path, monkeypatch
):
    """A kill between two files left e.g. a new results.csv beside the earlier results.md."""
    import os
    import time

    from cifarlab.rundir import STALE_TEMP_SECONDS

    def curves(runs, panels, path):  # a stand-in PNG naming its runs: a table's own bytes
        path.write_text(f"{[r for r, _ in runs]} {panels}")

    monkeypatch.setattr(figures, "runs_curves", curves)
    tables = {"old": _rows(), "new": _rows()[1:3]}
    files = {}  # each table's report: {name: bytes}
    for name, rows in tables.items():
        (tmp_path / name).mkdir()
        write_suite_report(SUITE, rows, tmp_path / name)
        files[name] = {f.name: f.read_bytes() for f in (tmp_path / name).iterdir()}
    status, step = None, 0
    while status != 0:
        step += 1
        out = tmp_path / f"killed-{step}"
        out.mkdir()
        write_suite_report(SUITE, tables["old"], out)
        status = _killed_at(step, out, lambda o=out: write_suite_report(SUITE, tables["new"], o))
        seen = {f.name: f.read_bytes() for f in out.iterdir() if not f.name.startswith(".")}
        whose = [t for t, report in files.items() if seen.items() <= report.items()]
        assert whose, f"killed at step {step}: files of two tables {sorted(seen)}"
        if "index.html" in seen:  # index.html is there only beside all of its table's files
            assert seen == files[whose[0]], f"killed at step {step}: {sorted(seen)}"
        old = time.time() - STALE_TEMP_SECONDS - 1  # a killed writer's leftovers, gone stale
        for f in out.iterdir():
            if f.name.startswith("."):
                os.utime(f, (old, old))
        write_suite_report(SUITE, tables["new"], out)  # the next suite command: whole again
        assert sorted(f.name for f in out.iterdir()) == sorted(files["new"])  # no temporary
        assert {f.name: f.read_bytes() for f in out.iterdir()} == files["new"]
    assert step > 5 and os.WIFEXITED(status)


def test_a_figure_not_drawn_again_is_not_left_beside_a_newer_table(tmp_path):
    write_suite_report(SUITE, _rows(), tmp_path)
    (tmp_path / "mixup_examples.png").write_bytes(b"drawn for another suite")
    assert (tmp_path / "curves.png").is_file()
    not_run = [{"run": "plain", "changes": "+ plain", "seeds": 0, "histories": [],
                "status": "cannot start: no weights"}]  # fmt: skip
    write_suite_report(SUITE, not_run, tmp_path)  # no epoch recorded: no curves to draw
    assert not list(tmp_path.glob("*.png"))
    assert "<img" not in (tmp_path / "index.html").read_text()


def test_every_curve_a_suite_draws_is_a_report_file_no_run_may_be_named():
    from cifarlab.report import REPORT_FILES
    from cifarlab.report.suite import PANELS

    assert {f"curves_{key}.png" for key in PANELS} <= set(REPORT_FILES)


def test_drawing_a_dollar_class_name_leaves_the_callers_mathtext_on(tmp_path):
    import matplotlib
    import numpy as np

    figures.per_class(np.array([0.5, 0.7]), ["$\\frac$", "b"], tmp_path / "pc.png")
    assert (tmp_path / "pc.png").stat().st_size and matplotlib.rcParams["text.parse_math"]
