#!/usr/bin/env bash
# Every study of docs/results.md in one call: one worker pool, the references and pilots
# first, then the method runs of every study with seed 0 first, so a cut-short call leaves
# whole seeds (within a seed, in this order: the headline comparisons, then the ablations). Resumes: the finished runs kept under results/experiments (keep_results.sh)
# are copied into OUT first (never over a file already there) and `fedlora study` skips
# them; an unfinished run in OUT resumes from its checkpoint.
#   bash experiments/run_studies.sh [OUT=runs/experiments] [WORKERS=2]
# Then: bash experiments/keep_results.sh OUT results/experiments
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/experiments}
workers=${2:-2}
fedlora=${FEDLORA:-.venv/bin/fedlora}
mkdir -p "$out"
[ -d results/experiments ] && cp -rn results/experiments/. "$out"/
exec "$fedlora" study experiments/online.yaml experiments/sota.yaml experiments/sensitivity.yaml \
  experiments/sampling.yaml experiments/rank.yaml -o "$out" --workers "$workers"
