"""Run folders in: the runs, their metrics and their targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import MEAN, InputError, read_user_file
from ..rundir import first_reaching, read_rows

ALL = "all"  # target key: every per-task target at once (a dict target; the run's stopping rule)

Target = float | dict[str, float] | None


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


def read_json_file(path: Path):
    """A run folder's JSON file (result.json, clients.json, plan.json): None when absent (an
    unfinished or older run); InputError naming the file when it cannot be read."""
    if not path.exists():
        return None
    return read_user_file(path, "JSON", missing="not found")


def load_run(path: str | Path) -> Run:
    """Read one run folder. Raises InputError naming the file (and line) that cannot be read."""
    path = Path(path)
    cfg_path = path / "config.yaml"
    config = read_user_file(cfg_path, "YAML", missing="not found (not a run folder)")
    if not isinstance(config, dict):
        raise InputError(f"{cfg_path}: top level must be a mapping")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise InputError(f"{metrics}: not found (not a run folder)")
    rows = read_metrics(metrics)
    res_path = path / "result.json"
    result = read_json_file(res_path)
    if result is not None and not isinstance(result, dict):
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
    'training_time_s' = the run's clock alone, 'round', 'upload_bytes', and 'participants',
    the mean participants of the rounds up to it (None when the target held before round 1).
    The run's clock is rounds x mean round length: where a method gains, on which."""
    out = {}
    pre = run.pre_run_planning_s
    for key, tgt in keys.items():
        i = first_reaching(run.rows, tgt, None if key in (MEAN, ALL) else key)
        if i is None:
            out[key] = {"time_s": None, "training_time_s": None, "round": None, "upload_bytes": None,
                        "participants": None}
        else:
            t = float(run.rows[i]["sim_time_s"])
            rounds = [r for r in run.rows[:i + 1] if int(r["round"]) >= 1]
            out[key] = {"time_s": pre + t, "training_time_s": t, "round": int(run.rows[i]["round"]),
                        "upload_bytes": int(sum(r.get("upload_bytes") or 0 for r in run.rows[:i + 1])),
                        "participants": (sum(len(r.get("participants") or []) for r in rounds) / len(rounds)
                                         if rounds else None)}
    return out


def accuracy_at(run: Run, times_s: Sequence[float]) -> list[float | None]:
    """Mean accuracy over tasks (eval_mean) at each time of the user's clock, which starts
    with the planning before round 1 (pilots): the initial evaluation's (round 0) until
    round 1 starts, then linear between consecutive evaluations; after the last evaluation
    of a finished run its value (the run stopped, its adapter stays); None where no
    evaluation covers the time (before the first one when there is no initial evaluation,
    after the last one of an unfinished run)."""
    pre = run.pre_run_planning_s
    rows = run.evaluated
    points = [(pre + float(r["sim_time_s"]), float(r["eval_mean"])) for r in rows]
    out: list[float | None] = []
    for t in times_s:
        if not points or t > points[-1][0] and not run.finished:
            out.append(None)
        elif t <= points[0][0]:
            initial = float(rows[0]["sim_time_s"]) == 0.0
            out.append(points[0][1] if initial or t == points[0][0] else None)
        elif t >= points[-1][0]:
            out.append(points[-1][1])
        else:
            k = next(i for i, (x, _) in enumerate(points) if x >= t)
            (x0, y0), (x1, y1) = points[k - 1], points[k]
            out.append(y0 + (y1 - y0) * (t - x0) / (x1 - x0))
    return out
