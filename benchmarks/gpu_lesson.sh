#!/usr/bin/env bash
# The lesson's Expected Results table on one GPU, about 7.5 minutes: each row trained for the
# largest length that fits its time budget (the lesson's 30-100 epochs do not fit 8 minutes), then
# one markdown table of our figures beside the lesson's, on stdout and in $OUT/gpu_lesson.md
# (or the run folder's gpu_lesson.md without $OUT). Rows, on the lesson's own settings
# (`lesson-cnn`: fp32, its DataLoader and transforms, lr 0.1 everywhere) and then on `seed-cnn`:
#   basic CNN (no augmentation), + crop/flip/jitter, + Mixup 0.2, ResNet-18 from scratch, and
#   ResNet-18 + transfer (Exercise 4's pretrained arm) when torch's hub cache holds the ImageNet
#   weights (resnet18-f37072fd.pth), else that row says so.
# Data: torchvision's CIFAR-10 (with its test split: trains on all 50,000 as the lesson does and
# reports test accuracy) when it is under the data root or downloads; else the JPEG tarball,
# 45,000 train / 5,000 val, reporting validation accuracy.
# Usage: [CNN_BUDGET=35s RESNET_BUDGET=75s QUICK=1 PY=python] benchmarks/gpu_lesson.sh [JPEG_TARBALL]
#   QUICK=1: the plumbing only (one epoch of 200 images a row; minutes on a CPU).
# Runs $PY, else the project's .venv where there is one, else python3; src/ first on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
JPEGS=${1:-../shared/data/cifar10-train-jpg.tar.gz}
if [[ -z "${PY:-}" ]]; then  # $PY: a Python with torch, when neither of these has it
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
CNN_BUDGET=${CNN_BUDGET:-35s}
RESNET_BUDGET=${RESNET_BUDGET:-75s}
runs=$(mktemp -d)
TABLE=${OUT:-$runs}/gpu_lesson.md

ready() {  # ready DATA: a tiny run loads (and caches) DATA, so no row's budget pays the decode
    timeout 120 "$PY" -m cifarlab train --data "$1" --subset 400 --val-size 100 --epochs 1 \
        --batch-size 100 --no-progress --out "$runs/ready-$2" >"$runs/ready-$2.log" 2>&1
}
if ready cifar10 cifar10; then
    DATA=cifar10; SPLIT=(--val-size 0); MEASURE=test  # the lesson's protocol: all of train, test scored
else
    DATA=$JPEGS; SPLIT=(--val-size 5000); MEASURE=val
    ready "$DATA" jpegs || { echo "cannot load $DATA:"; tail -n 3 "$runs/ready-jpegs.log"; exit 1; }
fi
LENGTH=(--time-budget)
if [[ -n "${QUICK:-}" ]]; then SPLIT=(--subset 300 --val-size 100); MEASURE=val; fi
echo "data: $DATA ($MEASURE accuracy); budgets: CNN rows $CNN_BUDGET, ResNet rows $RESNET_BUDGET"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo "no GPU: $(grep -m1 'model name' /proc/cpuinfo)"

row() {  # row NAME BUDGET ARGS...: one run, its log beside it
    local name=$1 budget=$2
    shift 2
    local length=("${LENGTH[@]}" "$budget")
    [[ -n "${QUICK:-}" ]] && length=(--epochs 1)
    echo "== $name ($(date +%T))"
    timeout 400 "$PY" -m cifarlab train --data "$DATA" "${SPLIT[@]}" "${length[@]}" --no-progress \
        --out "$runs/$name" "$@" >"$runs/$name.log" 2>&1
    echo "$name: exit $?"
    grep -E '^(epoch |done|error|best test)' "$runs/$name.log" | tail -n 4
}

NO_AUG=(--set crop_padding=0 --set flip=false --set jitter_brightness=0.0 --set jitter_contrast=0.0)
for recipe in lesson-cnn seed-cnn; do
    row "$recipe-basic" "$CNN_BUDGET" --recipe "$recipe" "${NO_AUG[@]}"
    row "$recipe-aug" "$CNN_BUDGET" --recipe "$recipe"
    row "$recipe-mixup" "$CNN_BUDGET" --recipe "$recipe" --set mixup_alpha=0.2
done
row resnet18 "$RESNET_BUDGET" --recipe resnet18
WEIGHTS=$("$PY" -c "import torch, pathlib; p = pathlib.Path(torch.hub.get_dir(), 'checkpoints', 'resnet18-f37072fd.pth'); print(p if p.is_file() else '')")
if [[ -n "$WEIGHTS" ]]; then  # Exercise 4's pretrained arm
    row transfer "$RESNET_BUDGET" --recipe resnet18 --set model=tv-resnet18 --set stem=cifar \
        --set lr=0.01 --set normalize=imagenet --set pretrained=true
fi

MACHINE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
MACHINE="${MACHINE:-no GPU, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)}; CNN rows $CNN_BUDGET, ResNet rows $RESNET_BUDGET each${QUICK:+ (QUICK: 1 epoch of 200 images)}"
"$PY" - "$runs" "$MEASURE" "$DATA" "${WEIGHTS:-}" "$MACHINE" >"$TABLE" <<'EOF'
import json, sys
from pathlib import Path

runs, measure, data, weights, machine = Path(sys.argv[1]), *sys.argv[2:6]

def cell(name: str) -> str:
    path = runs / name / "result.json"
    if not path.is_file():
        log = runs / f"{name}.log"
        last = log.read_text().strip().splitlines()[-1:] if log.is_file() else ["not run"]
        return f"no result: {last[0][:80]}"
    r = json.loads(path.read_text())
    if measure == "test":  # as the lesson prints: final, and the best epoch chosen on test
        acc = f"{r['test_acc']:.2%} test (best epoch {r['best_test_acc']:.2%}, chosen on test)"
    else:
        acc = f"{r['best_val_acc']:.2%} val"
    return f"{acc}, {r['epochs']} epoch{'s' * (r['epochs'] != 1)}, {r['seconds']:.0f} s"

transfer = cell("transfer") if weights else "not measured here: no ImageNet weights in torch's hub cache"
rows = [
    ("Basic CNN", "75-80%", cell("lesson-cnn-basic"), cell("seed-cnn-basic")),
    ("+ data augmentation", "80-85%", cell("lesson-cnn-aug"), cell("seed-cnn-aug")),
    ("+ Mixup", "85-88%", cell("lesson-cnn-mixup"), cell("seed-cnn-mixup")),
    ("ResNet-18 from scratch (`resnet18`)", "85-90% (Target Accuracy, ResNet-like)", cell("resnet18"), "-"),
    ("ResNet + transfer (Exercise 4's pretrained arm)", "90%+", transfer, "-"),
]
print(f"data: {data} ({measure} accuracy); machine: {machine}\n")
print("| the lesson's row | the lesson | the lesson's settings (`lesson-cnn`; ResNet rows as named) | `seed-cnn` |")
print("| --- | --- | --- | --- |")
for r in rows:
    print("| " + " | ".join(r) + " |")
EOF
echo
cat "$TABLE"
echo "table: $TABLE; runs: $runs"
