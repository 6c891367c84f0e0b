import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from cifarlab.cli import main
from cifarlab.errors import UserError
from cifarlab.evaluate import EvalOptions, evaluate
from cifarlab.train import train
from tests.conftest import copy_run, make_config, read_only_folder, write_synthetic_folder

FILES = ["report.json", "confusion_matrix.png", "per_class.png", "per_class.csv", "mistakes.png",
         "calibration.png", "curves.png", "report.html"]  # fmt: skip


@pytest.fixture(scope="module")
def small_run(fastnet_run, tmp_path_factory):
    """The session's fastnet run on real images (100 of them held out), copied: evaluations
    write into the run directory."""
    return copy_run(fastnet_run, tmp_path_factory.mktemp("eval") / "run")


def test_evaluate_writes_every_file_and_consistent_numbers(small_run):
    report = evaluate(EvalOptions(str(small_run), tta="flip"), log=lambda s: None)
    out = small_run / "eval-val"
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    cm = np.asarray(report["confusion_matrix"])
    assert cm.sum() == report["num_images"] == 100
    pc = report["per_class"]
    weighted = sum(pc[c]["accuracy"] * pc[c]["support"] for c in pc) / report["num_images"]
    assert weighted == pytest.approx(report["accuracy"])
    assert report["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    with open(out / "predictions.csv") as f:  # ECE is at least |mean confidence - accuracy|
        mean_confidence = np.mean([float(r["confidence"]) for r in csv.DictReader(f)])
    gap = abs(mean_confidence - report["accuracy"])
    assert report["expected_calibration_error"] >= gap - 1e-4
    assert report["top5_accuracy"] >= report["accuracy"]
    assert report["tta_accuracy"] is not None
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"] == report["accuracy"]


def test_predict_agrees_with_evaluate_on_the_same_images(small_run, real_jpegs, capsys):
    evaluate(EvalOptions(str(small_run)), log=lambda s: None)
    rows = (small_run / "eval-val" / "predictions.csv").read_text().splitlines()[1:]
    expected = {}
    for row in rows[:40]:
        _i, path, _true, pred, _conf = row.split(",")
        expected[str(real_jpegs / path)] = pred
    assert main(["predict", str(small_run), *expected, "--json", "--top-k", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 40 and all(len(entry["top_k"]) == 2 for entry in lines)
    assert {entry["path"]: entry["top_k"][0]["class"] for entry in lines} == expected


def test_predict_reports_unreadable_files_and_exits_1(small_run, tmp_path, real_jpegs, capsys):
    good = tmp_path / "good.jpg"
    shutil.copy(next((real_jpegs / "train" / "cat").glob("*.jpg")), good)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")  # opened, it would wait for a writer for good
    assert main(["predict", str(small_run), str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "good.jpg" in out and "bad.png: not a readable image" in err
    assert "gone.jpg: not a regular file" in err and "pipe.jpg: not a regular file" in err
    assert main(["predict", str(small_run), str(tmp_path / "pipe.jpg")]) == 1
    assert "pipe.jpg: not a regular file" in capsys.readouterr().err


def test_predict_leaves_out_the_junk_files_training_leaves_out(
    small_run, tmp_path, real_jpegs, capsys
):
    folder = tmp_path / "photos"
    (folder / "__MACOSX").mkdir(parents=True)
    shutil.copy(next((real_jpegs / "train" / "cat").glob("*.jpg")), folder / "x.jpg")
    apple_double = b"\x00\x05\x16\x07" + bytes(60)  # what macOS writes beside x.jpg
    for junk in ("._x.jpg", "__MACOSX/._x.jpg", ".DS_Store"):
        (folder / junk).write_bytes(apple_double)
    assert main(["predict", str(small_run), str(folder)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and "x.jpg" in out and "._x.jpg" not in out + err


def test_missing_metrics_gives_a_report_without_curves(small_run, tmp_path):
    shutil.copy(small_run / "best.pt", tmp_path / "best.pt")
    report = evaluate(
        EvalOptions(str(tmp_path / "best.pt"), out=tmp_path / "ev"), log=lambda s: None
    )
    assert "no metrics.csv" in report["curves_note"]
    assert not (tmp_path / "ev" / "curves.png").exists()
    assert "no metrics.csv" in (tmp_path / "ev" / "report.html").read_text()


def test_checkpoint_of_another_class_count_is_refused(small_run, tmp_path):
    other = tmp_path / "other"
    for i, cls in enumerate(["a", "b"]):
        (other / "test" / cls).mkdir(parents=True)
        (other / "train" / cls).mkdir(parents=True)
        from PIL import Image

        for j in range(3):
            Image.new("RGB", (32, 32), (i * 200, j * 50, 0)).save(other / "test" / cls / f"{j}.png")
            Image.new("RGB", (32, 32), (i * 200, j * 50, 0)).save(
                other / "train" / cls / f"{j}.png"
            )
    with pytest.raises(UserError, match="10 classes.* 2"):
        evaluate(EvalOptions(str(small_run), split="test", data=str(other)), log=lambda s: None)


def test_gallery_shows_grad_cam_of_the_predicted_class_for_mistakes_and_correct_images(
    small_run, tmp_path
):
    report = evaluate(EvalOptions(str(small_run), out=tmp_path / "ev"), log=lambda s: None)
    cam = report["gradcam"]
    assert cam["layer"] == "body.3.4" and cam["target"] == "predicted class"  # fastnet's last conv
    assert 2 <= cam["images"] <= 14  # two classes: up to 5 mistakes and 2 correct images each
    page = (tmp_path / "ev" / "report.html").read_text()
    assert 'alt="Grad-CAM gallery' in page and "LayerGradCam" in page


def test_without_captum_the_gallery_says_how_to_get_heat_maps(small_run, tmp_path, monkeypatch):
    from cifarlab import gradcam

    monkeypatch.setattr(gradcam, "have_captum", lambda: False)
    report = evaluate(EvalOptions(str(small_run), out=tmp_path / "ev"), log=lambda s: None)
    assert "cifarlab[gradcam]" in report["gradcam"]["note"]
    assert "cifarlab[gradcam]" in (tmp_path / "ev" / "report.html").read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium_with_every_image_loaded(small_run, tmp_path):
    evaluate(EvalOptions(str(small_run)), log=lambda s: None)
    page = small_run / "eval-val" / "report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()],
                   capture_output=True, timeout=120, check=False)  # fmt: skip
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    # every <img> decoded: the DOM after script ran reports natural sizes
    script = (
        "<script>addEventListener('load',()=>{const bad=[...document.images].filter(i=>!i.complete||i.naturalWidth===0);"
        "const cam=[...document.querySelectorAll('img[alt^=\"Grad-CAM\"]')].filter(i=>i.naturalWidth>400);"
        "document.title='IMAGES:'+document.images.length+':BROKEN:'+bad.length+':GRADCAM:'+cam.length;});</script>"
    )
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", "--virtual-time-budget=5000", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False).stdout  # fmt: skip
    assert "IMAGES:" in dom and ":BROKEN:0:" in dom, dom[:300]
    assert "IMAGES:0:" not in dom
    assert ":GRADCAM:1" in dom, dom[:300]  # the gallery with its Grad-CAM heat maps decoded


def test_hundred_class_confusion_figure_shows_top_pairs_not_a_grid(tmp_path):
    from cifarlab import metrics
    from cifarlab.report import figures

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 100, 5000)
    preds = np.where(rng.random(5000) < 0.6, labels, rng.integers(0, 100, 5000))
    classes = [f"class{i}" for i in range(100)]
    cm = metrics.confusion_matrix(labels, preds, 100)
    pairs = metrics.most_confused(cm, classes, n=25)
    assert len(pairs) == 25 and pairs[0]["count"] >= pairs[-1]["count"]
    figures.confusion_matrix(cm, classes, pairs, tmp_path / "cm.png")
    from PIL import Image

    width, height = Image.open(tmp_path / "cm.png").size
    assert width < 1500 and height < 1500  # a readable bar chart, not a 100x100 grid


def test_unknown_gallery_classes_are_refused_before_any_file_is_written(
    small_run, tmp_path, capsys
):
    out = tmp_path / "ev"
    assert main(["evaluate", str(small_run), "--classes", "zebra", "--out", str(out)]) == 2
    assert "unknown classes ['zebra']" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_out_that_is_a_file_or_read_only_is_one_line(
    small_run, tmp_path, capsys, monkeypatch
):

    existing = tmp_path / "report.txt"
    existing.write_text("keep me")
    assert main(["evaluate", str(small_run), "--out", str(existing)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert existing.read_text() == "keep me"
    read_only = read_only_folder(monkeypatch, tmp_path / "ro")
    assert main(["evaluate", str(small_run), "--out", str(read_only / "ev")]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "Traceback" not in err
    other = tmp_path / "other-run"  # a training run's folder: its curves.png must survive
    other.mkdir()
    (other / "config.yaml").write_text("model: cnn\n")
    (other / "curves.png").write_bytes(b"the run's own figure")
    assert main(["evaluate", str(small_run), "--out", str(other)]) == 2
    assert (
        "holds a training run (config.yaml); evaluate writes its report" in capsys.readouterr().err
    )
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml", "curves.png"]
    assert (other / "curves.png").read_bytes() == b"the run's own figure"


def test_evaluate_on_files_with_non_utf8_names_writes_every_file(small_run, real_jpegs, tmp_path):
    import os

    data = tmp_path / "data"
    shutil.copytree(real_jpegs, data)
    cat = os.path.join(os.fsencode(data), b"train", b"cat")
    for name in os.listdir(cat):
        os.rename(os.path.join(cat, name), os.path.join(cat, b"\xff" + name))
    out = tmp_path / "ev"
    evaluate(EvalOptions(str(small_run), data=str(data), out=out), log=lambda s: None)
    assert "\\xff" in (out / "predictions.csv").read_text(encoding="utf-8")
    assert (out / "report.html").stat().st_size > 0


def test_images_the_run_trained_on_are_counted_and_warned_of(small_run, real_jpegs, tmp_path, capsys):  # fmt: skip
    import torch

    copies = shutil.copytree(real_jpegs / "train", tmp_path / "copies")  # a plain folder: all
    assert main(["evaluate", str(small_run), "--data", str(copies), "--out", f"{tmp_path}/ev"]) == 0
    warned = [s for s in capsys.readouterr().out.splitlines() if "trained on" in s]
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert (report["num_images"], report["trained_on_images"]) == (600, 500)
    assert len(warned) == 1 and warned[0].startswith("warning") and "500 of these 600" in warned[0]
    assert "trained on 500 of these 600 images" in (tmp_path / "ev" / "report.html").read_text()
    said = []
    own = evaluate(EvalOptions(str(small_run), out=tmp_path / "own"), log=said.append)
    assert own["trained_on_images"] == 0 and not any("trained on" in s for s in said)
    ckpt = torch.load(small_run / "best.pt", weights_only=False)
    del ckpt["train_digests"]  # a checkpoint from before them
    torch.save(ckpt, tmp_path / "old.pt")
    old = evaluate(EvalOptions(str(tmp_path / "old.pt"), out=tmp_path / "o"), log=said.append)
    assert old["trained_on_images"] is None and any("no train_digests" in s for s in said)


def test_a_run_folder_with_a_non_utf8_name_gets_its_report(tiny_run, tmp_path, capsys):
    import os

    run = copy_run(tiny_run, tmp_path / os.fsdecode(b"run\xff"))  # a Latin-1 name on Linux
    assert main(["evaluate", str(run)]) == 0  # report.html's write raised UnicodeEncodeError
    assert "run\\xff" in (run / "eval-val" / "report.html").read_text(encoding="utf-8")


# --- evaluate --data DIR: every image of a labelled folder -----------------------------------


def _pngs(folder, classes=("cat", "dog"), per_class=5, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / c / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-class checkpoint trained one epoch on 2 x 20 random PNGs (8 held out for val)."""
    root = tmp_path_factory.mktemp("tiny")
    data = _pngs(root / "src" / "train", per_class=20).parent
    config = make_config(data=str(data), data_root=str(root / "cache"), epochs=1, batch_size=8,
                         val_size=8)  # fmt: skip
    train(config, root / "run", log=lambda s: None)
    return root / "run"


def _score(run, data, split, tmp_path):
    opts = EvalOptions(str(run), split=split, data=str(data), out=tmp_path / f"ev-{split}")
    return evaluate(opts, log=lambda s: None)


@pytest.mark.parametrize("split", ["val", "test"])
def test_plain_class_folder_is_scored_whole_under_either_split(tiny_run, tmp_path, split):
    report = _score(tiny_run, _pngs(tmp_path / "plain", per_class=7), split, tmp_path)
    assert report["num_images"] == 14 and np.asarray(report["confusion_matrix"]).sum() == 14


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_split_asked_of_a_plain_class_folder_is_said_to_be_scored_whole(
    tiny_run, tmp_path, capsys, split
):
    plain = _pngs(tmp_path / "plain", per_class=7)
    argv = ["evaluate", str(tiny_run), "--data", str(plain), "--split", split]
    assert main([*argv, "--out", str(tmp_path / "ev")]) == 0
    said = [s for s in capsys.readouterr().out.splitlines() if "--split" in s]
    assert said == [
        f"note: --split {split}: {plain} is a plain <class>/ folder (no val/ or test/ folder), "
        "so all 14 of its images are scored"
    ]
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["split"] == "all"


def test_test_folder_without_train_is_scored_whole(tiny_run, tmp_path):
    _pngs(tmp_path / "d" / "test", per_class=6)
    assert _score(tiny_run, tmp_path / "d", "test", tmp_path)["num_images"] == 12


def test_archive_of_a_test_folder_is_scored_whole(tiny_run, tmp_path):
    import tarfile

    _pngs(tmp_path / "d" / "test", per_class=4)
    archive = tmp_path / "held-out.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "d" / "test", arcname="held-out/test")
    assert _score(tiny_run, archive, "test", tmp_path)["num_images"] == 8


def test_split_val_scores_the_val_folder_and_split_test_the_test_folder(tiny_run, tmp_path):
    _pngs(tmp_path / "d" / "train", per_class=10)
    _pngs(tmp_path / "d" / "valid", per_class=3, seed=1)
    _pngs(tmp_path / "d" / "test", per_class=4, seed=2)
    assert _score(tiny_run, tmp_path / "d", "val", tmp_path)["num_images"] == 6
    assert _score(tiny_run, tmp_path / "d", "test", tmp_path)["num_images"] == 8


def test_train_folder_without_val_folder_scores_the_runs_held_out_slice(tiny_run, tmp_path):
    import csv

    own = evaluate(EvalOptions(str(tiny_run), out=tmp_path / "own"), log=lambda s: None)
    report = _score(tiny_run, own["data"], "val", tmp_path)
    assert report["num_images"] == own["num_images"] == 8

    def paths(folder):
        with open(folder / "predictions.csv") as f:
            return [row["path"] for row in csv.DictReader(f)]

    assert paths(tmp_path / "ev-val") == paths(tmp_path / "own")


def test_the_runs_own_plain_folder_passed_as_data_gives_its_held_out_slice_not_all(tmp_path):
    data = _pngs(tmp_path / "plain", per_class=12)
    config = make_config(data=str(data), data_root=str(tmp_path / "cache"), epochs=1,
                         batch_size=8, val_size=6)  # fmt: skip
    train(config, tmp_path / "run", log=lambda s: None)
    (tmp_path / "link").symlink_to(data)  # another spelling of the same folder
    report = _score(tmp_path / "run", f"{tmp_path / 'link'}/", "val", tmp_path)
    assert report["num_images"] == 6  # it was 24: the 18 training images among them


def test_a_run_without_a_validation_split_is_a_one_line_error_with_the_way_out(tmp_path):
    data = _pngs(tmp_path / "src" / "train", per_class=6).parent
    said = []
    config = make_config(
        data=str(data),
        data_root=str(tmp_path / "cache"),
        epochs=1,
        batch_size=4,
        val_size=0,
        lr=0.01,
    )  # batches of 4 at the recipe's lr explode
    train(config, tmp_path / "run", log=said.append)
    assert any("no validation and no test split" in s for s in said)  # nothing scores it
    with pytest.raises(
        UserError, match=r"no validation split \(val_size 0\).*--split test.*--data"
    ):
        evaluate(EvalOptions(str(tmp_path / "run"), "val", out=tmp_path / "ev"), log=lambda s: None)
    with pytest.raises(UserError, match=r"no test split.*folder$") as err:  # not "--split val"
        evaluate(EvalOptions(str(tmp_path / "run")), log=lambda s: None)  # test: it held none out
    assert "--split" not in str(err.value) and "val_size 0" in str(err.value)  # none was given
    mine = EvalOptions(str(tmp_path / "run"), data=f"{data}/")  # the run's own data, whole
    with pytest.raises(UserError, match=f"--data {data}/ is the data it trained on"):
        evaluate(mine, log=lambda s: None)
    own = EvalOptions(str(tmp_path / "run"), "val", out=tmp_path / "ev", data=f"{data}/.")  # same
    with pytest.raises(UserError, match=r"no validation split \(val_size 0\)"):
        evaluate(own, log=lambda s: None)
    assert not (tmp_path / "ev").exists()
    _pngs(tmp_path / "held", per_class=3, seed=1)  # the way out it names
    report = _score(tmp_path / "run", tmp_path / "held", "val", tmp_path)
    assert report["num_images"] == 6  # and no `calibrate` suggested: it has no split to fit on
    assert "no validation split" in report["calibration_note"]


def test_a_val_size_0_run_with_a_val_folder_is_scored_on_it_by_default_in_cli_and_api(
    tmp_path, capsys, monkeypatch
):
    import cifarlab
    import cifarlab.data.cache as cache

    data = _pngs(tmp_path / "src" / "train", per_class=10).parent
    _pngs(data / "val", per_class=3, seed=1)
    _pngs(data / "test", per_class=4, seed=2)
    config = make_config(data=str(data), data_root=str(tmp_path / "cache"), epochs=1,
                         batch_size=8, val_size=0)  # fmt: skip
    train(config, tmp_path / "run", log=lambda s: None)
    reads, load = [], cache.load
    monkeypatch.setattr(cache, "load", lambda *a: reads.append(a) or load(*a))
    assert main(["evaluate", str(tmp_path / "run")]) == 0  # it scored test
    report = json.loads((tmp_path / "run" / "eval-val" / "report.json").read_text())
    assert (report["split"], report["num_images"]) == ("val", 6)
    assert len(reads) == 1  # the data read once: it also told whether the run had a val/ folder
    api = cifarlab.evaluate_model(tmp_path / "run", out=tmp_path / "api", log=None)
    assert (api["split"], api["num_images"]) == ("val", 6)
    shutil.rmtree(data / "val")  # decided from the data, as the run drew its splits
    reads.clear()
    api = cifarlab.evaluate_model(tmp_path / "run", out=tmp_path / "api2", log=None)
    assert (api["split"], api["num_images"]) == ("test", 8)  # the API refused: no val split
    assert len(reads) == 1


def test_the_runs_own_val_split_is_refused_once_its_data_changed(tmp_path):
    from cifarlab.checkpoint import atomic_save, load_checkpoint

    data = _pngs(tmp_path / "src" / "train", per_class=12).parent
    config = make_config(data=str(data), data_root=str(tmp_path / "cache"), epochs=1,
                         batch_size=8, val_size=6)  # fmt: skip
    train(config, tmp_path / "run", log=lambda s: None)
    _pngs(data / "train", per_class=14, seed=3)  # two cats and dogs more, the rest redrawn
    with pytest.raises(UserError, match="data changed.*would include training images.*--data"):
        evaluate(EvalOptions(str(tmp_path / "run"), out=tmp_path / "ev"), log=lambda s: None)
    assert not (tmp_path / "ev").exists()
    held = _pngs(tmp_path / "held", per_class=3, seed=1)  # the way out it names
    assert _score(tmp_path / "run", held, "val", tmp_path)["num_images"] == 6
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")  # a run from before the fingerprint
    del ckpt["data_fingerprint"]
    atomic_save(ckpt, tmp_path / "run" / "best.pt")
    report = evaluate(EvalOptions(str(tmp_path / "run"), out=tmp_path / "ev"), log=lambda s: None)
    assert report["num_images"] == 6


def test_a_subset_run_whose_data_shrank_says_the_data_changed_not_its_subset(tmp_path, capsys):
    """The run's --subset no longer fitting its data is the data changing, as without --subset
    (it said "subset=20 is larger than the 16 training images", a flag these commands lack)."""
    data = _pngs(tmp_path / "src" / "train", classes=("cat", "dog", "emu"), per_class=8).parent
    config = make_config(data=str(data), data_root=str(tmp_path / "cache"), epochs=1,
                         batch_size=8, val_size=6, subset=20)  # fmt: skip
    train(config, tmp_path / "run", log=lambda s: None)
    shutil.rmtree(data / "train" / "emu")
    for words in (["evaluate", "--out", str(tmp_path / "ev")], ["calibrate"]):
        code = main([words[0], str(tmp_path / "run"), *words[1:]])
        err = capsys.readouterr().err
        assert code == 2 and "data changed" in err and "subset=20" in err
        assert "lower it" not in err  # a new run's fix, not this one's
        assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "ev").exists()


def test_a_run_whose_data_shrank_below_its_val_size_says_the_data_changed_not_to_lower_it(
    tmp_path, capsys
):
    """A new run's fix ("lower --val-size") is no way out for a run's own split."""
    data = _pngs(tmp_path / "src" / "train", per_class=8).parent
    config = make_config(data=str(data), data_root=str(tmp_path / "cache"), epochs=1,
                         batch_size=8, val_size=6)  # fmt: skip
    train(config, tmp_path / "run", log=lambda s: None)
    shutil.rmtree(data / "train")
    _pngs(data / "train", per_class=3)  # 6 images: none left to train on beside val_size 6
    for words in (["evaluate", "--out", str(tmp_path / "ev")], ["calibrate"]):
        assert main([words[0], str(tmp_path / "run"), *words[1:]]) == 2
        err = capsys.readouterr().err
        assert "data changed" in err and "val_size=6" in err and "--val-size" not in err


def test_a_run_whose_data_moved_names_that_data_not_a_flag(tiny_run, tmp_path):
    from cifarlab.checkpoint import atomic_save, load_checkpoint

    ckpt = load_checkpoint(tiny_run / "best.pt")
    ckpt["config"] = {**ckpt["config"], "data": str(tmp_path / "gone")}
    atomic_save(ckpt, tmp_path / "moved.pt")
    with pytest.raises(UserError, match=r"trained on .*gone, which is no longer there") as err:
        evaluate(EvalOptions(str(tmp_path / "moved.pt"), out=tmp_path / "ev"), log=lambda s: None)
    assert not str(err.value).startswith("--data")
    (tmp_path / "gone").write_text("a file where the data folder was")  # not an archive either
    with pytest.raises(UserError, match=r"trained on .*gone, which is no longer there") as err:
        evaluate(EvalOptions(str(tmp_path / "moved.pt"), out=tmp_path / "ev"), log=lambda s: None)
    assert not str(err.value).startswith("--data")  # it said "--data ...: expected a folder"


def test_a_report_on_other_data_gets_its_own_default_folder(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    evaluate(EvalOptions(str(run)), log=lambda s: None)
    own = (run / "eval-val" / "report.json").read_text()
    other = _pngs(tmp_path / "held out!", per_class=3, seed=1)
    report = evaluate(EvalOptions(str(run), data=str(other)), log=lambda s: None)
    assert (run / "eval-val" / "report.json").read_text() == own  # not replaced
    saved = json.loads((run / "eval-all-held_out" / "report.json").read_text())
    assert saved["num_images"] == report["num_images"] == 6
    evaluate(EvalOptions(str(run), data=str(other), out=tmp_path / "ev"), log=lambda s: None)
    assert (tmp_path / "ev" / "report.json").is_file()  # --out still wins
    own_data = yaml.safe_load((run / "config.yaml").read_text())["data"]  # the run's own, as --data
    again = evaluate(EvalOptions(str(run), data=own_data), log=lambda s: None)
    assert again["num_images"] == 8  # its train/ alone: the run's own held-out split, as it was
    assert (run / "eval-val" / "report.json").read_text() == own  # still not replaced
    assert (run / f"eval-val-{Path(own_data).name}" / "report.json").is_file()


def test_another_folder_is_scored_whole_never_cut_by_the_runs_subset_or_val_size(
    tiny_run, tmp_path
):
    run = shutil.copytree(tiny_run, tmp_path / "run")  # val_size 8: it carved 8 out of train/

    def score(data, **kw):
        report = evaluate(EvalOptions(str(run), data=str(data), **kw), log=lambda s: None)
        return report["num_images"], report["split"]

    _pngs(tmp_path / "both" / "train", per_class=10)
    _pngs(tmp_path / "both" / "test", per_class=3, seed=1)
    assert score(tmp_path / "both") == (6, "test")  # its test/, not 8 out of its train/
    assert json.loads((run / "eval-test-both" / "report.json").read_text())["split"] == "test"
    _pngs(tmp_path / "trainonly" / "train", per_class=5)
    assert score(tmp_path / "trainonly") == (10, "all")
    assert score(_pngs(tmp_path / "plain", per_class=7)) == (14, "all")  # not "val"
    assert (run / "eval-all-plain" / "report.json").is_file()
    with pytest.raises(UserError, match="no val split") as err:  # asked for: not carved either
        score(tmp_path / "both", split="val")
    assert "\n" not in str(err.value)
    _pngs(tmp_path / "odd" / "train", classes=("emu", "yak"), per_class=3)  # fewer than 8 images
    with pytest.raises(UserError, match=r"does not know \(emu, yak\)") as err:
        score(tmp_path / "odd")
    assert "subset" not in str(err.value) and "\n" not in str(err.value)


def test_each_evaluation_gets_its_own_default_folder_and_a_rerun_replaces_its_own(tmp_path):
    data = _pngs(tmp_path / "src" / "train", per_class=12).parent
    config = make_config(data=str(data), data_root=str(tmp_path / "cache"), epochs=1,
                         batch_size=8, val_size=6, ema=True)  # fmt: skip
    run = tmp_path / "run"
    train(config, run, log=lambda s: None)
    said = []
    for target, ema in ((run, False), (run / "last.pt", False), (run, True), (run, False)):
        evaluate(EvalOptions(str(target), ema=ema), log=said.append)
    folders = {"eval-val": ("best.pt", False), "eval-val-last": ("last.pt", False),
               "eval-val-ema": ("best.pt", True)}  # fmt: skip
    assert sorted(p.name for p in run.glob("eval-*")) == sorted(folders)
    for name, (checkpoint, ema) in folders.items():
        report = json.loads((run / name / "report.json").read_text())
        assert (Path(report["checkpoint"]).name, report["ema"]) == (checkpoint, ema)
    assert said[-1] == f"report: {run / 'eval-val' / 'report.html'}"


def test_an_evaluation_with_another_tta_says_it_replaces_the_report_in_its_folder(
    tiny_run, tmp_path
):
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval-*"))
    notes = {}
    for tta in ("none", "none", "flip", "flip-translate", "none"):
        said = []
        evaluate(EvalOptions(str(run), tta=tta), log=said.append)
        notes.setdefault(tta, []).append([s for s in said if "replaces it" in s])
    assert [p.name for p in run.glob("eval-*")] == ["eval-val"]  # the plain figures, with TTA's
    assert notes["none"][:2] == [[], []]  # the same evaluation again: nothing to say
    assert "held this evaluation's report without TTA" in notes["flip"][0][0]
    assert "adding the flip TTA accuracy" in notes["flip"][0][0]
    assert "with flip TTA (" in notes["flip-translate"][0][0]
    lost = notes["none"][2][0]
    assert "with flip-translate TTA (" in lost and "replaces it without a TTA accuracy" in lost
    assert json.loads((run / "eval-val" / "report.json").read_text())["tta"] == "none"


def test_a_run_without_best_pt_says_it_scores_last_pt(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "best.pt").unlink()
    lines = []
    evaluate(EvalOptions(str(run), out=tmp_path / "ev"), log=lines.append)
    assert lines[0] == f"note: {run} has no best.pt; scoring last.pt"


@pytest.mark.parametrize("name", ["m.onnx", "m.pt2", "m.safetensors"])
def test_an_exported_model_is_sent_to_predict_by_evaluate_and_calibrate(tmp_path, capsys, name):
    (tmp_path / name).write_bytes(b"\x08\x07 any exported bytes")
    for command in ("evaluate", "calibrate"):
        assert main([command, str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "exported model" in err and "cifarlab predict" in err and "damaged" not in err


def test_a_subset_of_the_models_classes_is_scored_on_its_indices(tiny_run, tmp_path):
    lines = []
    opts = EvalOptions(str(tiny_run), split="test", data=str(_pngs(tmp_path / "dogs", classes=("dog",))),
                       out=tmp_path / "ev-test")  # fmt: skip
    report = evaluate(opts, log=lines.append)
    assert report["classes"] == ["cat", "dog"] and report["num_images"] == 5
    assert report["per_class"]["dog"]["support"] == 5 and report["per_class"]["cat"]["support"] == 0
    rows = (tmp_path / "ev-test" / "predictions.csv").read_text().splitlines()[1:]
    assert all(row.split(",")[2] == "dog" for row in rows)
    # a class with no images is not "hardest at 0%": it has no accuracy
    assert [x for x in lines if x.startswith("hardest classes:")] == [
        f"hardest classes: dog {report['per_class']['dog']['accuracy']:.1%}"
    ]
    cat = (tmp_path / "ev-test" / "per_class.csv").read_text().splitlines()[1].split(",")
    assert cat[0] == "cat" and cat[1] == cat[3] == cat[4] == "" and cat[5] == "0"


def test_a_test_folder_of_some_of_the_models_classes_is_scored_beside_any_train_folder(
    tiny_run, tmp_path
):
    import tarfile

    _pngs(tmp_path / "d" / "train", classes=("cat",))  # not the run's: its classes do not matter
    _pngs(tmp_path / "d" / "test", classes=("dog",), per_class=3)
    archive = tmp_path / "d.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "d", arcname="d")
    for data in (tmp_path / "d", archive):
        lines = []
        opts = EvalOptions(str(tiny_run), data=str(data), out=tmp_path / f"ev-{data.name}")
        report = evaluate(opts, log=lines.append)
        assert report["split"] == "test" and report["num_images"] == 3
        assert report["per_class"]["cat"] == {"precision": 0.0, "recall": None, "f1": None,
                                              "accuracy": None, "support": 0}  # fmt: skip
        assert [x for x in lines if x.startswith("accuracy ")] == [
            f"accuracy {report['accuracy']:.2%} on 3 test images (1 of 2 classes has images)"
        ]


def test_a_run_whose_val_and_test_folders_lack_classes_trains_evaluates_and_calibrates(tmp_path):
    import warnings

    from cifarlab.calibration import calibrate_run

    write_synthetic_folder(tmp_path / "d" / "train", per_class=6)
    write_synthetic_folder(tmp_path / "d" / "val", classes=("red", "green"), per_class=2)
    write_synthetic_folder(tmp_path / "d" / "test", classes=("red", "blue"), per_class=2)
    base = {"data": str(tmp_path / "d"), "data_root": str(tmp_path / "cache"), "epochs": 1,
            "batch_size": 6}  # fmt: skip
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no 0/0 anywhere
        train(make_config(**base), tmp_path / "run", log=lines.append)
        val = evaluate(EvalOptions(str(tmp_path / "run")), log=lines.append)
        test = evaluate(EvalOptions(str(tmp_path / "run"), split="test"), log=lines.append)
        calibrate_run(tmp_path / "run", log=lines.append)
        # trained on two classes, one of them absent from test/: scored, not "fewer than two"
        train(make_config(**base, classes=["blue", "green"]), tmp_path / "two", log=lines.append)
        two = evaluate(EvalOptions(str(tmp_path / "two"), split="test"), log=lines.append)
    data = [x for x in lines if x.startswith("data: ")]
    assert len(data) == 2 and data[0].endswith(
        "3 classes, val: 2 of 3 classes have images, test: 2 of 3 classes have images"
    )
    assert data[1].endswith(
        "2 classes, val: 1 of 2 classes has images, test: 1 of 2 classes has images"
    )
    assert val["per_class"]["blue"]["support"] == 0 and val["num_images"] == 4
    assert test["per_class"]["green"]["accuracy"] is None and test["num_images"] == 4
    assert two["classes"] == ["blue", "green"] and two["per_class"]["blue"]["support"] == 2
    assert "(2 of 3 classes have images)" in next(x for x in lines if "on 4 test images" in x)
    table = (tmp_path / "run" / "eval-test" / "report.html").read_text()
    assert "n/a (no images)" in table and "nan%" not in table


def test_the_confusion_figure_marks_a_class_without_images_not_zero_shares(tmp_path, monkeypatch):
    from cifarlab.report import figures

    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig))
    cm = np.array([[3, 1, 0], [0, 0, 0], [0, 2, 2]])
    figures.confusion_matrix(cm, ["a", "b", "c"], [], tmp_path / "cm.png")
    _counts, shares = saved[0].axes
    assert [t.get_text() for t in shares.get_yticklabels()] == ["a", "b (no images)", "c"]
    cells = [t.get_text() for t in shares.texts]
    assert cells[:3] == ["0.75", "0.25", "0.00"] and cells[3:6] == ["–"] * 3


def test_a_stray_file_in_the_scored_folder_can_be_left_out_from_evaluate(tiny_run, tmp_path):
    data = _pngs(tmp_path / "plain", per_class=3)
    (data / "dog" / "notes.txt").write_text("not an image")
    opts = EvalOptions(str(tiny_run), split="test", data=str(data), out=tmp_path / "ev")
    with pytest.raises(UserError, match="notes.txt.*evaluate's --on-bad-image skip"):
        evaluate(opts, log=lambda s: None)
    opts.on_bad_image = "skip"
    assert evaluate(opts, log=lambda s: None)["num_images"] == 6


def test_a_class_the_model_does_not_know_is_a_one_line_error(tiny_run, tmp_path):
    data = _pngs(tmp_path / "zoo", classes=("dog", "emu"))
    with pytest.raises(UserError, match=r"does not know \(emu\)") as err:
        _score(tiny_run, data, "test", tmp_path)
    assert "\n" not in str(err.value)


def test_train_only_folder_has_no_test_split(tiny_run, tmp_path):
    _pngs(tmp_path / "d" / "train")
    with pytest.raises(UserError, match="no test split"):
        _score(tiny_run, tmp_path / "d", "test", tmp_path)


def test_cifar10_test_split_still_scores_its_test_batch(tmp_path):
    from tests.test_data import _tiny_cifar10

    _tiny_cifar10(tmp_path / "root")
    config = make_config(data="cifar10", data_root=str(tmp_path / "root"), epochs=1,
                         batch_size=8, val_size=10)  # fmt: skip
    train(config, tmp_path / "run", log=lambda s: None)
    report = evaluate(EvalOptions(str(tmp_path / "run"), split="test"), log=lambda s: None)
    assert report["num_images"] == 5 and report["data"] == "cifar10"


def test_predict_on_a_folder_names_the_files_it_leaves_out_for_their_suffix(
    tiny_run, tmp_path, capsys
):
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    img = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    for name in ("a.png", "b.gif", "c.tif"):
        img.save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    assert main(["predict", str(tiny_run), str(folder)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and "a.png" in out
    assert len(err.splitlines()) == 1 and "skipped 3" in err and ".png" in err
    assert all(name in err for name in ("b.gif", "c.tif", "notes.txt"))
    # a file named on the command line is read whatever its suffix
    assert main(["predict", str(tiny_run), str(folder / "b.gif")]) == 0
    out, err = capsys.readouterr()
    assert "b.gif" in out and err == ""


def test_predict_prints_one_line_and_strict_json_per_image_whatever_the_names(
    tiny_run, tmp_path, capsys
):
    import os

    from PIL import Image

    folder = tmp_path / "odd"
    folder.mkdir()
    img = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    img.save(folder / "two\nlines.png")
    img.save(os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9.png"))  # not UTF-8
    assert main(["predict", str(tiny_run), str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and any("two\\nlines.png" in x for x in lines)
    assert any("caf\\xe9.png" in x for x in lines)
    assert main(["predict", str(tiny_run), str(folder), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == ["caf\\xe9.png", "two\nlines.png"]
    json.dumps(rows).encode("utf-8")  # no lone surrogates left


def test_predict_quotes_class_names_holding_commas_or_edge_spaces(tiny_run, tmp_path, capsys):
    import torch

    from cifarlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_run / "best.pt")
    ckpt["classes"] = ["cat, dog", ' say "hi"']
    torch.save(ckpt, tmp_path / "named.pt")
    image = _pngs(tmp_path / "img", classes=("x",), per_class=1) / "x" / "0.png"
    assert main(["predict", str(tmp_path / "named.pt"), str(image), "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert '"cat, dog" ' in out and '" say ""hi""" ' in out, out
    assert main(["predict", str(tmp_path / "named.pt"), str(image), "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)["top_k"]
    assert sorted(r["class"] for r in ranked) == [' say "hi"', "cat, dog"]  # as they are


def test_scoring_runs_as_training_scored_precision_and_memory_format(monkeypatch):
    """evaluate and predict reproduce training's own figures: in bf16 the memory format alone
    moves logits (here up to 2e-4, enough to flip an image now and then)."""
    import torch

    from cifarlab.augment import Normalize
    from cifarlab.hardware import Hardware
    from cifarlab.inference import predict_logits
    from cifarlab.models import create_model

    monkeypatch.setattr(
        "cifarlab.hardware.cpu_flags", lambda: {"amx_bf16", "amx_tile", "avx512_bf16"}
    )
    torch.manual_seed(0)
    model = create_model("cnn", 100)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    norm = Normalize([0.5] * 3, [0.25] * 3)
    as_trained = Hardware(torch.device("cpu"), torch.bfloat16, True, "the run's")
    scored = predict_logits(model, images, norm)  # evaluate's and predict's default
    assert torch.equal(scored, predict_logits(model, images, norm, hardware=as_trained))


def test_a_checkpoint_with_nan_weights_is_refused_in_one_line_by_every_command(
    tiny_run, tmp_path, capsys
):
    import torch

    from cifarlab.checkpoint import load_checkpoint

    run = tmp_path / "nan-run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval-*", ".lock"))
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(run / name)
        first = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
        ckpt["model"][first].fill_(float("nan"))
        torch.save(ckpt, run / name)  # as a damaged file would hold it (atomic_save is not checked)
    image = next((tiny_run.parent / "src" / "train" / "cat").glob("*.png"))
    for argv in (
        ["evaluate", str(run)], ["predict", str(run), str(image)],
        ["export", str(run)], ["calibrate", str(run)],
    ):  # fmt: skip
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "non-finite weights" in err and len(err.splitlines()) == 1, (argv, err)
    assert not (run / "eval-val").exists()


WRONG_TYPES = [  # the key the one line names, and an edit of a real checkpoint that gets it wrong
    pytest.param("classes", lambda c: c.update(classes=None), id="classes-None"),
    pytest.param("classes", lambda c: c.update(classes="cat"), id="classes-a-string"),
    pytest.param("classes", lambda c: c.update(classes=[0, 1]), id="classes-numbers"),
    pytest.param("model_args", lambda c: c.update(model_args=None), id="model_args-None"),
    pytest.param("model_args.name", lambda c: c["model_args"].pop("name"), id="no-model-name"),
    pytest.param("model_args.width", lambda c: c["model_args"].update(width="wide"), id="width"),
    pytest.param("mean", lambda c: c.update(mean=[0.5]), id="mean-of-1"),  # would broadcast
    pytest.param("std", lambda c: c.update(std="0.25"), id="std-a-string"),
    pytest.param("config.model", lambda c: c["config"].update(model=3), id="config.model-3"),
    pytest.param("temperature", lambda c: c.update(temperature=0.0), id="temperature-0"),  # NaN
    pytest.param("std", lambda c: c.update(std=[0.0, 0.25, 0.25]), id="std-0"),  # divides by 0
]


@pytest.mark.parametrize("key, edit", WRONG_TYPES)
def test_a_checkpoint_edited_to_a_wrong_type_is_one_line_naming_the_key_in_every_command(
    tiny_run, tmp_path, capsys, key, edit
):
    import torch

    from cifarlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_run / "best.pt")
    edit(ckpt)
    edited = tmp_path / "edited.pt"
    torch.save(ckpt, edited)
    before = edited.read_bytes()
    image = next((tiny_run.parent / "src" / "train" / "cat").glob("*.png"))
    training = ["train", "--data", str(tiny_run.parent / "src"), "--data-root",
             str(tiny_run.parent / "cache"), "--val-size", "8", "--batch-size", "8",
             "--out", str(tmp_path / "run")]  # fmt: skip
    for argv in (
        ["evaluate", str(edited)], ["predict", str(edited), str(image)], ["export", str(edited)],
        ["calibrate", str(edited)], [*training, "--init-from", str(edited)],
    ):  # fmt: skip
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert f" {key} is " in err and "restore the file" in err, (argv, err)
        assert str(edited) in err and len(err.splitlines()) == 1, (argv, err)
    assert edited.read_bytes() == before  # calibrate wrote nothing, nor did export or train:
    assert [p.name for p in tmp_path.iterdir()] == ["edited.pt"]


def test_a_checkpoint_without_config_data_needs_data_to_evaluate(tiny_run, tmp_path, capsys):
    import torch

    from cifarlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_run / "best.pt")
    del ckpt["config"]["data"]  # TrainConfig's default, cifar10, is not what it trained on
    torch.save(ckpt, tmp_path / "edited.pt")
    for command, fix in (("evaluate", "pass --data"), ("calibrate", "restore the file")):
        assert main([command, str(tmp_path / "edited.pt")]) == 2
        err = capsys.readouterr().err.strip()
        assert "no config.data" in err and fix in err and len(err.splitlines()) == 1, err
    plain = _pngs(tmp_path / "plain", per_class=3)
    assert main(["evaluate", str(tmp_path / "edited.pt"), "--data", str(plain)]) == 0


def _mtimes(folder):
    return {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}


def test_an_evaluation_stopped_while_writing_leaves_the_earlier_report_whole(
    tiny_run, tmp_path, monkeypatch, capsys
):
    from cifarlab.report import figures

    out = tmp_path / "ev"
    evaluate(EvalOptions(str(tiny_run), out=out), log=lambda s: None)
    before = _mtimes(out)

    def sigterm(*args, **kwargs):  # what SIGTERM raises in the CLI (exit 143)
        raise SystemExit(143)

    monkeypatch.setattr(figures, "mistakes", sigterm)
    with pytest.raises(SystemExit):
        evaluate(EvalOptions(str(tiny_run), out=out), log=lambda s: None)
    assert _mtimes(out) == before
    assert "earlier report, unchanged" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["ev"]  # no temporary folder left
    with pytest.raises(SystemExit):
        evaluate(EvalOptions(str(tiny_run), out=tmp_path / "fresh"), log=lambda s: None)
    assert not (tmp_path / "fresh").exists()


def test_evaluate_on_a_full_disk_is_one_line_exit_2_and_leaves_nothing(
    tiny_run, tmp_path, monkeypatch, capsys
):
    import errno

    from cifarlab.report import figures

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(figures, "confusion_matrix", full)
    out = tmp_path / "ev"
    assert main(["evaluate", str(tiny_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_scoring_leaves_the_callers_model_in_its_memory_format():
    """predict_logits feeds channels_last inputs; the caller's weights stay as they were, and the
    logits equal those of the model converted to channels_last (as training holds it)."""
    import copy

    import torch

    from cifarlab.augment import Normalize
    from cifarlab.hardware import Hardware
    from cifarlab.inference import predict_logits
    from cifarlab.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn", 10)
    trained = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    norm = Normalize([0.5] * 3, [0.25] * 3)
    hw = Hardware(torch.device("cpu"), torch.bfloat16, True, "test")
    logits = predict_logits(model, images, norm, hardware=hw)
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert all(w.is_contiguous() for w in weights)
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert torch.equal(logits, predict_logits(trained, images, norm, hardware=hw))


def test_a_report_out_among_the_datas_class_folders_is_refused(
    small_run, unseen_jpegs, tmp_path, capsys
):
    """Its figures are PNGs: a report there became a class of chart images in the next training
    on that folder, without a word."""
    data = shutil.copytree(unseen_jpegs, tmp_path / "data")
    before = sorted(data.rglob("*"))
    args = ["evaluate", str(small_run), "--data", str(data), "--split", "test"]
    assert main([*args, "--out", str(data / "test" / "ev")]) == 2
    assert "inside" in capsys.readouterr().err and sorted(data.rglob("*")) == before


def test_evaluate_scores_in_the_precision_the_run_trained_in(synthetic_images, tmp_path):
    import torch

    from cifarlab.checkpoint import load_checkpoint
    from cifarlab.inference import load_model

    # this machine's rule says fp32 (the tests' CPU has no bf16 flags); the run asked for bf16
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
                         epochs=1, batch_size=8, val_size=12, threads=1, amp="bf16")  # fmt: skip
    result = train(config, tmp_path / "run", log=lambda s: None)
    loaded = load_model(load_checkpoint(tmp_path / "run" / "best.pt"))
    assert loaded.hardware.amp_dtype == torch.bfloat16
    report = evaluate(EvalOptions(str(tmp_path / "run")), log=lambda s: None)
    assert report["accuracy"] == pytest.approx(result.final_val_acc, abs=1e-4)  # 5 decimals kept


def test_odd_class_names_survive_the_csv_html_json_and_figures(tmp_path, capsys):
    """Commas, quotes, edge spaces, HTML and `$` (mathtext) in class names: quoted in the CSV
    files, escaped in the report, whole in predict's JSON; `--classes` takes them as in CSV."""
    import html

    names = ["a,b", 'say "hi"', " lead", "café<b>&", "$\\frac$"]
    data = _pngs(tmp_path / "src", classes=names, per_class=6)
    config = make_config(data=str(data), data_root=str(tmp_path / "cache"), epochs=1,
                         batch_size=8, val_size=10)  # fmt: skip
    train(config, tmp_path / "run", log=lambda s: None)
    out = tmp_path / "ev"
    gallery = '"a,b"," lead",$\\frac$'
    assert main(["evaluate", str(tmp_path / "run"), "--out", str(out), "--classes", gallery]) == 0
    with open(out / "per_class.csv", newline="") as f:
        assert sorted(row["class"] for row in csv.DictReader(f)) == sorted(names)
    page = (out / "report.html").read_text()
    assert html.escape("café<b>&") in page and "café<b>&" not in page
    assert (out / "confusion_matrix.png").stat().st_size > 0
    capsys.readouterr()
    assert (
        main(["predict", str(tmp_path / "run"), str(data / "a,b"), "--json", "--top-k", "5"]) == 0
    )
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6 and {c["class"] for c in rows[0]["top_k"]} == set(names)


def test_the_summary_quotes_class_names_holding_commas_as_classes_takes_them():
    """The line "hardest classes: a,b 0.0%, x y 50.0%" read as classes a, b and x y."""
    from cifarlab.evaluate import _summary

    per_class = {"a,b": 0.0, 'say "hi"': 0.25, "x y": 0.5, "café": 1.0}
    report = {
        "per_class": {c: {"support": 4, "accuracy": a} for c, a in per_class.items()},
        "tta_accuracy": None, "split": "val", "accuracy": 0.4375, "num_images": 16,
        "most_confused": [{"true": "a,b", "predicted": "x y", "count": 3}],
        "most_confused_pairs": [{"classes": ["a,b", 'say "hi"'], "count": 2}],
    }  # fmt: skip
    lines = []
    _summary(report, Path("ev"), lines.append)
    assert lines[1] == 'hardest classes: "a,b" 0.0%, "say ""hi""" 25.0%, x y 50.0%'
    assert lines[2] == 'most confused: "a,b" -> x y (3)'
    assert lines[3] == 'most confused pairs (both directions): "a,b" <-> "say ""hi""" (2)'


def test_evaluate_help_says_classes_picks_the_gallery_not_the_data(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mistakes gallery" in text and "not filtered, unlike train --classes" in text


def test_predict_says_a_bad_file_named_with_a_newline_on_one_line(tiny_run, tmp_path, capsys):
    folder = _pngs(tmp_path / "imgs", per_class=1)
    (folder / "cat" / "new\nline.png").write_bytes(b"not a png")
    assert main(["predict", str(tiny_run), str(folder)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and "new\\nline.png: not a readable image" in errors[0], errors


@pytest.mark.parametrize(
    ("text", "why"),
    [("", "it is empty"), ("\x00\xff garbage\n", "it has no epoch column"),
     ("epoch,train_loss\nx,y\n", "no row of numbers with an epoch from 1")],
)  # fmt: skip
def test_a_metrics_csv_that_does_not_parse_is_said_unread_not_missing(
    tiny_run, tmp_path, capsys, text, why
):
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "metrics.csv").write_text(text)
    assert main(["evaluate", str(run), "--out", str(tmp_path / "ev")]) == 0
    notes = [s for s in capsys.readouterr().out.splitlines() if "metrics.csv" in s]
    said = f"metrics.csv beside the checkpoint could not be read ({why}), so no training curves"
    assert notes == [f"note: {said}"]
    assert said in (tmp_path / "ev" / "report.html").read_text()
