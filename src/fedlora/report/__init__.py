"""Time-to-target tables and plots from run folders (no model, no training: files in, files out).

A run folder (see docs/report.md) holds `config.yaml`, `metrics.jsonl` and, once finished,
`result.json`. `report(paths)` finds every run folder under the given paths, groups the runs
by method (seeds of one method become one group), and writes

- `summary.json`: per method, time to each target accuracy (mean, std, min, max over the
  seeds that reached it, and "reached k of n"), final accuracy, rounds, bytes, speedup;
- `summary.md`: the same as readable tables (with `at_s`: the mean accuracy at those times,
  and with `focus` its differences paired by seed);
- `accuracy_vs_time.png`: one panel per task and one for the mean, accuracy against
  simulated time, one line per method (seeds: mean line, min/max band);
- `bytes_vs_accuracy.png`: mean accuracy against cumulative upload bytes.

Time to target: planning before round 1 (pilots; `Run.pre_run_planning_s`) plus the simulated
time (`sim_time_s`) of the first evaluated round whose accuracy is at or above the target;
None ("not reached") when no evaluated round gets there. The training-only time (the run's
clock alone) is reported beside it.

Modules: `runs` (run folders in, targets), `summary` (times, statistics over seeds,
speedups), `markdown` (summary.md), `plots` (the PNGs); `report()` here ties them together.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from ..config import MEAN, InputError
from ..rundir import time_to_target, write_atomic
from .clients import client_rows, write_clients_plot
from .markdown import render_markdown
from .plots import PLOTS, step_band, write_plots
from .runs import ALL, Run, Target, find_runs, load_run, parse_target
from .summary import accuracy_over, group_runs, paired_test, speedups_over, summarize

# ------------------------------------------------------------------ entry point



def client_views(runs: Sequence[Run]) -> dict[str, dict]:
    """Per method, the per-client view (report.clients) of its lowest-seed run that has one;
    `planned`: the run re-planned as it went (its rows carry plans)."""
    views = {}
    for label, members in group_runs(runs).items():
        for run in sorted(members, key=lambda r: (r.seed is None, r.seed or 0)):
            rows = client_rows(run)
            if rows is not None:
                planned = any(isinstance(r.get("plan"), dict) for r in run.rows)
                views[label] = {"seed": run.seed, "rows": rows, "planned": planned}
                break
    return views


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def report(paths: Sequence[str | Path], out: str | Path | None = None, target: Target | str = None,
           baseline: str | None = None, plots: bool = True, focus: str | None = None,
           failed: Sequence[str] = (), at_s: Sequence[float] = ()) -> dict:
    """Find run folders under `paths`, summarize them and write summary.json, summary.md and
    the plots into `out` (default: the first path). `failed`: lines naming runs that were
    meant to be there but failed (listed, not counted); `at_s`: times at which to read the
    mean accuracy (summary.accuracy_over pairs them by seed). Returns the summary (with
    'markdown' and 'files'). Raises InputError on bad input."""
    if isinstance(target, str):
        target = parse_target(target)
    folders = find_runs(paths)
    runs = [load_run(p) for p in folders]
    out_dir = Path(out) if out is not None else Path(paths[0])
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, target=target, baseline=baseline, relative_to=out_dir, focus=focus, at_s=at_s)
    summary["failed"] = list(failed)
    summary["clients"] = client_views(runs)
    markdown = render_markdown(summary)
    write_atomic(out_dir / "summary.json", json.dumps(_jsonable(summary), indent=1))
    write_atomic(out_dir / "summary.md", markdown)
    files = [out_dir / "summary.json", out_dir / "summary.md"]
    if plots:
        files += write_plots(runs, summary, out_dir)
        clients_plot = write_clients_plot({m: v["rows"] for m, v in summary["clients"].items()}, out_dir)
        files += [clients_plot] if clients_plot else []
    return {**summary, "markdown": markdown, "files": [str(f) for f in files]}


__all__ = ["ALL", "MEAN", "PLOTS", "Run", "Target", "accuracy_over", "find_runs", "group_runs", "load_run",
           "parse_target", "paired_test", "render_markdown", "report", "speedups_over", "step_band", "summarize",
           "time_to_target"]
