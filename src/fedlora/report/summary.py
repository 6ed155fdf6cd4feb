"""Times to target, statistics over seeds, speedups (summary.json's content)."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import MEAN, InputError
from .runs import ALL, Run, Target, _check_target, _number, accuracy_at, target_keys, times_to_target

# ------------------------------------------------------------------ summary


def stats(values: Sequence[float]) -> dict:
    """n, mean, std (sample std, ddof=1; 0 for a single value), min, max; None values when n=0."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(vals), "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "min": min(vals), "max": max(vals)}


def _config_key(run: Run) -> str:
    cfg = {k: v for k, v in run.config.items() if k not in ("seed", "method")}
    planner = dict(cfg.get("planner") or {})
    constants = planner.get("constants")
    if isinstance(constants, dict) and constants.get("source") == "pilots":
        # constants estimated from that seed's pilots (fedlora study): an outcome of the seed,
        # like its data split, not a setting of the method
        planner["constants"] = "pilots"
        cfg["planner"] = planner
    sampling = dict(cfg.get("sampling") or {})
    if sampling.get("expected_participants") is not None and run.path.name.startswith("seed"):
        # a study's matched sampling baseline: its expected participants are the matched run's
        # mean of that seed, an outcome of the seed; the study entry (folder) names the config
        sampling["expected_participants"] = f"entry {run.path.parent.name}"
        cfg["sampling"] = sampling
    return json.dumps(cfg, sort_keys=True, default=str)


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Label -> runs. Runs of one method with one config (seed aside, and the planner constants
    that seed's pilots gave) form a group labelled by the method; a method run under several
    configs gets one group per config, 'method@folder'."""
    by_method: dict[str, dict[str, list[Run]]] = {}
    for r in runs:
        by_method.setdefault(r.method, {}).setdefault(_config_key(r), []).append(r)
    groups: dict[str, list[Run]] = {}
    for method, by_cfg in by_method.items():
        if len(by_cfg) == 1:
            groups[method] = next(iter(by_cfg.values()))
            continue
        for members in by_cfg.values():
            p = members[0].path
            tag = p.parent.name if p.name.startswith("seed") else p.name
            label, k = f"{method}@{tag}", 2
            while label in groups:
                label, k = f"{method}@{tag}-{k}", k + 1
            groups[label] = members
    return groups


def resolve_target(runs: Sequence[Run], override: Target = None) -> Target:
    """The report's target: the override, else the runs' train.target_accuracy (they must agree)."""
    if override is not None:
        return _check_target(override, "--target")
    distinct: list = []
    for r in runs:
        t = _check_target(r.target, f"{r.path / 'config.yaml'}: train.target_accuracy")
        if t is not None and t not in distinct:
            distinct.append(t)
    if len(distinct) > 1:
        raise InputError(f"runs set different train.target_accuracy ({', '.join(map(str, distinct))}); "
                         "choose one with --target")
    return distinct[0] if distinct else None


def summarize(runs: Sequence[Run], target: Target = None, baseline: str | None = None,
              relative_to: Path | None = None, focus: str | None = None, at_s: Sequence[float] = ()) -> dict:
    """Group runs by method and reduce over seeds; `at_s`: times (user's clock) at which the
    mean accuracy is read (accuracy_at). See docs/report.md for every field."""
    if not runs:
        raise InputError("report: no runs")
    if any(not (math.isfinite(t) and t > 0) for t in at_s):
        raise InputError(f"accuracy times must be positive seconds, got {list(at_s)}")
    target = resolve_target(runs, target)
    tasks: list[str] = []
    for r in runs:
        tasks.extend(t for t in r.tasks if t not in tasks)
    if isinstance(target, dict):
        unknown = [t for t in target if t not in tasks and t != MEAN]
        if unknown:
            raise InputError(f"target task '{unknown[0]}' is not among the evaluated tasks ({', '.join(tasks)})")
    keys = target_keys(target, tasks)
    # a per-task target's primary key stays ALL (the runs' stopping rule) when it also times the mean
    primary = None if not keys else (ALL if ALL in keys else MEAN if MEAN in keys else next(iter(keys)))
    groups = group_runs(runs)
    if baseline is not None and baseline not in groups:
        raise InputError(f"--baseline '{baseline}': no runs of that method (found: {', '.join(groups)})")

    def where(p: Path) -> str:
        return os.path.relpath(p, relative_to) if relative_to is not None else str(p)

    run_rows, methods = [], {}
    for label, members in groups.items():
        ttt_runs = [times_to_target(r, keys) for r in members]
        finished = [r for r in members if r.finished]
        entry: dict[str, Any] = {
            "method": members[0].method, "n": len(members), "finished": len(finished),
            "seeds": [r.seed for r in members], "runs": [where(r.path) for r in members],
            "stop_reasons": {}, "time_to_target_s": {}, "training_time_to_target_s": {},
            "upload_to_target_bytes": {}, "rounds_to_target": {},
            "planning_time_s": stats([r.planning_time_s for r in members]),
        }
        for r in members:
            entry["stop_reasons"][r.stop_reason] = entry["stop_reasons"].get(r.stop_reason, 0) + 1
        for key in keys:
            times = [t[key]["time_s"] for t in ttt_runs]
            reached = [x for x in times if x is not None]
            entry["time_to_target_s"][key] = {**stats(reached), "reached": len(reached), "of": len(members),
                                              "values": times}
            training = [t[key]["training_time_s"] for t in ttt_runs if t[key]["training_time_s"] is not None]
            entry["training_time_to_target_s"][key] = {**stats(training), "reached": len(training),
                                                       "of": len(members)}
            entry["upload_to_target_bytes"][key] = stats([t[key]["upload_bytes"] for t in ttt_runs
                                                          if t[key]["upload_bytes"] is not None])
            trained = [t[key] for t in ttt_runs if t[key]["round"]]  # reached in round 1 or later
            entry["rounds_to_target"][key] = {
                "rounds": stats([t["round"] for t in trained]),
                "round_s": stats([t["training_time_s"] / t["round"] for t in trained]),
                "participants": stats([t["participants"] for t in trained])}
        entry["final_eval_mean"] = stats([r.result["final_eval_mean"] for r in finished
                                          if _number(r.result.get("final_eval_mean"))])
        entry["final_eval"] = {t: stats([r.result["final_eval"][t] for r in finished
                                         if _number((r.result.get("final_eval") or {}).get(t))]) for t in tasks}
        accs = [accuracy_at(r, at_s) for r in members]
        entry["accuracy_at_s"] = {f"{t:g}": {**stats([a[k] for a in accs if a[k] is not None]),
                                             "values": [a[k] for a in accs]} for k, t in enumerate(at_s)}
        entry["rounds"] = stats([r.rounds for r in members])
        entry["sim_time_s"] = stats([float(r.rows[-1]["sim_time_s"]) for r in members])
        entry["upload_bytes"] = stats([r.total_bytes("upload") for r in members])
        entry["download_bytes"] = stats([r.total_bytes("download") for r in members])
        methods[label] = entry
        for r, t in zip(members, ttt_runs):
            run_rows.append({"path": where(r.path), "label": label, "method": r.method, "seed": r.seed,
                             "finished": r.finished, "stop_reason": r.stop_reason, "rounds": r.rounds,
                             "sim_time_s": float(r.rows[-1]["sim_time_s"]),
                             "pre_run_planning_s": r.pre_run_planning_s, "planning_time_s": r.planning_time_s,
                             "time_to_target_s": {k: v["time_s"] for k, v in t.items()},
                             "training_time_to_target_s": {k: v["training_time_s"] for k, v in t.items()},
                             "rounds_to_target": {k: v["round"] for k, v in t.items()},
                             "final_eval_mean": r.result.get("final_eval_mean") if r.result else None,
                             "upload_bytes": r.total_bytes("upload"), "download_bytes": r.total_bytes("download")})
    for key in keys:
        _speedups(methods, key, baseline)
    if focus is not None and focus not in groups:
        raise InputError(f"focus method '{focus}': no runs of it (found: {', '.join(groups)})")
    out = {"target": target, "target_keys": list(keys), "primary_target": primary, "tasks": tasks,
           "baseline": baseline, "methods": methods, "runs": run_rows, "accuracy_at_s": [f"{t:g}" for t in at_s]}
    if focus is not None:
        out["focus"] = {"method": focus, "speedup_over": speedups_over(out, focus),
                        "accuracy_over": accuracy_over(out, focus)}
    return out


def accuracy_over(summary: dict, focus: str) -> dict[str, dict[str, dict]]:
    """`focus`'s mean accuracy minus every other method's at each time of `accuracy_at_s`,
    paired by seed (seeds where both have a value): per-seed differences, their mean, the
    seeds where focus was ahead / behind, the exact two-sided sign-test p, and the t interval
    and p of a one-sample t-test of the differences against 0 (None with one seed or equal
    differences)."""
    from scipy import stats as st

    out: dict[str, dict[str, dict]] = {}
    for label, t, a, b in _by_seed(summary, focus, "accuracy_at_s", summary["accuracy_at_s"]):
        per_seed = {sd: a[sd] - b[sd] for sd in a if a[sd] is not None and b.get(sd) is not None}
        d = np.asarray(list(per_seed.values()), dtype=np.float64)
        ahead, behind = int(np.sum(d > 0)), int(np.sum(d < 0))
        sign_p = float(st.binomtest(ahead, ahead + behind).pvalue) if ahead + behind else None
        cell = {"per_seed": per_seed, "mean": float(d.mean()) if d.size else None, "ahead": ahead,
                "behind": behind, "sign_p": sign_p, "interval": None, "t_p": None}
        if d.size > 1 and np.ptp(d) > 0:
            res = st.ttest_1samp(d, 0.0)
            lo, hi = res.confidence_interval(0.95)
            cell.update(interval=[float(lo), float(hi)], t_p=float(res.pvalue))
        out.setdefault(label, {})[t] = cell
    return out


def _by_seed(summary: dict, focus: str, field: str, keys: Sequence[str]):
    """For every other method and key: (its label, the key, focus's values by seed, its values
    by seed), from the methods' `field`[key]["values"] (in the order of their seeds)."""
    mine = summary["methods"][focus]
    for label, other in summary["methods"].items():
        if label != focus:
            for key in keys:
                yield (label, key, dict(zip(mine["seeds"], mine[field][key]["values"])),
                       dict(zip(other["seeds"], other[field][key]["values"])))


def speedups_over(summary: dict, focus: str) -> dict[str, dict[str, dict]]:
    """Speedup of `focus` over every other method, per target key, paired by seed.

    Per seed: T_other / T_focus. When the other run never reached the target its time is at
    least the run's end (its cap), so the ratio is a lower bound ("at_least"); when `focus`
    did not reach it the seed gives no ratio. 'value' is mean T_other / mean T_focus over the
    seeds both give (a lower bound if any of those is one); None when focus missed a seed.
    """
    end_s = {(r["label"], r["seed"]): r.get("pre_run_planning_s", 0.0) + r["sim_time_s"] for r in summary["runs"]}
    out: dict[str, dict[str, dict]] = {}
    for label, key, t_focus, t_other in _by_seed(summary, focus, "time_to_target_s", summary["target_keys"]):
        seeds = [sd for sd in t_focus if sd in t_other]
        per_seed, bound, missed = {}, False, False
        for sd in seeds:
            if t_focus[sd] is None:
                missed = True
                continue
            theirs = t_other[sd] if t_other[sd] is not None else end_s[(label, sd)]
            bound |= t_other[sd] is None
            per_seed[sd] = {"ratio": theirs / t_focus[sd] if t_focus[sd] > 0 else math.inf,
                            "at_least": t_other[sd] is None}
        value, test = None, None
        if per_seed and not missed:
            test = paired_test([v["ratio"] for v in per_seed.values()], [v["at_least"] for v in per_seed.values()])
            num = statistics.fmean(t_other[sd] if t_other[sd] is not None else end_s[(label, sd)] for sd in per_seed)
            den = statistics.fmean(t_focus[sd] for sd in per_seed)
            value = num / den if den > 0 else math.inf
        out.setdefault(label, {})[key] = {"value": value, "at_least": bound, "focus_missed": missed,
                                          "per_seed": per_seed, "test": test}
    return out


def paired_test(ratios: Sequence[float], at_least: Sequence[bool] | None = None, level: float = 0.95) -> dict:
    """Whether per-seed speedups T_other / T_focus say more than noise (the seed is the unit).

    * sign test: seeds where focus was faster (ratio > 1) or slower (< 1), ties dropped, and
      the exact two-sided binomial p. A lower-bound ratio (the other run missed the target)
      counts only when its bound is above 1, where the direction is known.
    * t on log ratios: the geometric mean ratio, its `level` interval and the two-sided p of
      a one-sample t-test of the log ratios against 0. A lower bound enters at its bound,
      which can only understate focus's speedup ('bounds' says how many).
    With one seed (or all ratios equal) the t part is None; with a ratio of 0 or infinity (a
    time of 0) there is no geometric mean or t part.
    """
    from scipy import stats as st

    r = np.asarray(ratios, dtype=np.float64)
    lower = np.zeros(r.size, dtype=bool) if at_least is None else np.asarray(at_least, dtype=bool)
    faster = int(np.sum(r > 1.0))
    slower = int(np.sum((r < 1.0) & ~lower))
    n_sign = faster + slower
    logs = np.log(r) if r.size and np.all(np.isfinite(r)) and np.all(r > 0) else None  # None: some ratio 0 or inf
    out = {"seeds": int(r.size), "bounds": int(lower.sum()), "faster": faster, "slower": slower,
           "sign_p": float(st.binomtest(faster, n_sign).pvalue) if n_sign else None,
           "geometric_mean": None if logs is None else float(np.exp(logs.mean())),
           "interval": None, "t_p": None, "level": level}
    if logs is not None and logs.size > 1 and np.ptp(logs) > 0:
        res = st.ttest_1samp(logs, 0.0)
        lo, hi = res.confidence_interval(level)
        out.update(interval=[float(np.exp(lo)), float(np.exp(hi))], t_p=float(res.pvalue))
    return out


def _speedups(methods: dict[str, dict], key: str, baseline: str | None) -> None:
    """speedup[key] = T_ref / T_method on mean time to target, only between groups whose every
    run reached it. T_ref: the baseline's, else the fastest other group's."""
    full = {label: m["time_to_target_s"][key]["mean"] for label, m in methods.items()
            if m["time_to_target_s"][key]["reached"] == m["n"] > 0}
    for label, m in methods.items():
        m.setdefault("speedup", {})[key] = None
        if label not in full:
            continue
        if baseline is not None:
            ref = baseline if baseline in full else None
        else:
            others = {k: v for k, v in full.items() if k != label}
            ref = min(others, key=others.get) if others else None
        if ref is None:
            continue
        mine, theirs = full[label], full[ref]
        value = theirs / mine if mine > 0 else (1.0 if theirs <= 0 else math.inf)
        m["speedup"][key] = {"value": value, "vs": ref}
