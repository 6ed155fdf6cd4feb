"""Shared pieces of the Flower engine: run config, the per-process setup cache, wire format.

Run config keys (`[tool.flwr.app.config]` of flower_app/pyproject.toml, or `flwr run
--run-config`):
  fedlora-config   path of the fedlora YAML run config (relative: to the working directory,
                   else to the repository that holds the fedlora package)
  overrides        space-separated dotted overrides, e.g. "train.rounds=2 seed=1"
  out-dir          run folder the ServerApp writes (metrics.jsonl, clients.json, ...)
  overwrite        replace an existing run folder (bool)
  round-timeout    seconds the server waits for the replies of one round (missing after)
  connect-timeout  seconds the server waits at start for every partition to answer the query
Node config keys: partition-id (the fedlora client id), num-partitions (= data.num_clients).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import threading
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, dump_config, load_config
from ..quiet import quiet_libraries

DEFAULTS = {"fedlora-config": "configs/smoke.yaml", "overrides": "", "out-dir": "runs/flower", "overwrite": True,
            "round-timeout": 600.0, "connect-timeout": 300.0}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def resolve_path(p: str) -> Path:
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    alt = repo_root() / path
    return alt if alt.exists() else path


def setting(run_config, key: str):
    return run_config.get(key, DEFAULTS[key]) if run_config is not None else DEFAULTS[key]


def load_run_config(run_config) -> RunConfig:
    """The fedlora RunConfig named by a Flower run config (raises InputError)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = resolve_path(str(setting(run_config, "fedlora-config")))
    overrides = shlex.split(str(setting(run_config, "overrides") or ""))
    return load_config(path, overrides)


def config_key(cfg: RunConfig) -> str:
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]


# One Setup (data partition, base model, profiles) per worker process and config: a Ray
# actor or a long-lived process builds it once and reuses it for every message.
_SETUPS: dict[str, object] = {}
_LOCK = threading.Lock()


def cached_setup(cfg: RunConfig):
    from ..setup import build_setup

    key = config_key(cfg)
    with _LOCK:
        if key not in _SETUPS:
            quiet_libraries()
            _SETUPS.clear()  # one model per process: a new config replaces the old one
            _SETUPS[key] = build_setup(cfg)
        return _SETUPS[key]


# ------------------------------------------------------------------ wire format


def array_record(tensors: dict[str, torch.Tensor]):
    """Named tensors (a payload, factors_payload(state), a base delta) on the wire: CPU, contiguous."""
    from flwr.app import ArrayRecord

    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def record_tensors(record) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int16)


def check_payload(payload: dict[str, torch.Tensor], job) -> str | None:
    """Why a reply's payload is unusable for `job` (None when it is fine): its tensors must be
    one of the shapes the job's upload rule can produce, factors in a float dtype, indices
    (`*.idx`) in an integer one, and every value finite."""
    options = job.upload.shapes(job.start)
    got = {k: tuple(v.shape) for k, v in payload.items()}
    if got not in options:
        want = options[0]
        if set(got) != set(want):
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            return f"wrong tensors (missing {missing[:2]}, unknown {extra[:2]})"
        k = next(k for k in want if got[k] != want[k])
        return f"{k}: shape {got[k]}, expected {want[k]}" + (" or another upload size" if len(options) > 1 else "")
    for k, v in payload.items():
        allowed = INDEX_DTYPES if k.endswith(".idx") else FLOAT_DTYPES
        if v.dtype not in allowed:
            return f"{k}: dtype {v.dtype}"
    if not all(bool(torch.isfinite(v).all()) for v in payload.values() if v.dtype in FLOAT_DTYPES):
        return "non-finite values (NaN/inf)"
    return None


def indices_list(idx) -> list[int]:
    return [] if idx is None else [int(i) for i in np.asarray(idx).ravel()]


# A job's regularizer (SOFT's orthogonality penalty, HetLoRA's tail penalty) and its upload
# rule (methods.base.DeltaUpload, ...) are frozen dataclasses of plain numbers; each travels as
# its kind and fields in the job's ConfigRecord ("reg-*", "upload-*") and the node rebuilds
# the same object.
def _wire_classes() -> dict:
    from ..methods.base import DeltaUpload, FactorsUpload
    from ..methods.hetlora import PruningUpload, TailRegularizer
    from ..methods.soft import OrthogonalityRegularizer, TopComponentsUpload

    return {"reg": {cls.kind: cls for cls in (OrthogonalityRegularizer, TailRegularizer)},
            "upload": {cls.kind: cls for cls in (DeltaUpload, FactorsUpload, PruningUpload, TopComponentsUpload)}}


def wire_config(prefix: str, obj) -> dict:
    """ConfigRecord entries that define a job's regularizer or upload rule ({} for None)."""
    if obj is None:
        return {}
    if type(obj) not in _wire_classes()[prefix].values():
        raise TypeError(f"{prefix} {obj!r} cannot be sent in a Flower message")
    return {f"{prefix}-kind": obj.kind, **{f"{prefix}-{f.name}": getattr(obj, f.name) for f in dataclasses.fields(obj)}}


def wire_object(prefix: str, job_cfg):
    """The regularizer or upload rule a job's ConfigRecord defines (None when absent)."""
    if f"{prefix}-kind" not in job_cfg:
        return None
    cls = _wire_classes()[prefix][str(job_cfg[f"{prefix}-kind"])]
    return cls(**{f.name: job_cfg[f"{prefix}-{f.name}"] for f in dataclasses.fields(cls)})
