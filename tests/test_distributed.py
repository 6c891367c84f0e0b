import subprocess
import sys

from cifarlab.rundir import read_metrics


def _train(args, out, nproc):
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",  # a free port: two test sessions on one machine do not collide
    ]
    cmd = [
        *(launcher if nproc > 1 else [sys.executable]),
        "-m",
        "cifarlab",
        "train",
        "--out",
        str(out),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_two_gloo_processes_match_one_process_and_write_one_set_of_files(real_jpegs, tmp_path):
    args = [
        "--data",
        str(real_jpegs),
        "--data-root",
        str(tmp_path / "d"),
        "--recipe",
        "fast",
        "--epochs",
        "3",
        "--batch-size",
        "100",
        "--val-size",
        "100",
        "--no-progress",
        "--set",
        "tta=none",
        "--set",
        "warmup_epochs=0.5",
        "--set",
        "lr=0.5",
        "--set",
        "threads=1",
        "--set",
        "amp=off",
    ]  # fmt: skip (auto would time bf16 in each process: runs could differ)
    single = read_metrics(_train(args, tmp_path / "one", 1) and tmp_path / "one" / "metrics.csv")
    ddp_proc = _train(args, tmp_path / "two", 2)
    double = read_metrics(tmp_path / "two" / "metrics.csv")
    assert [r["epoch"] for r in double] == [1, 2, 3]
    assert abs(double[-1]["val_acc"] - single[-1]["val_acc"]) <= 0.08, (single[-1], double[-1])
    assert double[-1]["val_acc"] > 0.25  # it learned: chance is 0.1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "best.pt",
        "config.yaml",
        "last.pt",
        "metrics.csv",
        "result.json",
    ]
    assert ddp_proc.stdout.count("epoch 3/3") == 1  # only rank 0 talks
    assert ddp_proc.stdout.count("done: ") == 1
