#!/usr/bin/env bash
# How far `seed-cnn --time-budget 2m` lands when other work starts partway through: two
# busy-loop processes (one per core of a 2-core machine) from 70 s on, then the run's wall time.
#   benchmarks/budget_under_load.sh DATA [SRC ...]
# DATA: the training images (e.g. ../shared/data/cifar10-train-jpg.tar.gz); each SRC: a `src/`
# folder to run (default: this checkout's), e.g. an older version's from
# `git archive <rev> src | tar -x -C /tmp/old` to compare, run one after another.
set -euo pipefail
cd "$(dirname "$0")/.."
data=$1; shift
for src in "${@:-$PWD/src}"; do
  out=$(mktemp -d)
  (sleep 70; for _ in 1 2; do timeout 150 python3 -c 'while 1: pass' & done; wait) &
  hog=$!
  start=$(date +%s.%N)
  PYTHONPATH=$src .venv/bin/python -m cifarlab train --recipe seed-cnn --time-budget 2m \
    --data "$data" --out "$out/run" --no-progress | grep -E "^time budget" || true
  end=$(date +%s.%N)
  pkill -f "while 1: pass" || true
  wait "$hog" 2>/dev/null || true
  echo "$src: $(python3 -c "print(f'{$end - $start:.1f}')") s wall against 120 s"
  rm -rf "$out"
done
