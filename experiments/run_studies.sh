#!/usr/bin/env bash
# Every study of docs/results.md in two calls, each one pool of workers: first the online
# study on its own (its five seeds settle the online-planning question and hold all the
# pilots), then every study (the online runs are found finished and skipped). Within a call:
# the references first, then seed by seed (a seed's pilots, its method runs, its runs planned
# from pilots), so a cut-short call leaves whole seeds; within a seed the headline studies
# (online, sota, sensitivity) come before the ablations (sampling, rank). Resumes: the finished runs kept
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
# exit 1 = some runs failed (listed, summaries written): the second call retries them
"$fedlora" study experiments/online.yaml -o "$out" --workers "$workers" || { rc=$?; [ "$rc" = 1 ] || exit "$rc"; }
exec "$fedlora" study experiments/online.yaml experiments/sota.yaml experiments/sensitivity.yaml \
  experiments/sampling.yaml experiments/rank.yaml -o "$out" --workers "$workers"
