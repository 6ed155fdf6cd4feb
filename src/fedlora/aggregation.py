"""Unbiased aggregation under independent client sampling (docs/theory.md section 0, docs/system.md).

Each round client i joins with its own probability q_i (independent coins, so the set of
participants S_t may be empty). The server update

    x^{t+1} = x^t + sum_{i in S_t} (p_i / q_i) * Delta_i^t

is unbiased for the full-participation update sum_i p_i Delta_i because
E[1{i in S_t}] = q_i. Dividing by |S_t| (a known bug in the predecessor's code) breaks
this, so nothing here ever divides by the number of participants.

A sketched client update touches only its trained ranks: dA [k, in] are rows of A and
dB [out, k] are columns of B at ``rank_indices``; ``scatter_sum`` places them back into
full rank-r tensors.

Global adapter state: ``dict[str, tuple[Tensor, Tensor]]``, module name -> (A [r, in],
B [out, r]). Pure math: no model, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "AdapterState",
    "SketchedUpdate",
    "is_finite_update",
    "scatter_sum",
    "unbiased_weights",
    "apply_update",
    "sample_participants",
]

AdapterState = dict[str, tuple[Tensor, Tensor]]


@dataclass
class SketchedUpdate:
    """One client's contribution in one round.

    rank_indices: which global ranks were trained (sorted, unique).
    delta: module -> (dA [k, in], dB [out, k]), trained minus start values.
    weight: aggregation weight, p_i / q_i for the unbiased rule.
    """

    client_id: int
    rank_indices: np.ndarray
    delta: dict[str, tuple[Tensor, Tensor]]
    weight: float


def is_finite_update(u: SketchedUpdate) -> bool:
    """True when the weight and every delta value are finite (a diverged client must be
    dropped before aggregation, not averaged in)."""
    if not math.isfinite(float(u.weight)):
        return False
    return all(bool(torch.isfinite(dA).all()) and bool(torch.isfinite(dB).all()) for dA, dB in u.delta.values())


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Accumulate low-precision (bf16/fp16) states in at least float32.
    return torch.promote_types(dtype, torch.float32)


def _check_state(state: AdapterState) -> None:
    for name, (A, B) in state.items():
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"module {name!r}: expected A [r, in] and B [out, r], got {tuple(A.shape)} and {tuple(B.shape)}"
            )


def _index_tensor(u: SketchedUpdate, rank: int, device: torch.device) -> Tensor:
    idx = np.asarray(u.rank_indices)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"client {u.client_id}: rank_indices must be a non-empty 1-D integer array")
    if idx.min() < 0 or idx.max() >= rank or np.any(np.diff(idx) <= 0):
        raise ValueError(
            f"client {u.client_id}: rank_indices must be strictly increasing in [0, {rank}), got {idx.tolist()}"
        )
    return torch.as_tensor(idx.astype(np.int64), dtype=torch.long, device=device)


def scatter_sum(shapes_like: AdapterState, updates: Sequence[SketchedUpdate]) -> AdapterState:
    """sum_i weight_i * scatter(Delta_i) into full rank-r zero tensors shaped like
    ``shapes_like``. No division by the number of updates; an empty list gives zeros.

    Overlapping rank sets simply add. Every update must cover exactly the modules of
    ``shapes_like`` and be finite (filter with ``is_finite_update`` first); anything else
    raises ValueError rather than silently skewing the global model.
    Result dtype: the state's dtype promoted to at least float32.
    """
    _check_state(shapes_like)
    out: AdapterState = {}
    for name, (A, B) in shapes_like.items():
        out[name] = (
            torch.zeros(A.shape, dtype=_acc_dtype(A.dtype), device=A.device),
            torch.zeros(B.shape, dtype=_acc_dtype(B.dtype), device=B.device),
        )
    for u in updates:
        if set(u.delta) != set(out):
            missing = sorted(set(out) - set(u.delta))
            extra = sorted(set(u.delta) - set(out))
            raise ValueError(f"client {u.client_id}: update modules differ from state (missing {missing}, unknown {extra})")
        if not is_finite_update(u):
            raise ValueError(f"client {u.client_id}: non-finite update or weight; drop it before aggregating")
        w = float(u.weight)
        for name, (dA, dB) in u.delta.items():
            accA, accB = out[name]
            r = accA.shape[0]
            idx = _index_tensor(u, r, accA.device)
            k = idx.numel()
            if tuple(dA.shape) != (k, accA.shape[1]) or tuple(dB.shape) != (accB.shape[0], k):
                raise ValueError(
                    f"client {u.client_id}, module {name!r}: expected dA [{k}, {accA.shape[1]}] and "
                    f"dB [{accB.shape[0]}, {k}], got {tuple(dA.shape)} and {tuple(dB.shape)}"
                )
            accA.index_add_(0, idx, dA.to(device=accA.device, dtype=accA.dtype), alpha=w)
            accB.index_add_(1, idx.to(accB.device), dB.to(device=accB.device, dtype=accB.dtype), alpha=w)
    return out


def unbiased_weights(
    data_share: np.ndarray, participation_prob: np.ndarray, sampled: Sequence[int]
) -> dict[int, float]:
    """Weights p_i / q_i for the sampled clients: E[sum_{i in S} (p_i/q_i) Delta_i] equals
    sum_i p_i Delta_i under independent Bernoulli(q_i) participation."""
    p = np.asarray(data_share, dtype=np.float64)
    q = np.asarray(participation_prob, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"data_share and participation_prob must be 1-D of equal length, got {p.shape} and {q.shape}")
    ids = [int(i) for i in sampled]
    if len(set(ids)) != len(ids):
        raise ValueError(f"sampled ids must be unique, got {ids}")
    weights: dict[int, float] = {}
    for i in ids:
        if not 0 <= i < p.size:
            raise ValueError(f"sampled id {i} out of range [0, {p.size})")
        if not (0.0 < q[i] <= 1.0):
            raise ValueError(f"client {i} was sampled but has participation probability {q[i]!r}")
        weights[i] = float(p[i] / q[i])
    return weights


def apply_update(state: AdapterState, aggregated: AdapterState, server_lr: float = 1.0) -> AdapterState:
    """New state x + server_lr * aggregated (fresh tensors, inputs untouched, dtype and
    device of ``state`` kept). Both must have the same modules and shapes."""
    _check_state(state)
    if set(state) != set(aggregated):
        raise ValueError(f"module sets differ: state {sorted(state)} vs aggregated {sorted(aggregated)}")
    new: AdapterState = {}
    for name, (A, B) in state.items():
        dA, dB = aggregated[name]
        if dA.shape != A.shape or dB.shape != B.shape:
            raise ValueError(f"module {name!r}: aggregated shapes {tuple(dA.shape)}, {tuple(dB.shape)} "
                             f"do not match state {tuple(A.shape)}, {tuple(B.shape)}")
        acc = _acc_dtype(A.dtype)
        newA = (A.to(acc) + server_lr * dA.to(device=A.device, dtype=acc)).to(A.dtype)
        accB = _acc_dtype(B.dtype)
        newB = (B.to(accB) + server_lr * dB.to(device=B.device, dtype=accB)).to(B.dtype)
        new[name] = (newA, newB)  # the addition always allocates: never aliases the input
    return new


def sample_participants(rng: np.random.Generator, participation_prob: np.ndarray) -> np.ndarray:
    """Independent coins: client i joins with probability q_i. Returns the sorted int64 ids
    of participants (possibly empty). q_i = 1 always joins, q_i = 0 never does."""
    q = np.asarray(participation_prob, dtype=np.float64)
    if q.ndim != 1:
        raise ValueError(f"participation_prob must be 1-D, got shape {q.shape}")
    if np.any(~np.isfinite(q)) or np.any(q < 0.0) or np.any(q > 1.0):
        raise ValueError("participation probabilities must lie in [0, 1]")
    return np.flatnonzero(rng.random(q.size) < q).astype(np.int64)
