"""Rank sketching for federated LoRA (docs/theory.md section 0, the FSLoRA mechanism).

Client i trains only k_i = ceil(s_i * r) of the r global LoRA ranks, drawn uniformly
without replacement each round. The diagonal sketch S_i = (r / k_i) * sum_{j in I_i} e_j e_j^T
has E[S_i] = I, so B S_i A is an unbiased estimate of B A while compute and upload scale
with k_i instead of r.

The practical form is a rank-k_i sub-adapter: rows A[I_i, :] and columns B[:, I_i] are
sliced out (``slice_ranks``) and trained with the same ``lora_alpha``, so PEFT's scaling
alpha / k_i equals (alpha / r) * (r / k_i) = (alpha / r) * ``sketch_scale``. Only this
slicing makes compute actually cheaper; masking gradients of a rank-r adapter does not.

Pure math: numpy / torch only, no model, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "rank_count",
    "sample_rank_indices",
    "sketch_scale",
    "sketch_diagonal",
    "slice_ranks",
    "payload_values",
    "payload_bits",
]

# Relative slack under which s * r counts as an integer. 0.28 * 25 == 7.000000000000001 in
# floating point; a plain ceil would give 8 ranks instead of 7.
_INT_RTOL = 1e-9


def _check_rank(rank: int) -> int:
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return int(rank)


def rank_count(ratio: float, rank: int) -> int:
    """Number of ranks k = ceil(ratio * rank) a client trains, clamped to [1, rank].

    A product within a relative 1e-9 of an integer is taken as that integer, so that the
    planner's grid s = k / r maps back to exactly k and ``rank_count(0.28, 25) == 7``
    although 0.28 * 25 == 7.000000000000001 in floating point.
    Raises ValueError unless 0 < ratio <= 1 (and finite) and rank is a positive integer.
    """
    rank = _check_rank(rank)
    ratio = float(ratio)
    if not math.isfinite(ratio) or not (0.0 < ratio <= 1.0):
        raise ValueError(f"sketch ratio must be in (0, 1], got {ratio!r}")
    x = ratio * rank
    nearest = round(x)
    if abs(x - nearest) <= _INT_RTOL * max(1.0, abs(x)):
        k = int(nearest)
    else:
        k = math.ceil(x)
    return min(max(k, 1), rank)


def _check_k(rank: int, k: int) -> tuple[int, int]:
    rank = _check_rank(rank)
    if isinstance(k, bool) or int(k) != k or not (1 <= k <= rank):
        raise ValueError(f"k must be an integer in [1, {rank}], got {k!r}")
    return rank, int(k)


def sample_rank_indices(rng: np.random.Generator, rank: int, k: int) -> np.ndarray:
    """Uniform random k-subset of {0, ..., rank-1}, without replacement, sorted, int64.

    Every k-subset is equally likely, so each rank is kept with probability k / rank;
    together with the r / k scale this is what makes the sketch unbiased.
    """
    rank, k = _check_k(rank, k)
    idx = rng.choice(rank, size=k, replace=False)
    return np.sort(np.asarray(idx, dtype=np.int64))


def sketch_scale(rank: int, k: int) -> float:
    """The sketch's diagonal value r / k (so that E[S] = I)."""
    rank, k = _check_k(rank, k)
    return rank / k


def sketch_diagonal(rank: int, idx: Sequence[int] | np.ndarray) -> np.ndarray:
    """Diagonal of S as a float64 vector: r / k on the chosen ranks, 0 elsewhere."""
    idx = _as_index_array(idx, rank)
    diag = np.zeros(rank, dtype=np.float64)
    diag[idx] = sketch_scale(rank, len(idx))
    return diag


def _as_index_array(idx, rank: int) -> np.ndarray:
    arr = np.asarray(idx)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("rank indices must be a non-empty 1-D sequence")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"rank indices must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= rank:
        raise ValueError(f"rank indices must lie in [0, {rank}), got {arr.tolist()}")
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"rank indices must be strictly increasing, got {arr.tolist()}")
    return arr


def slice_ranks(A: Tensor, B: Tensor, idx) -> tuple[Tensor, Tensor]:
    """Rank-k sub-adapter: rows ``A[idx, :]`` (A is [r, in]) and columns ``B[:, idx]``
    (B is [out, r]). Returns fresh tensors (clones) so training them never writes into
    the global state.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"expected A [r, in] and B [out, r] with the same r, got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    arr = _as_index_array(idx, A.shape[0])
    t = torch.as_tensor(arr, dtype=torch.long, device=A.device)
    return A.index_select(0, t).clone(), B.index_select(1, t.to(B.device)).clone()


def payload_values(shapes: Mapping[str, tuple[int, int]], k: int) -> int:
    """Number of values in a rank-k update: k * (in_features + out_features) per module.

    ``shapes`` maps module name -> (in_features, out_features).
    """
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    total = 0
    for name, (fan_in, fan_out) in shapes.items():
        if fan_in < 0 or fan_out < 0:
            raise ValueError(f"module {name!r} has negative shape ({fan_in}, {fan_out})")
        total += int(k) * (int(fan_in) + int(fan_out))
    return total


def payload_bits(shapes: Mapping[str, tuple[int, int]], k: int, bytes_per_value: int = 4) -> int:
    """Bits on the wire for a rank-k update (values * bytes_per_value * 8); index overhead
    (k small integers) is ignored."""
    if bytes_per_value <= 0:
        raise ValueError(f"bytes_per_value must be positive, got {bytes_per_value!r}")
    return payload_values(shapes, k) * int(bytes_per_value) * 8
