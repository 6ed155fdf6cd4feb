"""accuracy_vs_time.png and bytes_vs_accuracy.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import MEAN
from .runs import Run
from .summary import group_runs

PLOTS = ("accuracy_vs_time.png", "bytes_vs_accuracy.png")


# ------------------------------------------------------------------ plots


def step_band(series: Sequence[tuple[Sequence[float], Sequence[float]]]):
    """Mean, min and max of several step functions on the union of their x points.

    Each series (x ascending, y) holds its last value until its next point ("post" steps) and
    after its end; before its first point it is undefined (NaN, left out of mean/min/max).
    Returns (grid, mean, lo, hi) as numpy arrays.
    """
    grid = np.unique(np.concatenate([np.asarray(x, float) for x, _ in series]))
    vals = np.full((len(series), len(grid)), np.nan)
    for i, (x, y) in enumerate(series):
        x, y = np.asarray(x, float), np.asarray(y, float)
        idx = np.searchsorted(x, grid, side="right") - 1
        ok = idx >= 0
        vals[i, ok] = y[idx[ok]]
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return grid, np.nanmean(vals, axis=0), np.nanmin(vals, axis=0), np.nanmax(vals, axis=0)


def _curve(run: Run, task: str | None, x_kind: str):
    xs, ys, cum = [], [], 0
    for r in run.rows:
        cum += r.get("upload_bytes") or 0
        if not isinstance(r.get("eval"), dict):
            continue
        y = r["eval_mean"] if task is None else r["eval"].get(task)
        if y is None:
            continue
        xs.append(float(r["sim_time_s"]) if x_kind == "time" else cum / 1e6)
        ys.append(float(y))
    return xs, ys


def _draw(ax, groups: dict[str, list[Run]], colors: dict[str, Any], task: str | None, x_kind: str) -> None:
    for label, members in groups.items():
        series = [c for c in (_curve(r, task, x_kind) for r in members) if c[0]]
        if not series:
            continue
        color = colors[label]
        if len(series) == 1:
            x, y = series[0]
            ax.step(x, y, where="post", color=color, label=label, marker="o", markersize=3)
            continue
        grid, mean, lo, hi = step_band(series)
        ax.step(grid, mean, where="post", color=color, label=f"{label} (n={len(series)})")
        ax.fill_between(grid, lo, hi, step="post", color=color, alpha=0.2, linewidth=0)


def write_plots(runs: Sequence[Run], summary: dict, out_dir: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = group_runs(runs)
    labels = list(summary["methods"])
    palette = [f"C{i}" for i in range(10)]
    colors = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    target, tasks = summary["target"], summary["tasks"]
    panels: list[tuple[str | None, str]] = [(t, t) for t in tasks] + [(None, "mean over tasks")]

    def target_of(task: str | None):
        if target is None:
            return None
        if isinstance(target, dict):
            return target.get(task if task is not None else MEAN)
        return target

    written = []
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (task, title) in zip(axes, panels):
        _draw(ax, groups, colors, task, "time")
        tv = target_of(task)
        if tv is not None:
            ax.axhline(tv, color="gray", linestyle="--", linewidth=1, label=f"target {tv:g}")
        ax.set_title(title)
        ax.set_xlabel("simulated time on the run's clock (s)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    fig.suptitle("Accuracy vs simulated time")
    path = out_dir / PLOTS[0]
    fig.savefig(path, dpi=110)
    written.append(path)

    fig = Figure(figsize=(6, 4), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    _draw(ax, groups, colors, None, "bytes")
    tv = target_of(None)
    if tv is not None:
        ax.axhline(tv, color="gray", linestyle="--", linewidth=1, label=f"target {tv:g}")
    ax.set_xlabel("cumulative upload (MB)")
    ax.set_ylabel("accuracy (mean over tasks)")
    ax.set_title("Accuracy vs upload bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path = out_dir / PLOTS[1]
    fig.savefig(path, dpi=110)
    written.append(path)
    return written
