#!/usr/bin/env bash
# Every study of docs/results.md in one call and one pool of workers: the references first,
# then seed by seed (a seed's pilots, its method runs, its runs planned from pilots), so a
# cut-short call leaves whole seeds; within a seed the headline studies (online, sota,
# sensitivity) come before the ablations (sampling, rank). Resumes: the finished runs kept
# under results/experiments (keep_results.sh) are copied into OUT first (never over a file
# already there) and `fedlora study` skips them; an unfinished run in OUT resumes from its
# checkpoint.
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
