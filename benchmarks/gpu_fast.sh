#!/usr/bin/env bash
# The prepared GPU check (<= 8 minutes): `fast` end to end on the GPU (time to finish, val
# accuracy), `fast-96` within 150 s, `fast-cpu` in budget mode (--time-budget 60s: does it end
# within +-5%?), then the images/s table. Prints everything; paste the output into docs/benchmarks.md.
# Usage: benchmarks/gpu_fast.sh [DATA]   (default: the shared CIFAR-10 JPEG tarball)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-train-jpg.tar.gz}
make setup >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
out=$(mktemp -d)
start=$(date +%s.%N)
# micro_batch=0: whole batches of 2,000 (the chunks of 500 that pay on a CPU only cost on a GPU)
timeout 150 .venv/bin/cifarlab train --recipe fast --data "$DATA" --out "$out/fast" --no-progress --set micro_batch=0
echo "fast: wall $(echo "$(date +%s.%N) - $start" | bc) s (decode/cache included)"
cat "$out/fast/metrics.csv"
start=$(date +%s.%N)
timeout 150 .venv/bin/cifarlab train --recipe fast-96 --data "$DATA" --out "$out/fast-96" --no-progress || true
echo "fast-96: wall $(echo "$(date +%s.%N) - $start" | bc) s"
tail -n 3 "$out/fast-96/metrics.csv" || true
start=$(date +%s.%N)
timeout 90 .venv/bin/cifarlab train --recipe fast-cpu --time-budget 60s --data "$DATA" --out "$out/budget" --no-progress || true
echo "fast-cpu --time-budget 60s: wall $(echo "$(date +%s.%N) - $start" | bc) s (decode/cache included)"
timeout 120 .venv/bin/python benchmarks/speed.py --data "$DATA" --models cnn,resnet18,fastnet --no-write
