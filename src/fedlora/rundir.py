"""The run folder: the one place that writes, reads and judges it (docs/report.md).

A run folder holds `config.yaml`, `clients.json`, `data.json`, `plan.json`, `metrics.jsonl`
(one JSON row per round), `checkpoint/` while it runs and `result.json` once finished.
Every file is replaced atomically (written beside, then renamed); the checkpoint is a
folder swapped in by two renames. A checkpoint holds no pickles: tensors go to
safetensors files and everything else to JSON, so loading one runs no code from the
folder, and a tampered or truncated one is refused with one line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import RECORDING_ONLY, InputError, read_user_text

__all__ = ["write_atomic", "read_rows", "time_to_target", "first_reaching", "target_reached", "run_status", "has_checkpoint",
           "copy_run", "save_checkpoint", "load_checkpoint"]

CHECKPOINT, CHECKPOINT_OLD, CHECKPOINT_TMP = "checkpoint", "checkpoint.old", "checkpoint.tmp"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` in one step: a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- metrics
def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_rows(folder: Path, *, before_round: int | None = None) -> list[dict]:
    """The rows of folder/metrics.jsonl, sorted by round; a repeated round keeps its last row
    (a round re-run after a crash between its row and its checkpoint). `before_round`: only
    the rounds below it. An unreadable line is an InputError naming the file and line."""
    path = Path(folder) / "metrics.jsonl"
    text = read_user_text(path, missing="not found (not a run folder)")
    by_round: dict[int, dict] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get("round"), int) or isinstance(row.get("round"), bool):
            raise InputError(f"{path}: line {n}: field 'round' missing or not an integer")
        if not _number(row.get("sim_time_s")):
            raise InputError(f"{path}: line {n}: field 'sim_time_s' missing or not a number")
        if "eval" in row:
            ev = row["eval"]
            if not isinstance(ev, dict) or not all(_number(v) for v in ev.values()):
                raise InputError(f"{path}: line {n}: field 'eval' must map task names to accuracies")
            if not _number(row.get("eval_mean")):
                raise InputError(f"{path}: line {n}: field 'eval_mean' missing or not a number")
        for key in ("upload_bytes", "download_bytes"):
            if row.get(key) is not None and not _number(row[key]):
                raise InputError(f"{path}: line {n}: field '{key}' is not a number")
        if before_round is None or row["round"] < before_round:
            by_round[row["round"]] = row
    return [by_round[k] for k in sorted(by_round)]


def target_reached(target, eval_acc: dict[str, float], eval_mean: float, task: str | None = None) -> bool:
    """target a number: on eval_mean (with `task`: on that task's accuracy); a dict {task: acc}:
    every listed task at once (the rule train.target_accuracy stops a run on)."""
    if target is None:
        return False
    if isinstance(target, dict):
        return all(eval_acc.get(t, -1.0) >= v for t, v in target.items())
    acc = eval_mean if task is None else eval_acc.get(task)
    return acc is not None and acc >= target


def first_reaching(rows: Sequence[dict], target, task: str | None = None) -> int | None:
    """Index into `rows` of the first evaluated row reaching the target, or None."""
    if target is None:
        return None
    for i, r in enumerate(rows):
        if isinstance(r.get("eval"), dict) and target_reached(target, r["eval"], r["eval_mean"], task):
            return i
    return None


def time_to_target(rows: Sequence[dict], target, task: str | None = None) -> float | None:
    """Simulated seconds (the run's clock) at the first evaluated row whose accuracy >= target;
    None: not reached."""
    i = first_reaching(rows, target, task)
    return None if i is None else float(rows[i]["sim_time_s"])


# --------------------------------------------------------------------------- status
RunStatus = Literal["new", "finished", "resume", "restart"]
RUN_FILES = ("config.yaml", "metrics.jsonl", "clients.json", "data.json", "plan.json")


def has_checkpoint(folder: Path) -> bool:
    folder = Path(folder)
    return any((folder / d / "progress.json").exists() for d in (CHECKPOINT, CHECKPOINT_OLD))


def run_status(folder: Path, config_text: str) -> RunStatus:
    """What to do with `folder` for a run of config `config_text` (config.dump_config):
    "new" (absent or empty), "finished" (result.json: skip), "resume" (a checkpoint),
    "restart" (started, stopped before its first checkpoint). A finished or resumable
    folder of another config, or a folder that is not a run folder, is an InputError."""
    folder = Path(folder)
    if not folder.exists():
        return "new"
    if not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder")
    entries = {p.name for p in folder.iterdir()}
    if not entries:
        return "new"
    saved = folder / "config.yaml"
    if "result.json" in entries or has_checkpoint(folder):
        if not saved.exists():
            raise InputError(f"{folder}: run folder without config.yaml; move it away or use another folder")
        if not same_training(saved.read_text(), config_text):
            raise InputError(f"{saved}: differs from this run's config ({first_difference(saved, config_text)}); "
                             "use another folder or remove this one")
        return "finished" if "result.json" in entries else "resume"
    partial = set(RUN_FILES) | {CHECKPOINT_TMP, "adapter.tmp"} | {f + ".tmp" for f in RUN_FILES}
    if entries & set(RUN_FILES) and entries <= partial:
        return "restart"
    raise InputError(f"{folder}: exists and is not a run folder of this config; use another folder")


def copy_run(src: Path, dst: Path) -> None:
    """Copy the finished run folder `src` (its checkpoints left out) to `dst`, which must be
    "new" or "restart" for the same config: the copy lands whole (a tmp folder, then one
    rename) and says where it came from (same_run_as.txt)."""
    src, dst = Path(src), Path(dst)
    text = (src / "config.yaml").read_text()
    if not (src / "result.json").exists():
        raise InputError(f"{src}: not a finished run, nothing to copy")
    if run_status(dst, text) not in ("new", "restart"):
        raise InputError(f"{dst}: holds a run of its own; not replaced by a copy of {src}")
    tmp = dst.with_name(dst.name + ".copy.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(CHECKPOINT, CHECKPOINT_OLD, CHECKPOINT_TMP))
    (tmp / "same_run_as.txt").write_text(f"{os.path.relpath(src, dst)}\n")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def same_training(saved_text: str, config_text: str) -> bool:
    """Do two config texts (config.dump_config) train the same run?"""
    if saved_text == config_text:
        return True
    old = training_view(saved_text)
    return old is not None and old == training_view(config_text)


def training_view(config_text: str) -> dict | None:
    """A config text (config.dump_config) reduced to what it trains (None if it is no config).
    config.RECORDING_ONLY is left out: turning TensorBoard off on --resume is fine, and
    folders made before such a section existed still match."""
    import yaml

    try:
        raw = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return None
    return {k: v for k, v in raw.items() if k not in RECORDING_ONLY} if isinstance(raw, dict) else None


def first_difference(saved: Path, config_text: str) -> str:
    """The first key (in the config's order) whose value differs, as 'a.b: x there, y now'."""
    import yaml

    try:
        old, new = yaml.safe_load(Path(saved).read_text()), yaml.safe_load(config_text)
    except yaml.YAMLError:
        return "unreadable"

    def walk(a, b, prefix=""):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in list(b) + [k for k in a if k not in b]:
                if not prefix and k in RECORDING_ONLY:
                    continue
                d = walk(a.get(k), b.get(k), f"{prefix}{k}.")
                if d:
                    return d
            return None
        return None if a == b else f"{prefix[:-1]}: {a!r} there, {b!r} now"

    return walk(old, new) or "formatting"


# --------------------------------------------------------------------------- checkpoint
def _split(obj, path: str, tensors: dict[str, torch.Tensor]):
    """JSON-able copy of `obj` with every tensor / array moved into `tensors` (a marker stays)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": path}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint state at {path or '/'}: keys must be strings")
        return {k: _split(v, f"{path}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state at {path or '/'}: {type(obj).__name__} is not JSON or a tensor")


def _join(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__ndarray__"}:
            return tensors[obj["__ndarray__"]].numpy()
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_checkpoint(out: Path, *, adapter: dict[str, torch.Tensor], method_state: dict,
                    base_delta: dict[str, torch.Tensor], progress: dict) -> None:
    """checkpoint/ = adapter_state.safetensors, method_state.{json,safetensors},
    base_delta.safetensors (when the base was merged into) and progress.json, swapped in
    atomically (tmp folder, then two renames)."""
    out = Path(out)
    tmp, final, old = out / CHECKPOINT_TMP, out / CHECKPOINT, out / CHECKPOINT_OLD
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(adapter, str(tmp / "adapter_state.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    (tmp / "method_state.json").write_text(json.dumps(_split(method_state, "", tensors)))
    save_file(tensors, str(tmp / "method_state.safetensors"))
    if base_delta:
        save_file({k: v.contiguous() for k, v in base_delta.items()}, str(tmp / "base_delta.safetensors"))
    (tmp / "progress.json").write_text(json.dumps(progress))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path) -> tuple[dict, dict, dict, dict] | None:
    """(adapter tensors, method state, base delta, progress), or None without a checkpoint.
    An unreadable checkpoint (truncated, tampered, or a pickle from an older fedlora) is an
    InputError: restart the run (--overwrite)."""
    out = Path(out)
    final, old = out / CHECKPOINT, out / CHECKPOINT_OLD
    if not final.exists() and old.exists():  # crashed between the two renames
        os.replace(old, final)
    if not (final / "progress.json").exists():
        return None
    try:
        if (final / "method_state.pt").exists():
            raise ValueError("a pickled method_state.pt (written by an older fedlora; it is not loaded)")
        adapter = load_file(str(final / "adapter_state.safetensors"))
        method_state = _join(json.loads((final / "method_state.json").read_text()),
                             load_file(str(final / "method_state.safetensors")))
        base = final / "base_delta.safetensors"
        base_delta = load_file(str(base)) if base.exists() else {}
        progress = json.loads((final / "progress.json").read_text())
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        raise InputError(f"{final}: checkpoint cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__});"
                         " restart the run with --overwrite") from None
    return adapter, method_state, base_delta, progress
