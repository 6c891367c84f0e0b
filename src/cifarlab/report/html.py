"""One self-contained HTML page (figures embedded as data URIs) for an evaluation."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import yaml

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:24px 40px}header h1{margin:0 0 6px;font-size:26px}
header .sub{opacity:.75}main{max-width:1180px;margin:0 auto;padding:24px 40px}
.cards{display:flex;gap:16px;flex-wrap:wrap;margin:-44px 0 24px}
.card{background:#fff;border-radius:10px;padding:14px 20px;box-shadow:0 1px 4px rgba(0,0,0,.12);min-width:130px}
.card .v{font-size:24px;font-weight:600}.card .k{font-size:12px;color:#667;text-transform:uppercase}
section{background:#fff;border-radius:10px;padding:18px 24px;margin-bottom:22px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{font-size:18px;margin:0 0 12px}img{max-width:100%;height:auto;display:block;margin:0 auto}
table{border-collapse:collapse;font-size:13px;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #e3e5ea;text-align:right}
th:first-child,td:first-child{text-align:left}pre{background:#f0f1f4;padding:12px;border-radius:6px;font-size:12px;overflow:auto}
.note{color:#8a5a00;background:#fff6e0;padding:8px 12px;border-radius:6px}
.two{display:grid;grid-template-columns:1fr 1fr;gap:22px}@media(max-width:900px){.two{grid-template-columns:1fr}}
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


# Every cifarlab page (evaluation report, suite index): a header, a row of cards, sections.
PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{title}</title><style>{css}</style></head><body>
<header><h1>{heading}</h1><div class="sub">{sub}</div></header>
<main><div class="cards">{cards}</div>
{body}
</main></body></html>"""


class Raw(str):
    """A table cell that is HTML already (links): `table` leaves it unescaped."""


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    cell = lambda c: c if isinstance(c, Raw) else html.escape(str(c))  # noqa: E731
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cards(pairs: list[tuple[str, str]]) -> str:
    """The figures at the top of a page, one (label, value) card each."""
    return "".join(
        f'<div class="card"><div class="k">{html.escape(k)}</div><div class="v">{html.escape(v)}</div></div>'
        for k, v in pairs
    )


def _note(text: str | None) -> str:
    return f'<p class="note">{html.escape(text)}</p>' if text else ""


def _gallery(r: dict, out: Path) -> str:
    cam = r.get("gradcam", {})
    if "layer" in cam:
        title = "Where the model looked: most confident mistakes of the hardest classes, then correct examples"
        about = (
            f"<p>Below each image, the Grad-CAM heat map of the predicted class (Captum "
            f"<code>LayerGradCam</code> on <code>{html.escape(cam['layer'])}</code>, a "
            f"{cam['map_side']}x{cam['map_side']} map upsampled to the image): red is where "
            "evidence for that class was found.</p>"
        )
        image = _img(out / "mistakes.png", "Grad-CAM gallery: mistakes and correct examples")
    else:
        title, about = "Most confident mistakes of the hardest classes, then correct examples", ""
        image = _img(out / "mistakes.png", "mistakes") + _note(cam.get("note"))
    return f"<section><h2>{title}</h2>{about}{image}</section>"


def _calibration(r: dict, out: Path) -> str:
    note = _note(r.get("calibration_note"))
    if "expected_calibration_error_before" not in r:
        return _img(out / "calibration.png", "reliability diagram") + note
    about = (
        f"<p>Temperature {r['temperature']:.3f} (probabilities are softmax(logits / T)): "
        f"ECE {r['expected_calibration_error_before']:.3f} before, "
        f"{r['expected_calibration_error']:.3f} after.</p>"
    )
    alt = "reliability diagram before and after temperature scaling"
    return about + _img(out / "calibration.png", alt) + note


def _test_note(r: dict) -> str:
    """What the test curve is, and the lesson's best-on-test figure beside the final one."""
    train = r.get("training", {})
    if train.get("best_test_acc") is not None:
        return _note(
            f"No validation split: best.pt is the last epoch's weights. Final test accuracy "
            f"{train['final_test_acc']:.2%}; best test accuracy over epochs "
            f"{train['best_test_acc']:.2%} (chosen on test: optimistic)."
        )
    if train.get("final_test_acc") is not None:
        return _note("Test accuracy per epoch is a record only: best.pt is chosen on validation.")
    return ""


def write_report(report: dict, config: dict, out: Path) -> Path:
    r = report
    ece = f"{r['expected_calibration_error']:.3f}"
    if "expected_calibration_error_before" in r:
        ece = f"{r['expected_calibration_error_before']:.3f} → {ece}"
    figures = [
        ("accuracy", f"{r['accuracy']:.2%}"), ("top-5", f"{r['top5_accuracy']:.2%}"),
        ("mean loss", f"{r['mean_loss']:.3f}"), ("ECE", ece),
        ("images", f"{r['num_images']:,}"),
    ]  # fmt: skip
    if r.get("tta_accuracy") is not None:
        figures.insert(1, ("accuracy with TTA", f"{r['tta_accuracy']:.2%}"))
    per_class_rows = [  # hardest first; a class without images at the end
        [c, f"{s['accuracy']:.1%}", f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}", s["support"]]
        if s["support"] else [c, "n/a (no images)", f"{s['precision']:.3f}", "n/a", "n/a", 0]
        for c, s in sorted(r["per_class"].items(), key=lambda cs: (not cs[1]["support"], cs[1]["accuracy"] or 0.0))
    ]  # fmt: skip
    pairs = [
        [p["true"], p["predicted"], p["count"], f"{p['share']:.1%}"] for p in r["most_confused"]
    ]
    both = [
        [f"{p['classes'][0]} ↔ {p['classes'][1]}", p["count"], p["forward"], p["backward"],
         f"{p['share']:.1%}"]
        for p in r.get("most_confused_pairs", [])
    ]  # fmt: skip
    train = r.get("training", {})
    sub = (
        f"{html.escape(str(config.get('model')))} · recipe {html.escape(str(config.get('recipe')))} · "
        f"{train.get('epochs', '?')} epochs · {train.get('seconds', 0) / 60:.1f} min training · "
        f"split {html.escape(r['split'])} of {html.escape(str(r['data']))}"
    )
    curves = (
        _img(out / "curves.png", "training curves") + _test_note(r)
        if (out / "curves.png").exists()
        else _note(r.get("curves_note", "no curves"))
    )
    trained = r.get("trained_on_images")
    warning = ""
    if trained:
        warning = _note(
            f"The run trained on {trained:,} of these {r['num_images']:,} images: their "
            "accuracy is training accuracy, not held-out."
        )
    body = f"""{warning}<section><h2>Confusion matrix</h2>{_img(out / "confusion_matrix.png", "confusion matrix")}</section>
<div class="two"><section><h2>Per-class accuracy</h2>{_img(out / "per_class.png", "per-class accuracy")}</section>
<section><h2>Most confused pairs, both directions</h2>{table(["pair", "count", "first → second", "second → first", "share of both"], both)}
<h2>Most confused, one direction</h2>{table(["true", "predicted", "count", "share of true"], pairs)}</section></div>
{_gallery(r, out)}
<section><h2>Calibration</h2>{_calibration(r, out)}</section>
<section><h2>Per class</h2>{table(["class", "accuracy", "precision", "recall", "F1", "support"], per_class_rows)}</section>
<section><h2>Training curves</h2>{curves}</section>
<section><h2>Checkpoint and config</h2><p>{html.escape(r["checkpoint"])}</p>
<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre></section>"""
    page = PAGE.format(
        title=f"cifarlab report — {r['accuracy']:.2%}", css=CSS, sub=sub, cards=cards(figures),
        heading=f"{r['accuracy']:.2%} accuracy on {r['num_images']:,} images", body=body,
    )  # fmt: skip
    path = out / "report.html"
    path.write_text(page)
    return path
