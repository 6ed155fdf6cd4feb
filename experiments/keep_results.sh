#!/usr/bin/env bash
# Keep the small files of a study folder under version control: finished runs (a folder
# with result.json: config.yaml, metrics.jsonl, result.json, plan.json, clients.json,
# data.json, and same_run_as.txt for a copied run), settings/*/targets.json, pilots'
# constants.json and the study summaries and plots. Checkpoints, adapters and unfinished runs
# are left out (an unfinished run starts over next time; a finished one is skipped by
# `fedlora study`).
#   bash experiments/keep_results.sh [runs/experiments] [results/experiments]
set -euo pipefail
src=$(cd "${1:-runs/experiments}" && pwd)
dst=$(mkdir -p "${2:-results/experiments}" && cd "${2:-results/experiments}" && pwd)
cd "$src"
{
  find . -name result.json -not -path '*/checkpoint*' | while read -r f; do
    d=$(dirname "$f")
    for n in config.yaml metrics.jsonl result.json plan.json clients.json data.json same_run_as.txt; do
      if [ -f "$d/$n" ]; then echo "$d/$n"; fi
    done
  done
  find . \( -name targets.json -o -name constants.json -o -name 'summary.md' -o -name 'summary.json' \
         -o -name '*.png' \) -not -path '*/checkpoint*' -not -path '*/adapter*'
} | sort -u | while read -r f; do
  mkdir -p "$dst/$(dirname "$f")"
  cp "$f" "$dst/$f"
done
echo "kept $(find "$dst" -type f | wc -l) files in $dst"
