"""The studies' overview (OUT/summary.md): for every study and variant under a study folder,
its first method (the focus) against each other method, paired by seed, one row per pair.

Files in, file out: it reads the summary.json that `report` wrote per study (and variant),
so a call of `fedlora study` that runs one study still writes the overview of all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import MEAN, InputError
from ..rundir import write_atomic
from .markdown import _table
from .runs import ALL

OVERVIEW, OVERVIEW_PLOT = "summary.md", "speedups.png"


def study_summaries(out: Path) -> dict[str, dict]:
    """{study[/variant]: its summary.json} for the studies under `out` that have a focus."""
    found = {}
    for path in sorted([*out.glob("*/summary.json"), *out.glob("*/*/summary.json")]):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot be read as a study summary ({e})") from None
        if isinstance(summary, dict) and summary.get("focus"):
            found[path.parent.relative_to(out).as_posix()] = summary
    return found


def _keys(summary: dict) -> list[str]:
    """The study's target keys, 'all tasks' last."""
    return [k for k in summary["target_keys"] if k != ALL] + [ALL] * (ALL in summary["target_keys"])


def _key_name(key: str, target: dict) -> str:
    if key == ALL:
        return "all tasks"
    return f"{key} ({target[key]:g})"


def _p(p: float | None) -> str:
    if p is None:
        return ""
    return " p < 0.001" if p < 0.001 else f" p {p:.3f}"


def _bound(v: float) -> str:
    return "<0.01" if v < 0.01 else ">100" if v > 100 else f"{v:.2f}"


def speedup_cell(cell: dict) -> str:
    """'1.28× [0.89–1.84] 3/2 p 0.129': the geometric mean of the per-seed speedups ('≥': some
    enter at a lower bound), its 95% interval, seeds faster / slower, the t-test p."""
    test = cell.get("test")
    if cell.get("focus_missed") or not test or test["geometric_mean"] is None:
        return "first method missed a seed" if cell.get("focus_missed") else "—"
    text = f"{'≥' if test['bounds'] else ''}{test['geometric_mean']:.2f}×"
    if test["interval"] is not None:  # with two seeds (1 degree of freedom) it can span 1e-5 to 1e5
        text += f" [{_bound(test['interval'][0])}–{_bound(test['interval'][1])}]"
    text += f" {test['faster']}/{test['slower']}"
    return text + _p(test["t_p"])


def difference_cell(cell: dict) -> str:
    """'+0.007 [+0.002, +0.012] 5/0 p 0.017': mean difference, 95% interval, ahead / behind, t p."""
    if cell["mean"] is None:
        return "—"
    text = f"{cell['mean']:+.3f}"
    if cell["interval"] is not None:
        text += f" [{cell['interval'][0]:+.3f}, {cell['interval'][1]:+.3f}]"
    text += f" {cell['ahead']}/{cell['behind']}"
    return text + _p(cell["t_p"])


def render_glance(summaries: dict[str, dict]) -> list[str]:
    """One row per (study, other method): the speedup on the mean-accuracy target and on all
    task targets at once, and the mean-accuracy difference at the study's last fixed time."""
    keys = [k for k in (MEAN, ALL) if any(k in s["target_keys"] for s in summaries.values())]
    rows = []
    for name, summary in summaries.items():
        times = summary.get("accuracy_at_s") or []
        accuracy = summary["focus"].get("accuracy_over") or {}
        for label, per_key in summary["focus"]["speedup_over"].items():
            at = f"{difference_cell(accuracy[label][times[-1]])} ({times[-1]} s)" if times and label in accuracy else "—"
            rows.append([name, f"{summary['focus']['method']} vs {label}"]
                        + [speedup_cell(per_key[k]) if k in per_key else "—" for k in keys] + [at])
    names = {MEAN: "mean target", ALL: "all tasks"}
    return _table(["study", "pair"] + [names[k] for k in keys] + ["mean accuracy at the later fixed time"],
                  [":--", ":--"] + ["--:"] * (len(keys) + 1), rows)


def render_overview(summaries: dict[str, dict]) -> str:
    out = ["# fedlora studies: overview", "",
           "Each study's (and variant's) first method against each other method, paired by seed: the geometric "
           "mean of the per-seed speedups (the other's time to the target / the first method's; every time "
           "counts planning) with its 95% t interval, the seeds where the first method was faster / slower, and "
           "the t-test p on the log ratios. '≥': some ratios enter at a lower bound (the other method missed the "
           "target in that seed, its capped run length stands in), which can only understate the speedup. A study's "
           "own summary.md has the times, the per-seed ranges and the sign tests.", "",
           "## At a glance", "",
           "The mean-accuracy target and all task targets at once, and the first method's mean accuracy minus the "
           "other's at the study's later fixed time (mean difference [95%], seeds ahead / behind, t p); the "
           "sections below have every task.", ""]
    out += render_glance(summaries) + [""]
    for name, summary in summaries.items():
        focus = summary["focus"]["method"]
        target = summary["target"]
        keys = _keys(summary)
        seeds = sorted({r["seed"] for r in summary["runs"] if r.get("seed") is not None})
        out += [f"## {name}: {focus}", "", f"Seeds {', '.join(map(str, seeds))}; "
                f"targets: {', '.join(f'{k} {v:g}' for k, v in target.items())}.", ""]
        rows = [[label] + [speedup_cell(per_key[k]) for k in keys]
                for label, per_key in summary["focus"]["speedup_over"].items()]
        out += _table(["vs"] + [_key_name(k, target) for k in keys], [":--"] + ["--:"] * len(keys), rows)
        times = summary.get("accuracy_at_s") or []
        if times and summary["focus"].get("accuracy_over"):
            out += ["", f"{focus}'s mean accuracy minus the other's at fixed times (planning counted), paired by "
                        "seed: mean difference [95%], seeds ahead / behind, t p.", ""]
            rows = [[label] + [difference_cell(per_t[t]) for t in times]
                    for label, per_t in summary["focus"]["accuracy_over"].items()]
            out += _table(["vs"] + [f"at {t} s" for t in times], [":--"] + ["--:"] * len(times), rows)
        out.append("")
    return "\n".join(out)


def write_overview_plot(summaries: dict[str, dict], path: Path) -> Path:
    """A forest plot of the speedups: one row per (study, other method), one panel per target
    (each task, the mean, all tasks), the geometric mean with its 95% interval on a log axis;
    an open marker where some ratios are lower bounds, none where the focus missed a seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels = list(dict.fromkeys(k for s in summaries.values() for k in _keys(s)))
    colors = {name: f"C{i % 10}" for i, name in enumerate(summaries)}
    rows = [(name, label, per_key) for name, s in summaries.items()
            for label, per_key in s["focus"]["speedup_over"].items()]
    fig = Figure(figsize=(2.6 * len(panels) + 2.5, 0.32 * len(rows) + 1.4), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    y = np.arange(len(rows))[::-1]
    means = [c["test"]["geometric_mean"] for _n, _l, pk in rows for c in pk.values()
             if c.get("test") and c["test"]["geometric_mean"] and not c.get("focus_missed")]
    xlim = (min([0.5, *means]) / 1.5, max([2.0, *means]) * 1.5)  # intervals past it are cut at the edge
    for ax, key in zip(axes, panels):
        ax.set_xlim(*xlim)
        for yi, (name, _label, per_key) in zip(y, rows):
            test = (per_key.get(key) or {}).get("test")
            if not test or test["geometric_mean"] is None or per_key[key].get("focus_missed"):
                continue
            gm, iv = test["geometric_mean"], test["interval"]
            if iv is not None:
                ax.plot(iv, [yi, yi], color=colors[name], linewidth=1.5)
            ax.plot([gm], [yi], "o", color=colors[name], markerfacecolor="white" if test["bounds"] else colors[name])
        ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title("all tasks" if key == ALL else key, fontsize="medium")
        ax.grid(alpha=0.3, axis="x")
        ax.set_xlabel("speedup (×)")
    def seeds(per_key: dict) -> str:
        n = max((len(c["per_seed"]) for c in per_key.values()), default=0)
        return f"{n} seed{'s' * (n != 1)}"

    axes[0].set_yticks(y, [f"{name}: vs {label} ({seeds(pk)})" for name, label, pk in rows], fontsize="small")
    fig.suptitle("Each study's first method against the others: time-to-target ratio, geometric mean over seeds "
                 "[95%] (open: some lower bounds)", fontsize="medium")
    fig.savefig(path, dpi=110)
    return path


def write_overview(out: str | Path) -> Path | None:
    """Write OUT/summary.md and OUT/speedups.png from the study summaries under OUT; None when
    there are none."""
    out = Path(out)
    summaries = study_summaries(out)
    if not summaries:
        return None
    path = out / OVERVIEW
    write_overview_plot(summaries, out / OVERVIEW_PLOT)
    write_atomic(path, render_overview(summaries) + f"\nPlot: {OVERVIEW_PLOT} (the speedups above as a forest plot).\n")
    return path
