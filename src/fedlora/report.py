"""Time-to-target tables and plots from run folders (no model, no training: files in, files out).

A run folder (see docs/report.md) holds `config.yaml`, `metrics.jsonl` and, once finished,
`result.json`. `report(paths)` finds every run folder under the given paths, groups the runs
by method (seeds of one method become one group), and writes

- `summary.json`: per method, time to each target accuracy (mean, std, min, max over the
  seeds that reached it, and "reached k of n"), final accuracy, rounds, bytes, speedup;
- `summary.md`: the same as readable tables;
- `accuracy_vs_time.png`: one panel per task and one for the mean, accuracy against
  simulated time, one line per method (seeds: mean line, min/max band);
- `bytes_vs_accuracy.png`: mean accuracy against cumulative upload bytes.

Time to target: planning before round 1 (pilots; `Run.pre_run_planning_s`) plus the simulated
time (`sim_time_s`) of the first evaluated round whose accuracy is at or above the target;
None ("not reached") when no evaluated round gets there. The training-only time (the run's
clock alone) is reported beside it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

from .config import MEAN, InputError
from .rundir import first_reaching, read_rows, time_to_target, write_atomic

ALL = "all"  # target key: every per-task target at once (a dict target; the run's stopping rule)

Target = float | dict[str, float] | None

PLOTS = ("accuracy_vs_time.png", "bytes_vs_accuracy.png")


# ------------------------------------------------------------------ loading


@dataclass
class Run:
    """One run folder, read: its config (raw mapping), metrics rows and result (None if unfinished)."""

    path: Path
    config: dict
    rows: list[dict]
    result: dict | None = None

    @property
    def method(self) -> str:
        if self.result and "method" in self.result:
            return str(self.result["method"])
        return str(self.config.get("method", "?"))

    @property
    def seed(self) -> int | None:
        if self.result and "seed" in self.result:
            return self.result["seed"]
        return self.config.get("seed")

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def target(self) -> Target:
        return (self.config.get("train") or {}).get("target_accuracy")

    @property
    def evaluated(self) -> list[dict]:
        return [r for r in self.rows if isinstance(r.get("eval"), dict)]

    @property
    def tasks(self) -> list[str]:
        names: list[str] = []
        for r in self.evaluated:
            names.extend(t for t in r["eval"] if t not in names)
        if self.result:
            names.extend(t for t in (self.result.get("final_eval") or {}) if t not in names)
        return names

    @property
    def rounds(self) -> int:
        if self.result and isinstance(self.result.get("rounds"), int):
            return self.result["rounds"]
        return int(self.rows[-1]["round"])

    def total_bytes(self, kind: str) -> int:
        """`kind` 'upload' or 'download': result.json's total, else the sum over metric rows."""
        key = f"{kind}_bytes"
        if self.result and isinstance(self.result.get(key), (int, float)):
            return int(self.result[key])
        return int(sum(r.get(key) or 0 for r in self.rows))

    @property
    def stop_reason(self) -> str:
        return str(self.result.get("stop_reason")) if self.result else "unfinished"

    @property
    def pre_run_planning_s(self) -> float:
        """Simulated seconds of planning before round 1 (pilot runs): result.json's, else the
        cost recorded with planner constants in the config (an unfinished run), else 0."""
        if self.result and _number(self.result.get("pre_run_planning_s")):
            return float(self.result["pre_run_planning_s"])
        constants = ((self.config.get("planner") or {}).get("constants"))
        return float(constants.get("planning_time_s") or 0.0) if isinstance(constants, dict) else 0.0

    @property
    def planning_time_s(self) -> float:
        """All planning: before round 1 plus what the planner charged on the run's clock."""
        return self.pre_run_planning_s + float(sum(r.get("planning_time_s") or 0.0 for r in self.rows))


def is_run_folder(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() and (path / "config.yaml").is_file()


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders among `paths` and below them (folders holding metrics.jsonl and config.yaml)."""
    found: list[Path] = []
    seen: set[Path] = set()
    paths = list(paths)
    if not paths:
        raise InputError("report: no folders given")
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(f"{p}: not found")
        if not p.is_dir():
            raise InputError(f"{p}: not a folder (give a run folder or a folder holding run folders)")
        candidates = [p] if is_run_folder(p) else []
        candidates += sorted(m.parent for m in p.rglob("metrics.jsonl") if m.parent != p)
        for c in candidates:
            if "checkpoint" in c.relative_to(p).parts or not is_run_folder(c):
                continue
            key = c.resolve()
            if key not in seen:
                seen.add(key)
                found.append(c)
    if not found:
        raise InputError(f"no run folders (metrics.jsonl + config.yaml) under {', '.join(map(str, paths))}")
    return found


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl (rundir.read_rows); none at all is an InputError."""
    rows = read_rows(Path(path).parent)
    if not rows:
        raise InputError(f"{path}: no metric rows")
    return rows


def load_run(path: str | Path) -> Run:
    """Read one run folder. Raises InputError naming the file (and line) that cannot be read."""
    path = Path(path)
    cfg_path = path / "config.yaml"
    try:
        config = yaml.safe_load(cfg_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{cfg_path}: not found (not a run folder)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{cfg_path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise InputError(f"{cfg_path}: top level must be a mapping")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise InputError(f"{metrics}: not found (not a run folder)")
    rows = read_metrics(metrics)
    result = None
    res_path = path / "result.json"
    if res_path.exists():
        try:
            result = json.loads(res_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{res_path}: not valid JSON ({e.__class__.__name__})") from None
        if not isinstance(result, dict):
            raise InputError(f"{res_path}: expected a JSON object")
    if not isinstance(config.get("train") or {}, dict):
        raise InputError(f"{cfg_path}: field 'train' must be a mapping")
    _check_target((config.get("train") or {}).get("target_accuracy"), f"{cfg_path}: train.target_accuracy")
    return Run(path=path, config=config, rows=rows, result=result)


# ------------------------------------------------------------------ targets


def _check_target(target, where: str) -> Target:
    if target is None:
        return None
    if not isinstance(target, dict) and not _number(target):
        raise InputError(f"{where}: expected a number or a mapping task -> accuracy, got {target!r}")
    if isinstance(target, dict) and not target:
        raise InputError(f"{where}: empty per-task target")
    for v in (target.values() if isinstance(target, dict) else [target]):
        if not _number(v) or not 0 < v <= 1:
            raise InputError(f"{where}: accuracy target {v!r} must be a number in (0, 1]")
    return {str(k): float(v) for k, v in target.items()} if isinstance(target, dict) else float(target)


def parse_target(text: str) -> float | dict[str, float]:
    """'0.6' (mean and every task) or 'ARC-Easy=0.8,openbookqa=0.6' (per task; 'mean=0.5'
    adds a target on the mean over tasks)."""
    text = text.strip()
    if "=" not in text:
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"--target '{text}': expected a number like 0.6 or TASK=ACC,TASK=ACC") from None
        return _check_target(value, "--target")
    out: dict[str, float] = {}
    for part in text.split(","):
        task, _, raw = part.partition("=")
        task = task.strip()
        if not part.strip() or not task or "=" not in part:
            raise InputError(f"--target '{text}': expected TASK=ACC pairs separated by commas")
        try:
            out[task] = float(raw)
        except ValueError:
            raise InputError(f"--target '{text}': '{raw}' for {task} is not a number") from None
    return _check_target(out, "--target")


def target_keys(target: Target, tasks: Sequence[str]) -> dict[str, float | dict[str, float]]:
    """What to time, by key. A float: every task and MEAN (eval_mean). A dict: each named task,
    ALL (every named task at once) when it names more than one, and MEAN when it has a 'mean'
    entry (a target on eval_mean, not a task)."""
    if target is None:
        return {}
    if isinstance(target, dict):
        per_task = {k: v for k, v in target.items() if k != MEAN}
        keys: dict[str, Any] = dict(per_task)
        if len(per_task) > 1:
            keys[ALL] = dict(per_task)
        if MEAN in target:
            keys[MEAN] = float(target[MEAN])
        return keys
    return {**{t: float(target) for t in tasks}, MEAN: float(target)}


def times_to_target(run: Run, keys: dict[str, Any]) -> dict[str, dict]:
    """Per key, at the first reaching evaluation (None if never): 'time_s' = what a user waits
    for (planning before round 1 + the run's clock, which holds the in-run planning),
    'training_time_s' = the run's clock alone, 'round', 'upload_bytes'."""
    out = {}
    pre = run.pre_run_planning_s
    for key, tgt in keys.items():
        i = first_reaching(run.rows, tgt, None if key in (MEAN, ALL) else key)
        if i is None:
            out[key] = {"time_s": None, "training_time_s": None, "round": None, "upload_bytes": None}
        else:
            t = float(run.rows[i]["sim_time_s"])
            out[key] = {"time_s": pre + t, "training_time_s": t, "round": int(run.rows[i]["round"]),
                        "upload_bytes": int(sum(r.get("upload_bytes") or 0 for r in run.rows[:i + 1]))}
    return out


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
              relative_to: Path | None = None, focus: str | None = None) -> dict:
    """Group runs by method and reduce over seeds. See docs/report.md for every field."""
    if not runs:
        raise InputError("report: no runs")
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
            "upload_to_target_bytes": {}, "planning_time_s": stats([r.planning_time_s for r in members]),
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
        entry["final_eval_mean"] = stats([r.result["final_eval_mean"] for r in finished
                                          if _number(r.result.get("final_eval_mean"))])
        entry["final_eval"] = {t: stats([r.result["final_eval"][t] for r in finished
                                         if _number((r.result.get("final_eval") or {}).get(t))]) for t in tasks}
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
                             "final_eval_mean": r.result.get("final_eval_mean") if r.result else None,
                             "upload_bytes": r.total_bytes("upload"), "download_bytes": r.total_bytes("download")})
    for key in keys:
        _speedups(methods, key, baseline)
    if focus is not None and focus not in groups:
        raise InputError(f"focus method '{focus}': no runs of it (found: {', '.join(groups)})")
    out = {"target": target, "target_keys": list(keys), "primary_target": primary, "tasks": tasks,
           "baseline": baseline, "methods": methods, "runs": run_rows}
    if focus is not None:
        out["focus"] = {"method": focus, "speedup_over": speedups_over(out, focus)}
    return out


def speedups_over(summary: dict, focus: str) -> dict[str, dict[str, dict]]:
    """Speedup of `focus` over every other method, per target key, paired by seed.

    Per seed: T_other / T_focus. When the other run never reached the target its time is at
    least the run's end (its cap), so the ratio is a lower bound ("at_least"); when `focus`
    did not reach it the seed gives no ratio. 'value' is mean T_other / mean T_focus over the
    seeds both give (a lower bound if any of those is one); None when focus missed a seed.
    """
    end_s = {(r["label"], r["seed"]): r.get("pre_run_planning_s", 0.0) + r["sim_time_s"] for r in summary["runs"]}
    mine = summary["methods"][focus]
    out: dict[str, dict[str, dict]] = {}
    for label, other in summary["methods"].items():
        if label == focus:
            continue
        out[label] = {}
        for key in summary["target_keys"]:
            t_focus = dict(zip(mine["seeds"], mine["time_to_target_s"][key]["values"]))
            t_other = dict(zip(other["seeds"], other["time_to_target_s"][key]["values"]))
            seeds = [sd for sd in mine["seeds"] if sd in t_other]
            per_seed, bound, missed = {}, False, False
            for sd in seeds:
                if t_focus[sd] is None:
                    missed = True
                    continue
                theirs = t_other[sd] if t_other[sd] is not None else end_s[(label, sd)]
                bound |= t_other[sd] is None
                per_seed[sd] = {"ratio": theirs / t_focus[sd] if t_focus[sd] > 0 else math.inf,
                                "at_least": t_other[sd] is None}
            value = None
            if per_seed and not missed:
                num = statistics.fmean(t_other[sd] if t_other[sd] is not None else end_s[(label, sd)] for sd in per_seed)
                den = statistics.fmean(t_focus[sd] for sd in per_seed)
                value = num / den if den > 0 else math.inf
            out[label][key] = {"value": value, "at_least": bound, "focus_missed": missed, "per_seed": per_seed}
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


# ------------------------------------------------------------------ markdown


def _fmt_stat(s: dict, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    if not s or s["n"] == 0:
        return "—"
    mean = fmt.format(s["mean"] / scale)
    return mean if s["n"] == 1 else f"{mean} ± {fmt.format(s['std'] / scale)}"


def _fmt_time(t: dict) -> str:
    if t["reached"] == 0:
        return "not reached"
    cell = _fmt_stat(t, "{:.1f}")
    return cell if t["reached"] == t["of"] else f"{cell} ({t['reached']}/{t['of']})"


def _fmt_speedup(s: dict | None) -> str:
    if not s:
        return "—"
    v = "∞" if math.isinf(s["value"]) else f"{s['value']:.2f}"
    return f"{v}× vs {s['vs']}"


def _fmt_pair_speedup(cell: dict) -> str:
    if cell["value"] is None:
        return "—"
    ratios = [v["ratio"] for v in cell["per_seed"].values()]
    text = f"{'>' if cell['at_least'] else ''}{cell['value']:.2f}×"
    if len(ratios) > 1:
        text += f" [{min(ratios):.2f}–{max(ratios):.2f}]"
    return text


def _rounds_cell(s: dict) -> str:
    if s["n"] and s["min"] == s["max"]:
        return str(int(s["min"]))
    return _fmt_stat(s, "{:.1f}")


def _target_text(target: Target) -> str:
    if target is None:
        return ("No target accuracy (set train.target_accuracy or pass --target): "
                "time-to-target columns are left out.")
    if isinstance(target, dict):
        per_task = {t: v for t, v in target.items() if t != MEAN}
        parts = ", ".join(f"{t} ≥ {v:g}" for t, v in per_task.items())
        extra = " and all of them at once (column 'all')" if len(per_task) > 1 else ""
        mean = f"; mean over tasks ≥ {target[MEAN]:g} (column 'mean')" if MEAN in target else ""
        return f"Target accuracy per task: {parts}{extra}{mean}."
    return f"Target accuracy {target:g} on the mean over tasks and on each task."


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(a for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_markdown(summary: dict, title: str = "fedlora comparison") -> str:
    keys, primary = summary["target_keys"], summary["primary_target"]
    methods, tasks = summary["methods"], summary["tasks"]
    target = summary["target"]

    def key_name(k: str) -> str:
        if k == ALL:
            return "all tasks"
        return "mean" if k == MEAN else k

    header = ["method", "runs"]
    for k in keys:
        tv = target if not isinstance(target, dict) else (target.get(k) if k != ALL else None)
        header.append(f"time to {tv:g}: {key_name(k)} (s)" if tv is not None else f"time to target: {key_name(k)} (s)")
    if primary is not None:
        header.append(f"speedup ({key_name(primary)})")
    header += ["planning (s)", "final acc", "rounds", "MB up", "MB down"]
    rows = []
    for label, m in methods.items():
        row = [label, str(m["n"]) + ("" if m["finished"] == m["n"] else f" ({m['n'] - m['finished']} unfinished)")]
        row += [_fmt_time(m["time_to_target_s"][k]) for k in keys]
        if primary is not None:
            row.append(_fmt_speedup(m["speedup"].get(primary)))
        row += [_fmt_stat(m["planning_time_s"], "{:.1f}"), _fmt_stat(m["final_eval_mean"]), _rounds_cell(m["rounds"]),
                _fmt_stat(m["upload_bytes"], "{:.2f}", 1e6), _fmt_stat(m["download_bytes"], "{:.2f}", 1e6)]
        rows.append(row)
    align = [":--", "--:"] + ["--:"] * (len(header) - 2)
    times = ("Times are simulated seconds at the first evaluation at or above the target, counting what a user "
             "waits for: planning before round 1 (pilot runs and the reference run that set their loss) plus the "
             "run's own clock (which holds the planner's server time); the training-only times are in the table "
             "after. With several seeds, mean ± std over the seeds that reached it, and (k/n) when only k of n did. "
             "Planning: all planning time of a run (before and during it). ") if keys else ""
    out = [f"# {title}", "", _target_text(target),
           times + "Final accuracy: mean over tasks on the final evaluation (result.json), mean ± std over seeds. "
           "MB = 10^6 bytes, whole run.", ""]
    if summary.get("baseline"):
        out += [f"Speedup: baseline mean time / method mean time (baseline {summary['baseline']}).", ""]
    elif primary is not None:
        out += ["Speedup: mean time of the fastest other method / this method's (only methods whose every run "
                "reached the target).", ""]
    out += _table(header, align, rows)
    if keys:
        out += ["", "## Time to target on the run's own clock (planning before round 1 not counted)", ""]
        rows_t = [[label] + [_fmt_time(m["training_time_to_target_s"][k]) for k in keys] for label, m in methods.items()]
        out += _table(["method"] + [key_name(k) for k in keys], [":--"] + ["--:"] * len(keys), rows_t)
    out += ["", "## Final accuracy per task", ""]
    header2 = ["method"] + tasks + ["mean", "stop reasons"]
    rows2 = []
    for label, m in methods.items():
        reasons = ", ".join(f"{k} ×{v}" for k, v in sorted(m["stop_reasons"].items()))
        rows2.append([label] + [_fmt_stat(m["final_eval"][t]) for t in tasks] + [_fmt_stat(m["final_eval_mean"]),
                                                                                  reasons])
    out += _table(header2, [":--"] + ["--:"] * (len(tasks) + 1) + [":--"], rows2)
    if summary.get("focus"):
        focus = summary["focus"]["method"]
        out += ["", f"## Speedup of {focus} over each method", "",
                f"Mean time to target of the method / mean time of {focus}, over the seeds (per-seed range in "
                "brackets). '>' marks a lower bound: the method missed the target in some seed and its "
                f"capped run length stands in for its time. '—': {focus} missed the target in some seed.", ""]
        rows3 = []
        for label, per_key in summary["focus"]["speedup_over"].items():
            rows3.append([label] + [_fmt_pair_speedup(per_key[k]) for k in keys])
        out += _table(["vs"] + [key_name(k) for k in keys], [":--"] + ["--:"] * len(keys), rows3)
    if summary.get("failed"):
        out += ["", "## Runs that failed (not in the tables)", ""] + [f"- {line}" for line in summary["failed"]]
    out += ["", "Plots: accuracy_vs_time.png (accuracy per task and mean vs simulated time on each run's own "
                "clock: planning before round 1 is not drawn, the tables above count it), "
                "bytes_vs_accuracy.png (mean accuracy vs cumulative upload bytes).", ""]
    return "\n".join(out)


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


# ------------------------------------------------------------------ entry point



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
           failed: Sequence[str] = ()) -> dict:
    """Find run folders under `paths`, summarize them and write summary.json, summary.md and
    the plots into `out` (default: the first path). `failed`: lines naming runs that were
    meant to be there but failed (listed, not counted). Returns the summary (with 'markdown'
    and 'files'). Raises InputError on bad input."""
    if isinstance(target, str):
        target = parse_target(target)
    folders = find_runs(paths)
    runs = [load_run(p) for p in folders]
    out_dir = Path(out) if out is not None else Path(paths[0])
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, target=target, baseline=baseline, relative_to=out_dir, focus=focus)
    summary["failed"] = list(failed)
    markdown = render_markdown(summary)
    write_atomic(out_dir / "summary.json", json.dumps(_jsonable(summary), indent=1))
    write_atomic(out_dir / "summary.md", markdown)
    files = [out_dir / "summary.json", out_dir / "summary.md"]
    if plots:
        files += write_plots(runs, summary, out_dir)
    return {**summary, "markdown": markdown, "files": [str(f) for f in files]}


__all__ = ["Run", "load_run", "find_runs", "read_metrics", "parse_target", "target_keys", "time_to_target",
           "times_to_target", "stats", "group_runs", "summarize", "speedups_over", "render_markdown", "step_band", "write_plots",
           "report", "MEAN", "ALL"]
