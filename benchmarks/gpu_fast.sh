#!/usr/bin/env bash
# The prepared GPU check of issue 25 (`fast` at airbench94's pace), one script, about 6 minutes
# on an H100/H200 by the timeouts below (every step is capped; the script stops after 8):
#   0. the machine
#   1. smoke: one short `fast` epoch (stops the script if the GPU path is broken)
#   2. side by side on the same splits (cifarlab's split 0 and 1 of the same images):
#        fast, whole batches of 2,000 (`--set micro_batch=0`, as the recipe's note says for a GPU)
#        fast as written (chunks of 500), split 0
#        fast with torch.compile (`--set compile=true`), split 0: does compiling pay for itself?
#        airbench94 as published (fp16), its warm-up run first, as its own script does
#      then one table: training seconds (fast: its epochs' training and the final TTA, from
#      --profile; airbench94: its own CUDA-event timer, training and TTA) and whole-command
#      seconds (fast: `cifarlab train` from start to exit, with --profile's table; airbench94:
#      its process, less the writing of cifarlab's split into its files), and TTA accuracy.
#   3. torch.profiler over 20 steps of `fast` (benchmarks/profile_step.py): kernel time against
#      CPU-side time per step, syncs, top operators; whole batches, then chunks of 500
#   4.. the older checks (issue 16), only when named in ONLY: "4" fast in fp32 over splits 0-3,
#      "4b" airbench94 in fp32, "5" fast-cpu --time-budget 30s, "5b" fast-96, "6" images/s,
#      "7" the host CPU's bf16 (AMX) on 2 cores.
# Prints everything (and tees it to $OUT/gpu_fast.log where $OUT is set); paste the table and the
# profile into docs/benchmarks.md.
#
# Usage: [ONLY="2 3"] [TINY=1] benchmarks/gpu_fast.sh [DATA] [AIRBENCH94_PY]
#   DATA: the CIFAR-10 JPEG tarball (default: shared/data/ or ../shared/data/
#     cifar10-train-jpg.tar.gz, the first that exists)
#   AIRBENCH94_PY: legacy/airbench94.py of github.com/KellerJordan/cifar10-airbench (default:
#     shared/airbench94.py or ../shared/airbench94.py; without it its rows are skipped). A GPU
#     machine has no network: put the file there beforehand.
#   TINY=1: every section on about 1,000 training images for one epoch (on the CPU where there
#     is no GPU, with 10x the timeouts): checks the script end to end; its figures mean nothing.
#   STOP_AFTER_S: nothing new starts after this many seconds (default 420).
# Runs this checkout's src/ with $PY, else the project's .venv where there is one, else python3
# (a GPU machine's own PyTorch image).
set -uo pipefail
cd "$(dirname "$0")/.."
first() { for f in "$@"; do [[ -e "$f" ]] && { echo "$f"; return; }; done; echo "$1"; }
DATA=${1:-$(first shared/data/cifar10-train-jpg.tar.gz ../shared/data/cifar10-train-jpg.tar.gz)}
AIRBENCH=${2:-$(first shared/airbench94.py ../shared/airbench94.py)}
[[ -f "$AIRBENCH" ]] || AIRBENCH=""
if [[ -n "${PY:-}" ]]; then :; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # this checkout's cifarlab, whichever Python
export PYTHONUNBUFFERED=1
export CIFARLAB_DATA=${CIFARLAB_DATA:-$(mktemp -d)}  # the decoded-image cache, filled by the smoke run
LOG=${OUT:+$OUT/gpu_fast.log}
runs=$(mktemp -d)
summary=$runs/summary.tsv
now_ms() { echo $(($(date +%s%N) / 1000000)); }
since() { local ms=$(($(now_ms) - $1)); printf '%d.%03d' $((ms / 1000)) $((ms % 1000)); }
wanted() { [[ -z "${ONLY:-}" && "$1" =~ ^[0-3]$ || " ${ONLY:-} " == *" $1 "* ]]; }
t0=$(now_ms)

DEVICE=cuda
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    [[ -n "${TINY:-}" ]] || { echo "no CUDA device: run with TINY=1 to try the script on the CPU"; exit 1; }
    DEVICE=cpu
fi
SIZE=()  # TINY: 1,000 training images in 2 steps, 200 validation images, one epoch
AIRSIZE=()
SLOW=1  # timeouts x this (TINY on a CPU: a shared CPU takes minutes where a GPU takes seconds)
if [[ -n "${TINY:-}" ]]; then
    SIZE=(--subset 1200 --val-size 200 --epochs 1 --batch-size 500)
    AIRSIZE=(--subset 1224 --val-size 200 --epochs 1)  # airbench94's batch is 1,024 images
    [[ $DEVICE == cpu ]] && SLOW=10
fi

section() { printf '\n=== %s (at %s s)\n' "$1" "$(since "$t0")"; }
late() {  # past 7 minutes: what has not started yet is skipped, so the script ends within 8
    (($(now_ms) - t0 > ${STOP_AFTER_S:-420} * 1000)) && echo "skipped ($1): past ${STOP_AFTER_S:-420} s"
}
train() {  # train NAME TIMEOUT ARGS...: one run, its wall time and result.json
    local name=$1 limit=$2 start
    shift 2
    late "$name" && return 1
    start=$(now_ms)
    timeout "$((limit * SLOW))" "$PY" -m cifarlab train --data "$DATA" --out "$runs/$name" --no-progress \
        --set device="$DEVICE" "$@"
    local rc=$?
    echo "$name: exit $rc, wall $(since "$start") s (start-up and data included)"
    cat "$runs/$name/result.json" 2>/dev/null | tr -d '\n '
    echo
    return $rc
}
fast_row() {  # fast_row NAME SPLIT TIMEOUT ARGS...: a profiled `fast` run, a row of the table
    local name=$1 split=$2 limit=$3 start wall
    shift 3
    start=$(now_ms)
    train "$name" "$limit" --recipe fast --seed "$split" --profile "${SIZE[@]}" "$@" | tee "$runs/$name.log"
    wall=$(since "$start")
    "$PY" - "$runs/$name" "$runs/$name.log" "$name" "$split" "$wall" >>"$summary" <<'EOF'
import json, re, sys
run, log, name, split, wall = sys.argv[1:]
try:
    result = json.load(open(f"{run}/result.json"))
except OSError:
    sys.exit(0)
val = re.search(r"validation \(each epoch\)\s+([\d.]+)", open(log).read())
training = result["seconds"] - (float(val[1]) if val else 0.0)  # epochs' training + final TTA
acc = result["tta_val_acc"] or result["final_val_acc"]
print(f"{name}\t{split}\t{training:.3f}\t{wall}\t{acc:.4f}")
EOF
}
airbench_row() {  # airbench_row SPLIT ARGS...: airbench94 in its own process, a row of the table
    local split=$1 start wall
    shift
    late "airbench94 split $split" && return 1
    start=$(now_ms)
    timeout "$((150 * SLOW))" "$PY" benchmarks/airbench_anchor.py --airbench "$AIRBENCH" --data "$DATA" \
        --device "$DEVICE" --seeds "$split" "${AIRSIZE[@]}" "$@" | tee "$runs/airbench-$split.log"
    wall=$(since "$start")
    # RESULT name split timer written acc: its command is the process less the split's writing
    awk -F'\t' -v wall="$wall" '$1 == "RESULT" {printf "%s\t%s\t%s\t%.3f\t%s\n", $2, $3, $4, wall - $5, $6}' \
        "$runs/airbench-$split.log" >>"$summary"
}
table() {
    echo "run	split	training s	whole command s	val acc (TTA)"
    cat "$summary" 2>/dev/null
    echo "(training: fast = its epochs' training steps and the final TTA pass; airbench94 = its own timer,"
    echo " training and TTA. whole command: from the process start to its exit, data cached; airbench94's"
    echo " includes the warm-up run its timing protocol makes first, not the writing of the split.)"
}

all_sections() {
    section "0. machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    grep -m1 'model name' /proc/cpuinfo
    echo "device $DEVICE; data $DATA; airbench94 ${AIRBENCH:-absent (its rows are skipped)}"
    "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"

    if [[ -z "${ONLY:-}" || "$ONLY" =~ [1-6] ]]; then  # the GPU sections need a working GPU path
        section "1. smoke: fast, one epoch of 4,000 images (fills the data cache)"
        train smoke 150 --recipe fast --subset 4000 --val-size 1000 --epochs 1 "${SIZE[@]}" || { echo "GPU path broken: stopping"; exit 1; }
    fi

    if wanted 2; then
        section "2. fast and airbench94 side by side, splits 0 and 1"
        for split in 0 1; do
            fast_row "fast-whole-$split" "$split" 90 --set micro_batch=0
        done
        fast_row "fast-chunks500-0" 0 90
        [[ $DEVICE == cuda ]] && fast_row "fast-compiled-0" 0 240 --set micro_batch=0 --set compile=true
        if [[ -n "$AIRBENCH" ]]; then
            for split in 0 1; do airbench_row "$split"; done
        fi
        section "2. the table"
        table
    fi
    if wanted 3; then
        section "3. torch.profiler: 20 steps of fast, whole batches, then chunks of 500"
        local steps=(--steps 20 --warmup 5) tiny=()
        [[ -n "${TINY:-}" ]] && { steps=(--steps 2 --warmup 1); tiny=(--subset 1200 --val-size 200 --set batch_size=500); }
        late profile || timeout "$((120 * SLOW))" "$PY" benchmarks/profile_step.py --data "$DATA" --device "$DEVICE" "${steps[@]}" \
            "${tiny[@]}" --set micro_batch=0 ${OUT:+--trace "$OUT/fast_step_trace.json"}
        late profile || timeout "$((90 * SLOW))" "$PY" benchmarks/profile_step.py --data "$DATA" --device "$DEVICE" "${steps[@]}" \
            "${tiny[@]}" --rows 8
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
