"""The studies' overview (OUT/summary.md): for every study and variant under a study folder,
its first method (the focus) against each other method, paired by seed, one row per pair.

Files in, file out: it reads the summary.json that `report` wrote per study (and variant),
so a call of `fedlora study` that runs one study still writes the overview of all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import InputError
from ..rundir import write_atomic
from .markdown import _table
from .runs import ALL

OVERVIEW = "summary.md"


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


def _key_name(key: str, target: dict) -> str:
    if key == ALL:
        return "all tasks"
    return f"{key} ({target[key]:g})"


def _p(p: float | None) -> str:
    if p is None:
        return ""
    return " p < 0.001" if p < 0.001 else f" p {p:.3f}"


def speedup_cell(cell: dict) -> str:
    """'1.28× [0.89–1.84] 3/2 p 0.129': the geometric mean of the per-seed speedups ('≥': some
    enter at a lower bound), its 95% interval, seeds faster / slower, the t-test p."""
    test = cell.get("test")
    if cell.get("focus_missed") or not test or test["geometric_mean"] is None:
        return "focus missed a seed" if cell.get("focus_missed") else "—"
    text = f"{'≥' if test['bounds'] else ''}{test['geometric_mean']:.2f}×"
    if test["interval"] is not None:
        text += f" [{test['interval'][0]:.2f}–{test['interval'][1]:.2f}]"
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


def render_overview(summaries: dict[str, dict]) -> str:
    out = ["# fedlora studies: overview", "",
           "Each study's (and variant's) first method against each other method, paired by seed: the geometric "
           "mean of the per-seed speedups (the other's time to the target / the first method's; every time "
           "counts planning) with its 95% t interval, the seeds where the first method was faster / slower, and "
           "the t-test p on the log ratios. '≥': some ratios enter at a lower bound (the other method missed the "
           "target in that seed, its capped run length stands in), which can only understate the speedup. A study's "
           "own summary.md has the times, the per-seed ranges and the sign tests.", ""]
    for name, summary in summaries.items():
        focus = summary["focus"]["method"]
        target = summary["target"]
        keys = [k for k in summary["target_keys"] if k != ALL] + [ALL] * (ALL in summary["target_keys"])
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


def write_overview(out: str | Path) -> Path | None:
    """Write OUT/summary.md from the study summaries under OUT; None when there are none."""
    out = Path(out)
    summaries = study_summaries(out)
    if not summaries:
        return None
    path = out / OVERVIEW
    write_atomic(path, render_overview(summaries))
    return path
