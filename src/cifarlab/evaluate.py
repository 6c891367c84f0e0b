"""`cifarlab evaluate`: predictions of a checkpoint on a split, metrics, figures and the HTML report."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab import gradcam, metrics, rundir
from cifarlab.checkpoint import load_checkpoint, resolve_checkpoint
from cifarlab.config import TrainConfig, apply_overrides, expand, quoted_name, quoting_hint
from cifarlab.data import ImageSet
from cifarlab.data.loaders import to_device_uint8
from cifarlab.data.sources import check_outside_images, printable
from cifarlab.errors import UserError
from cifarlab.eval_set import load_eval_set, same_source
from cifarlab.hardware import pick_device
from cifarlab.inference import TTA_VIEWS, load_model
from cifarlab.report import figures
from cifarlab.report.html import write_report
from cifarlab.tracking import log_report
from cifarlab.training_run import image_digests


@dataclass
class EvalOptions:
    target: str  # run directory or checkpoint
    split: str | None = None  # val | test; None: val where the run had one (`load_eval_set`)
    data: str | None = None  # another data source than the run's, scored whole (`_other_data`)
    tta: str = "none"  # none | flip | flip-translate, reported beside the plain figure
    ema: bool = False
    out: Path | None = None
    classes: list[str] | None = None  # classes for the mistakes gallery (default: the two hardest)
    device: str = "auto"
    on_bad_image: str | None = None  # error | skip; None: as the run was trained


CORRECT_PER_CLASS = 2  # correct examples beside the mistakes: what the model gets right looks like


def _gallery_groups(
    data: ImageSet, probs: np.ndarray, classes: list[str], chosen: list[int]
) -> list:
    """Per chosen class: its five most confident mistakes, then its most confident correct ones."""
    preds, conf = probs.argmax(1), probs.max(1)
    groups = []
    for c in chosen:
        wrong = np.flatnonzero((data.labels == c) & (preds != c))
        right = np.flatnonzero((data.labels == c) & (preds == c))
        picks = [
            *wrong[np.argsort(-conf[wrong], kind="stable")][:5],
            *right[np.argsort(-conf[right], kind="stable")][:CORRECT_PER_CLASS],
        ]
        items = [
            {"index": int(i), "image": data.images[i], "predicted": classes[preds[i]],
             "confidence": float(conf[i]), "correct": bool(preds[i] == c)}
            for i in picks
        ]  # fmt: skip
        groups.append((classes[c], items))
    return groups


def _add_gradcam(groups: list, loaded, classes: list[str]) -> dict:
    """Adds each gallery item's `cam` (of its predicted class); returns the report's note on them."""
    if not gradcam.have_captum():
        return {"note": "Grad-CAM heat maps need the extra: pip install 'cifarlab[gradcam]'"}
    items = [item for _, group in groups for item in group]
    if not items:
        return {"note": "no images in the gallery"}
    images = torch.from_numpy(np.stack([it["image"] for it in items])).permute(0, 3, 1, 2)
    targets = torch.tensor([classes.index(it["predicted"]) for it in items])
    maps, layer = gradcam.gradcam_maps(loaded, images, targets)
    for item, cam in zip(items, maps, strict=True):
        item["cam"] = cam
    return {"layer": layer.name, "map_side": layer.side, "target": "predicted class",
            "images": len(items)}  # fmt: skip


def _chosen_classes(opts: EvalOptions, classes: list[str], pc: dict) -> list[int]:
    """--classes (checked before any work), else the two hardest classes with images here."""
    if not opts.classes:
        ranked = np.argsort(np.where(pc["support"] > 0, pc["accuracy"], np.inf), kind="stable")
        return [int(i) for i in ranked[: min(2, int((pc["support"] > 0).sum()))]]
    return [classes.index(c) for c in opts.classes]


def _default_out(opts: EvalOptions, ckpt_path: Path, split: str) -> str:
    """`eval-<split>`, then what else was scored: `-<checkpoint>` other than best.pt, `-ema`,
    `-<data name>` for `--data`; so two evaluations never share a default folder, and the same
    one again replaces its own report."""
    parts = [split] + [ckpt_path.stem] * (ckpt_path.name != "best.pt") + ["ema"] * opts.ema
    if opts.data is not None:
        parts.append(expand(opts.data).resolve().name[:64])
    return "eval-" + "-".join(re.sub(r"[^\w.-]+", "_", p).strip("._") or "data" for p in parts)


def _say_replaced(out: Path, tta: str, log) -> None:
    """Evaluations with any --tta share their default folder (a TTA report is the plain one plus
    its TTA accuracy); where this one replaces a report made with another, say so."""
    with contextlib.suppress(OSError, ValueError, TypeError):  # no report, or not cifarlab's
        old = json.loads((out / "report.json").read_text())
        if not isinstance(old, dict) or old.get("tta", tta) == tta:
            return
        acc = old.get("tta_accuracy")
        was = "without TTA" if acc is None else f"with {old['tta']} TTA ({acc:.2%})"
        now = " without a TTA accuracy" if tta == "none" else f", adding the {tta} TTA accuracy"
        log(f"note: {out} held this evaluation's report {was}; this one replaces it{now} (the "
            "same plain figures): evaluations with any --tta share the folder")  # fmt: skip


def _check_out(out: Path, src: str) -> None:
    rundir.check_out(out)
    rundir.check_not_a_run(out, "evaluate writes its report", out / "eval")
    check_outside_images(out, src)  # its PNGs would be read as a class


def evaluate(opts: EvalOptions, log=print) -> dict:
    if opts.split not in ("val", "test", None):  # the CLI checks its choices; the API may not
        raise UserError(f"split {opts.split!r}: give val or test")
    if opts.tta not in TTA_VIEWS:
        raise UserError(f"tta {opts.tta!r}: give one of {', '.join(TTA_VIEWS)}")
    ckpt_path = resolve_checkpoint(opts.target)
    if expand(opts.target).is_dir() and ckpt_path.name != "best.pt":  # no epoch was chosen yet
        log(f"note: {opts.target} has no best.pt; scoring {ckpt_path.name}")
    ckpt = load_checkpoint(ckpt_path)
    trained = apply_overrides(TrainConfig(), ckpt["config"], where=str(ckpt_path))
    own_data = opts.data is None or same_source(opts.data, trained.data)
    classes = list(ckpt["classes"])
    unknown = [c for c in opts.classes or [] if c not in classes]
    if unknown:
        raise UserError(
            f"--classes: unknown classes {unknown}; the model knows {classes}{quoting_hint(classes)}"
        )
    if opts.out:
        _check_out(opts.out, opts.data or trained.data)  # before any work or file
    data, source, split = load_eval_set(
        ckpt, str(ckpt_path), split=opts.split, data=opts.data, on_bad_image=opts.on_bad_image
    )
    out = opts.out or ckpt_path.parent / _default_out(opts, ckpt_path, split)
    if not opts.out:  # named for the split scored, known once the data is read
        _check_out(out, opts.data or trained.data)
    if len(data) == 0:
        raise UserError(
            f"{ckpt_path}: the run has no validation split (val_size 0) to score; use --split test "
            "where its data has a test split, or --data a folder of <class>/ images"
            if split == "val" and own_data
            else f"{opts.data or source}: no images to score"
        )
    device = pick_device(opts.device, "--device cpu")
    loaded = load_model(ckpt, device, opts.ema)
    report, probs, pc = _score(loaded, data, opts, device)
    rows = rundir.read_metrics(ckpt_path.parent / "metrics.csv")
    report.update(checkpoint=printable(ckpt_path), ema=opts.ema, data=printable(source),
                  split=split, classes=classes, training=_training_entry(rows),
                  trained_on_images=_trained_on(ckpt, data))  # fmt: skip
    if opts.split and split == "all":  # a plain folder has no split to pick: it is scored whole
        log(f"note: --split {opts.split}: {source} is a plain <class>/ folder (no val/ or test/ "
            f"folder), so all {len(data)} of its images are scored")  # fmt: skip
    if not rows:  # no curves: the file missing, or there but not parsing, said apart
        report["curves_note"] = rundir.metrics_unread(ckpt_path.parent / "metrics.csv") + (
            ", so no training curves"
        )
    if report["trained_on_images"] is None:
        log(f"note: {ckpt_path} keeps no train_digests, so whether its run trained on these "
            "images is not checked")  # fmt: skip
    elif report["trained_on_images"]:
        log(f"warning: the run trained on {report['trained_on_images']} of these "
            f"{len(data)} images: their accuracy is training accuracy, not held-out")  # fmt: skip
    note = _calibration_note(loaded.temperature, split, rows)
    if note:
        report["calibration_note"] = note
    groups = _gallery_groups(data, probs, classes, _chosen_classes(opts, classes, pc))
    report["gradcam"] = _add_gradcam(groups, loaded, classes)
    if not opts.out:  # a --out may hold another checkpoint's report: only the default is known
        _say_replaced(out, opts.tta, log)
    with _report_folder(out) as part:
        _write_files(report, data, probs, groups, rows, part)
        write_report(report, ckpt["config"], part)
    log_report(ckpt_path.parent, out, report, log)  # into the run's MLflow run, when it has one
    _summary(report, out, log)
    return report


def _trained_on(ckpt: dict, data: ImageSet) -> int | None:
    """How many of `data`'s images the run trained on, known by their pixels (`image_digests`,
    whatever the files are called); None where the checkpoint keeps no `train_digests`."""
    theirs = ckpt.get("train_digests")
    if theirs is None:
        return None
    return int(np.isin(image_digests(data.images).numpy(), theirs.numpy()).sum())


def _score(loaded, data: ImageSet, opts: EvalOptions, device) -> tuple[dict, np.ndarray, dict]:
    """The report, the probabilities (with the model's temperature) and the per-class arrays."""
    images = to_device_uint8(data.images, device)
    labels = torch.from_numpy(data.labels).to(device)
    logits = loaded.logits(images)
    probs = torch.softmax(logits / loaded.temperature, 1).cpu().numpy()
    y, preds = data.labels, probs.argmax(1)
    cm = metrics.confusion_matrix(y, preds, len(loaded.classes))
    pc = metrics.per_class(cm)
    calib = metrics.calibration(probs, y)
    report = {
        "accuracy": float((preds == y).mean()),
        "num_images": len(y),
        "confusion_matrix": cm.tolist(),
        "top5_accuracy": metrics.top_k_accuracy(probs, y, 5),
        "mean_loss": F.cross_entropy(logits, labels).item(),  # raw logits, as training's val_loss
        "expected_calibration_error": calib["ece"],
        "tta_accuracy": None,
        "tta": opts.tta,
        "per_class": {c: _class_entry(pc, i) for i, c in enumerate(loaded.classes)},
        "most_confused": metrics.most_confused(cm, loaded.classes),
        "most_confused_pairs": metrics.most_confused_pairs(cm, loaded.classes),
        "calibration": calib,
        "temperature": loaded.temperature,
    }
    if loaded.temperature != 1.0:  # the uncalibrated ECE and bins beside the calibrated ones
        before = metrics.calibration(torch.softmax(logits, 1).cpu().numpy(), y)
        report.update(expected_calibration_error_before=before["ece"], calibration_before=before)
    if opts.tta != "none":
        tta_logits = loaded.logits(images, tta=opts.tta, plain=logits)  # the plain view reused
        report["tta_accuracy"] = float((tta_logits.argmax(1) == labels).float().mean())
    return report, probs, pc


def _calibration_note(temperature: float, split: str, rows: list[dict]) -> str | None:
    if temperature != 1.0:
        if split != "val":
            return None
        return (
            "the temperature was fitted on this validation split, so the ECE after it is "
            "in-sample; --split test (or --data) measures it on held-out images"
        )
    if rows and all(math.isnan(r["val_acc"]) for r in rows):
        return "not calibrated: the run has no validation split to fit on"
    return "not calibrated: cifarlab calibrate RUN fits a temperature on the validation split"


@contextlib.contextmanager
def _report_folder(out: Path):
    """A temporary sibling of `out` to write the report into, moved into `out` file by file with
    `report.json` last (removed first): a folder without `report.json` is an incomplete report,
    and a stopped or failed write says in one line what `out` then holds."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        part = rundir.temp_folder(out)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create it ({exc.strerror})") from None
    try:  # curves.png removed too: without metrics.csv now none replaces an earlier run's
        with rundir.moved_in_when_complete(part, out, "report.json", ["curves.png"]):
            yield part
    except OSError as exc:  # a full disk: one line and exit 2, not a PNG writer's traceback
        raise UserError(
            f"--out {out}: could not write the report ({exc.strerror or exc}); "
            f"{_left(out)}; free space (or make it writable) and evaluate again"
        ) from None
    except (KeyboardInterrupt, SystemExit):
        print(f"evaluate stopped; {_left(out)}", file=sys.stderr)
        raise


def _left(out: Path) -> str:
    if (out / "report.json").is_file():
        return f"{out} holds the earlier report, unchanged"
    if out.is_dir():
        return f"{out} has no report.json (incomplete: evaluate again)"
    return f"nothing was written to {out}"


def _training_entry(rows: list[dict]) -> dict:
    """Length and time of the run; its per-epoch test record when it has one: the final
    epoch's, and without validation (the lesson's protocol) the best epoch's, chosen on test."""
    entry = {"epochs": len(rows), "seconds": float(sum(r["seconds"] for r in rows))}
    tests = [r.get("test_acc", float("nan")) for r in rows]
    if rows and not math.isnan(tests[-1]):
        entry["final_test_acc"] = tests[-1]
        if all(math.isnan(r["val_acc"]) for r in rows):
            entry["best_test_acc"] = max(t for t in tests if not math.isnan(t))
    return entry


def _class_entry(pc: dict, i: int) -> dict:
    """One class's figures; with no images of it here, no accuracy, recall or f1 (null)."""
    entry = {k: int(v[i]) if k == "support" else float(v[i]) for k, v in pc.items()}
    return entry | (dict.fromkeys(("accuracy", "recall", "f1")) if not entry["support"] else {})


def _write_files(report, data, probs, groups, rows, out: Path) -> None:
    classes, pc = report["classes"], report["per_class"]
    fields = ["accuracy", "precision", "recall", "f1", "support"]
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", *fields])
        for c in classes:  # no images of a class: no accuracy, recall or f1 ("")
            w.writerow([c, *("" if pc[c][k] is None else round(pc[c][k], 5) for k in fields)])
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "true", "predicted", "confidence"])
        for i, p in enumerate(probs):
            path = data.paths[i] if data.paths else ""
            w.writerow(
                [i, path, classes[data.labels[i]], classes[p.argmax()], round(float(p.max()), 5)]
            )
    cm = np.asarray(report["confusion_matrix"])
    scored = [c for c in classes if pc[c]["support"] > 0]
    acc = np.asarray([pc[c]["accuracy"] for c in scored])
    figures.confusion_matrix(cm, classes, report["most_confused"], out / "confusion_matrix.png")
    figures.per_class(acc, scored, out / "per_class.png")
    figures.mistakes(groups, out / "mistakes.png")
    figures.reliability(
        report["calibration"], out / "calibration.png", report.get("calibration_before"),
        report["temperature"],
    )  # fmt: skip
    if rows:  # else `curves_note` says why there are none
        figures.curves(rows, out / "curves.png")
    (out / "report.json").write_text(rundir.json_text(report))


def _summary(report: dict, out: Path, log) -> None:
    pc, r, q = report["per_class"], report, quoted_name  # "a,b" quoted in these comma lists
    hardest = sorted((c for c in pc if pc[c]["support"]), key=lambda c: pc[c]["accuracy"])[:3]
    tta = (
        f" (with {r['tta']} TTA: {r['tta_accuracy']:.2%})" if r["tta_accuracy"] is not None else ""
    )
    one_way = [
        f"{q(p['true'])} -> {q(p['predicted'])} ({p['count']})" for p in r["most_confused"][:3]
    ]
    both = [
        f"{' <-> '.join(map(q, p['classes']))} ({p['count']})" for p in r["most_confused_pairs"][:3]
    ]
    what = "images (all of the data)" if r["split"] == "all" else f"{r['split']} images"
    have = sum(1 for c in pc if pc[c]["support"])  # the others: no accuracy, not 0%
    verb = "has" if have == 1 else "have"
    some = f" ({have} of {len(pc)} classes {verb} images)" if have < len(pc) else ""
    log(f"accuracy {r['accuracy']:.2%}{tta} on {r['num_images']} {what}{some}")
    log("hardest classes: " + ", ".join(f"{q(c)} {pc[c]['accuracy']:.1%}" for c in hardest))
    log("most confused: " + (", ".join(one_way) or "none"))
    log("most confused pairs (both directions): " + (", ".join(both) or "none"))
    if "expected_calibration_error_before" in r:
        log(
            f"calibration: temperature {r['temperature']:.3f}, ECE "
            f"{r['expected_calibration_error_before']:.3f} -> {r['expected_calibration_error']:.3f}"
        )
    if "curves_note" in r:
        log(f"note: {r['curves_note']}")
    log(f"report: {out / 'report.html'}")
