"""SOFT and TSFA math (seed 002, Kim & Choi, arXiv 2505.00333) -- a RECONSTRUCTION.

Only the paper's abstract is available and no code exists, so every formula here is our
reading of it (docs/theory.md, "Seed 002: SOFT and TSFA (reconstructed)"):

SOFT (sparsified orthogonal fine-tuning)
  * an orthogonality penalty on the LoRA factors A [r, in] and B [out, r]; the written
    form is lambda * (||A A^T - I||_F^2 + ||B^T B - I||_F^2). Each factor's term has a
    ``mode``: "full" (G - I: orthonormal), "offdiag" (G - diag(G): orthogonal, norms free)
    or "none". Default: A "full", B "offdiag" -- the literal B term pulls every column of
    the zero-initialised B to unit norm (an unstable equilibrium at B = 0 that acts like
    negative weight decay), while the off-diagonal form only decorrelates the columns.
    With orthonormal rows of A and orthogonal columns of B, B A = sum_j ||b_j|| b_j/||b_j|| a_j^T
    IS an SVD, so the importances ||b_j|| * ||a_j|| are its singular values and a top-k
    cut is the Eckart-Young truncation -- obtained without an SVD or a d x k product.
  * per-rank importance: ``component_norms`` (||b_j|| ||a_j||, of a state) and
    ``component_change_norms`` (||b'_j a'_j^T - b_j a_j^T||_F, rank j's share of a
    client's change of B A, in closed form); the methods rank by the latter.
  * top-k selection per module and aggregation of sparse (index, dA rows, dB columns) sets.

TSFA (two-stage federated algorithm), online stage
  * a drift-plus-penalty controller: each round pick the grid point minimising
    V * penalty + Q_t * latency, then Q_{t+1} = max(Q_t + latency_t - L_avg, 0).

Pure math: torch / numpy only, no model, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PenaltyMode",
    "gram_penalty",
    "orthogonality_penalty",
    "orthogonality_penalty_grad",
    "OrthogonalityPenalty",
    "state_penalty",
    "component_norms",
    "component_change_norms",
    "top_components",
    "energy_profile",
    "dropped_energy_fraction",
    "SparseComponents",
    "aggregate_components",
    "LyapunovController",
]

PenaltyMode = Literal["full", "offdiag", "none"]
_MODES = ("full", "offdiag", "none")

AdapterState = dict[str, tuple[Tensor, Tensor]]


# ------------------------------------------------------------ orthogonality penalty


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"penalty mode must be one of {_MODES}, got {mode!r}")
    return mode


def _gram_residual(G: Tensor, mode: str) -> Tensor:
    """G - I ("full") or G - diag(G) ("offdiag") for a square Gram matrix G."""
    if mode == "full":
        return G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return G - torch.diag_embed(torch.diagonal(G))


def gram_penalty(M: Tensor, mode: PenaltyMode, *, rows: bool) -> Tensor:
    """The written formula for one factor: ||G - I||_F^2 ("full") or ||G - diag G||_F^2
    ("offdiag") with G = M M^T (rows=True, for A [r, in]) or G = M^T M (rows=False, for
    B [out, r]); 0 for "none". Plain torch ops, so autograd differentiates it."""
    _check_mode(mode)
    if mode == "none":
        return M.sum() * 0.0
    G = M @ M.T if rows else M.T @ M
    return (_gram_residual(G, mode) ** 2).sum()


def orthogonality_penalty(A: Tensor, B: Tensor, *, a_mode: PenaltyMode = "full",
                          b_mode: PenaltyMode = "offdiag") -> Tensor:
    """||A A^T - I||_F^2 + ||B^T B - I||_F^2 with the chosen per-factor modes (unweighted)."""
    return gram_penalty(A, a_mode, rows=True) + gram_penalty(B, b_mode, rows=False)


def orthogonality_penalty_grad(A: Tensor, B: Tensor, *, a_mode: PenaltyMode = "full",
                               b_mode: PenaltyMode = "offdiag") -> tuple[Tensor, Tensor, Tensor]:
    """Value and closed-form gradient of ``orthogonality_penalty``:

        d/dA ||A A^T - I||^2 = 4 (A A^T - I) A       d/dB ||B^T B - I||^2 = 4 B (B^T B - I)
        offdiag, with O = G - diag(G) (symmetric, zero diagonal): 4 O A  and  4 B O,

    because d||R||^2 = 2 <R, dG> and <O, dG> = 2 <O A, dA> (dG = dA A^T + A dA^T; the
    diagonal of dG drops out since O's diagonal is zero). r x r Gram matrices only.
    """
    _check_mode(a_mode)
    _check_mode(b_mode)
    value = A.new_zeros(())
    gA, gB = torch.zeros_like(A), torch.zeros_like(B)
    if a_mode != "none":
        R = _gram_residual(A @ A.T, a_mode)
        value = value + (R ** 2).sum()
        gA = 4.0 * R @ A
    if b_mode != "none":
        R = _gram_residual(B.T @ B, b_mode)
        value = value + (R ** 2).sum()
        gB = 4.0 * B @ R
    return value, gA, gB


class OrthogonalityPenalty(torch.autograd.Function):
    """The penalty as an autograd op whose backward is the closed form above (so the
    gradient the clients train with is exactly the one the tests check)."""

    @staticmethod
    def forward(ctx, A: Tensor, B: Tensor, a_mode: str, b_mode: str) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            value, gA, gB = orthogonality_penalty_grad(A, B, a_mode=a_mode, b_mode=b_mode)
        ctx.save_for_backward(gA, gB)
        return value

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        gA, gB = ctx.saved_tensors
        return grad_out * gA, grad_out * gB, None, None


def state_penalty(state: Mapping[str, tuple[Tensor, Tensor]], lam: float, *, a_mode: PenaltyMode = "full",
                  b_mode: PenaltyMode = "offdiag") -> Tensor:
    """lambda * sum over modules of the orthogonality penalty (the client regularizer)."""
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lambda must be a finite number >= 0, got {lam!r}")
    total = None
    for A, B in state.values():
        term = OrthogonalityPenalty.apply(A, B, a_mode, b_mode)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return lam * total


# ------------------------------------------------------------ importance, selection


def _check_pair(A: Tensor, B: Tensor) -> int:
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"expected A [r, in] and B [out, r], got {tuple(A.shape)} and {tuple(B.shape)}")
    return int(A.shape[0])


def component_norms(A: Tensor, B: Tensor) -> np.ndarray:
    """||b_j|| * ||a_j|| = ||b_j a_j^T||_F for each rank j (float64 [r]): the abstract's
    importance of the rank-one component b_j a_j^T of B A (b_j column of B, a_j row of A)."""
    _check_pair(A, B)
    a = torch.linalg.vector_norm(A.detach().double(), dim=1)
    b = torch.linalg.vector_norm(B.detach().double(), dim=0)
    return (a * b).cpu().numpy()


def component_change_norms(A0: Tensor, B0: Tensor, A1: Tensor, B1: Tensor) -> np.ndarray:
    """||b1_j a1_j^T - b0_j a0_j^T||_F per rank j (float64 [r]): how much rank j changed
    the product B A, in O(in + out) per rank (no d x k product, no SVD). With
    db = b1 - b0, da = a1 - a0 the change is db a1^T + b0 da^T, whose squared norm is

        |db|^2 |a1|^2 + |b0|^2 |da|^2 + 2 (db . b0)(a1 . da)

    (no cancellation between the large terms). Equals ``component_norms(A1, B1)`` when
    the component started at zero (b0 = 0, e.g. round 1 of LoRA).
    """
    r = _check_pair(A0, B0)
    if _check_pair(A1, B1) != r or A0.shape != A1.shape or B0.shape != B1.shape:
        raise ValueError("start and trained factors must have the same shapes")
    a0, b0 = A0.detach().double(), B0.detach().double()
    a1, b1 = A1.detach().double(), B1.detach().double()
    da, db = a1 - a0, b1 - b0
    sq = ((db * db).sum(0) * (a1 * a1).sum(1) + (b0 * b0).sum(0) * (da * da).sum(1)
          + 2.0 * (db * b0).sum(0) * (a1 * da).sum(1))
    return sq.clamp_min(0.0).sqrt().cpu().numpy()


def top_components(scores: np.ndarray | Sequence[float], k: int) -> np.ndarray:
    """Indices (sorted ascending, int64) of the k largest scores; ties go to the lower index."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("scores must be a non-empty 1-D array")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= s.size:
        raise ValueError(f"k must be an integer in [1, {s.size}], got {k!r}")
    order = np.argsort(-s, kind="stable")
    return np.sort(order[: int(k)]).astype(np.int64)


def energy_profile(scores: np.ndarray | Sequence[float]) -> np.ndarray:
    """Squared scores sorted descending: entry j is the energy of the (j+1)-th largest
    component, so a top-k cut drops sum(profile[k:]). Profiles of several modules (or
    clients) can be added entry-wise and still give the pooled dropped energy for every k,
    since each module keeps its own top k."""
    s = np.asarray(scores, dtype=np.float64)
    return np.sort(s * s)[::-1].copy()


def dropped_energy_fraction(profile: np.ndarray | Sequence[float], k: int) -> float:
    """sum(profile[k:]) / sum(profile): the fraction of update energy a top-k cut drops
    (exact when the components are orthogonal, which the penalty encourages). A profile
    with no energy gives the uninformed prior 1 - k / r."""
    p = np.asarray(profile, dtype=np.float64)
    r = p.size
    if isinstance(k, bool) or int(k) != k or not 0 <= k <= r:
        raise ValueError(f"k must be an integer in [0, {r}], got {k!r}")
    total = float(p.sum())
    if not (math.isfinite(total) and total > 0):
        return 1.0 - k / r
    return float(np.clip(p[int(k):].sum() / total, 0.0, 1.0))


# ------------------------------------------------------------ sparse aggregation


@dataclass
class SparseComponents:
    """One client's upload: per module the kept rank indices (sorted, unique) and the
    changes of those rows of A (dA [k, in]) and columns of B (dB [out, k]); the weight is
    p_i / q_i. Modules may keep different ranks."""

    client_id: int
    weight: float
    modules: dict[str, tuple[np.ndarray, Tensor, Tensor]]


def aggregate_components(shapes_like: Mapping[str, tuple[Tensor, Tensor]],
                         updates: Sequence[SparseComponents]) -> AdapterState:
    """sum_i weight_i * scatter(components_i) into zero tensors shaped like the state
    (dtype promoted to at least float32); no division by the number of clients, so with
    weights p_i / q_i the sum is unbiased over the independent participation coins.
    Same accumulation (index_add_ in client order) as ``aggregation.scatter_sum``, so with
    every rank kept the result is bit-identical to it. Raises ValueError on mismatches or
    non-finite input."""
    out: AdapterState = {}
    for name, (A, B) in shapes_like.items():
        _check_pair(A, B)
        acc = torch.promote_types(A.dtype, torch.float32)
        out[name] = (torch.zeros(A.shape, dtype=acc, device=A.device),
                     torch.zeros(B.shape, dtype=torch.promote_types(B.dtype, torch.float32), device=B.device))
    for u in updates:
        if set(u.modules) != set(out):
            raise ValueError(f"client {u.client_id}: modules differ from the state")
        w = float(u.weight)
        if not math.isfinite(w):
            raise ValueError(f"client {u.client_id}: non-finite weight")
        for name, (idx, dA, dB) in u.modules.items():
            accA, accB = out[name]
            r = accA.shape[0]
            ix = np.asarray(idx)
            if ix.ndim != 1 or ix.size == 0 or not np.issubdtype(ix.dtype, np.integer) \
                    or ix.min() < 0 or ix.max() >= r or np.any(np.diff(ix) <= 0):
                raise ValueError(f"client {u.client_id}, module {name!r}: bad rank indices {ix.tolist()}")
            k = ix.size
            if tuple(dA.shape) != (k, accA.shape[1]) or tuple(dB.shape) != (accB.shape[0], k):
                raise ValueError(f"client {u.client_id}, module {name!r}: expected dA [{k}, {accA.shape[1]}] and "
                                 f"dB [{accB.shape[0]}, {k}], got {tuple(dA.shape)} and {tuple(dB.shape)}")
            if not (bool(torch.isfinite(dA).all()) and bool(torch.isfinite(dB).all())):
                raise ValueError(f"client {u.client_id}, module {name!r}: non-finite values")
            t = torch.as_tensor(ix.astype(np.int64), dtype=torch.long, device=accA.device)
            accA.index_add_(0, t, dA.to(device=accA.device, dtype=accA.dtype), alpha=w)
            accB.index_add_(1, t.to(accB.device), dB.to(device=accB.device, dtype=accB.dtype), alpha=w)
    return out


# ------------------------------------------------------------ Lyapunov controller


class LyapunovController:
    """Drift-plus-penalty control of a long-term average latency budget.

    Each round, given per-option penalties P(x) and latencies L(x) (same length), choose
    x_t = argmin V * P(x) + Q_t * L(x), observe latency_t = L(x_t), then
    Q_{t+1} = max(Q_t + latency_t - L_avg, 0).

    Q is a virtual queue of excess latency (seconds). Since Q_{t+1} >= Q_t + latency_t - L_avg,
    summing gives (1/T) sum_t latency_t <= L_avg + (Q_T - Q_0) / T: whenever the queue stays
    bounded (it does when some option meets the budget on average -- Neely's drift-plus-penalty
    theorem), the average latency meets L_avg up to O(1/T), while the average penalty is
    within O(1/V) of the best policy that meets it; the queue grows as O(V).
    Ties: the lower penalty wins, then the lower index.
    """

    def __init__(self, v: float, budget_s: float, queue: float = 0.0):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"V must be a finite positive number, got {v!r}")
        if not (math.isfinite(budget_s) and budget_s > 0):
            raise ValueError(f"latency budget must be a finite positive number, got {budget_s!r}")
        self.v, self.budget_s, self.queue = float(v), float(budget_s), float(queue)

    def objective(self, penalties, latencies) -> np.ndarray:
        p = np.asarray(penalties, dtype=np.float64)
        lat = np.asarray(latencies, dtype=np.float64)
        if p.shape != lat.shape or p.ndim != 1 or p.size == 0:
            raise ValueError(f"penalties and latencies must be 1-D of equal non-zero length, got {p.shape}, {lat.shape}")
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(lat))):
            raise ValueError("penalties and latencies must be finite")
        return self.v * p + self.queue * lat

    def choose(self, penalties, latencies) -> int:
        """Index of the option minimising V * penalty + Q_t * latency."""
        obj = self.objective(penalties, latencies)
        p = np.asarray(penalties, dtype=np.float64)
        best = float(obj.min())
        tied = np.flatnonzero(obj <= best + 1e-12 * max(1.0, abs(best)))
        return int(tied[np.argmin(p[tied])])

    def update(self, latency_s: float) -> float:
        """Q <- max(Q + latency - L_avg, 0); returns the new Q."""
        lat = float(latency_s)
        if not math.isfinite(lat):
            raise ValueError(f"latency must be finite, got {latency_s!r}")
        self.queue = max(self.queue + lat - self.budget_s, 0.0)
        return self.queue

    def state_dict(self) -> dict:
        return {"queue": self.queue, "v": self.v, "budget_s": self.budget_s}

    def load_state_dict(self, d: dict) -> None:
        self.queue = float(d["queue"])
