#!/usr/bin/env bash
# The prepared GPU check (about 7 minutes on an H200, measured in parts), in order of what it
# must answer first:
#   1. smoke: one short `fast` epoch on the GPU (stops the script if the GPU path is broken)
#   2. `fast` end to end, bf16 (amp auto), whole batches, then in chunks of 500 (the CPU default)
#   3. airbench94 as published (fp16) on the same splits 0-3, after its warm-up run
#   4. accuracy over splits 0-3 in fp32: `fast --set amp=off` against airbench94 --fp32
#   5. `fast-cpu --time-budget 30s` (does the budget hold on a GPU?), `fast-96` (150 s cap)
#   6. the images/s table (benchmarks/speed.py)
#   7. the host CPU (issue 16, acceptance 1): where it has AMX, `fast-cpu` on 2 of its cores
#      (a development machine's size) with `amp: auto` against `--set amp=off`, same subset,
#      same steps; what `auto` picked, and each epoch's img/s (the second is the figure); about
#      4 minutes. ONLY=7 runs it alone (no GPU smoke); on a host without AMX it only says so.
# Prints everything (and tees it to $OUT/gpu_fast.log where $OUT is set); paste into docs/benchmarks.md.
# Usage: [ONLY="2 3 4b"] benchmarks/gpu_fast.sh [DATA] [AIRBENCH94_PY]
#   DATA: the CIFAR-10 JPEG tarball (default ../shared/data/cifar10-train-jpg.tar.gz)
#   AIRBENCH94_PY: legacy/airbench94.py from github.com/KellerJordan/cifar10-airbench (sections
#   3 and 4b are skipped without it)
# Runs with the project's .venv where there is one, else with python3 and src/ on PYTHONPATH
# (a GPU machine's own PyTorch image).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-train-jpg.tar.gz}
AIRBENCH=${2:-}
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; export PYTHONPATH=$PWD/src; fi
export PYTHONUNBUFFERED=1
LOG=${OUT:+$OUT/gpu_fast.log}
runs=$(mktemp -d)
now_ms() { echo $(($(date +%s%N) / 1000000)); }
since() { local ms=$(($(now_ms) - $1)); printf '%d.%03d' $((ms / 1000)) $((ms % 1000)); }
wanted() { [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]]; }  # ONLY="3 5": those sections alone
t0=$(now_ms)

section() { printf '\n=== %s (at %s s)\n' "$1" "$(since "$t0")"; }
train() {  # train NAME TIMEOUT ARGS...: one run, its wall time and result.json
    local name=$1 limit=$2 start
    shift 2
    start=$(now_ms)
    timeout "$limit" "$PY" -m cifarlab train --data "$DATA" --out "$runs/$name" --no-progress "$@"
    local rc=$?
    echo "$name: exit $rc, wall $(since "$start") s (start-up and data included)"
    cat "$runs/$name/result.json" 2>/dev/null | tr -d '\n '
    echo
    return $rc
}

all_sections() {
    section "machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"

    if [[ -z "${ONLY:-}" || "$ONLY" =~ [1-6] ]]; then  # the GPU sections need a working GPU path
        section "1. smoke: fast, one epoch of 4,000 images"
        train smoke 120 --recipe fast --subset 4000 --val-size 1000 --epochs 1 || { echo "GPU path broken: stopping"; exit 1; }
    fi

    if wanted 2; then
        section "2. fast, bf16, whole batches of 2,000 (split 0)"
        train fast-bf16 90 --recipe fast --set micro_batch=0
        section "2b. fast, bf16, chunks of 500 (the recipe as written)"
        train fast-bf16-chunks 90 --recipe fast
    fi
    if wanted 3 && [[ -n "$AIRBENCH" ]]; then
        section "3. airbench94 as published (fp16), splits 0-3"
        timeout 120 "$PY" benchmarks/airbench_anchor.py --airbench "$AIRBENCH" --data "$DATA" \
            --device cuda --seeds 0,1,2,3
    fi
    if wanted 4; then
        section "4. fast in fp32 (amp=off), whole batches, splits 0-3"
        for seed in 0 1 2 3; do
            train "fast-fp32-$seed" 60 --recipe fast --seed "$seed" --set amp=off --set micro_batch=0
        done
    fi
    if wanted 4b && [[ -n "$AIRBENCH" ]]; then
        section "4b. airbench94 in fp32, splits 0-3"
        timeout 120 "$PY" benchmarks/airbench_anchor.py --airbench "$AIRBENCH" --data "$DATA" \
            --device cuda --fp32 --seeds 0,1,2,3
    fi
    if wanted 5; then
        section "5. fast-cpu --time-budget 30s"
        train budget 60 --recipe fast-cpu --time-budget 30s
    fi
    if wanted 5b; then
        section "5b. fast-96"
        train fast-96 150 --recipe fast-96
        tail -n 3 "$runs/fast-96/metrics.csv" 2>/dev/null
    fi
    if wanted 6; then
        section "6. images/s"
        timeout 90 "$PY" benchmarks/speed.py --data "$DATA" --models cnn,resnet18,fastnet --no-write
    fi
    if wanted 7; then
        section "7. the host CPU: bf16 where it has AMX (2 cores, device cpu)"
        grep -m1 'model name' /proc/cpuinfo
        if grep -q amx_bf16 /proc/cpuinfo; then
            timeout 60 taskset -c 0,1 "$PY" benchmarks/cpu_precision.py --rounds 3
            for amp in auto off; do  # the same 2 epochs of 15,000 images, only the precision differs
                CUDA_VISIBLE_DEVICES= taskset -c 0,1 timeout 240 "$PY" -m cifarlab train --recipe fast-cpu \
                    --data "$DATA" --out "$runs/host-$amp" --no-progress --subset 16000 --val-size 1000 \
                    --epochs 2 --set time_budget=0 --set tta=none --set device=cpu --set threads=2 \
                    --set amp=$amp >"$runs/host-$amp.log" 2>&1
                echo "host-$amp: exit $?"
                grep -E '^(amp:|model:|epoch )' "$runs/host-$amp.log"  # the choice and each epoch's img/s
            done
        else
            echo "no AMX on this host CPU: acceptance 1 needs one"
        fi
    fi
    section "done"
}

all_sections 2>&1 | tee "${LOG:-/dev/null}"  # a pipe, so the log is whole when the script ends
