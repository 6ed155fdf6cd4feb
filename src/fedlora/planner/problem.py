"""P2's inputs and pieces: constants, rounds model, problem, plan, objective (docs/theory.md 2-4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..system import ComputeModel, equal_finish_allocation, round_time_bound_s

# Smallest participation probability the planner will use (q_i > 0 is required; below this
# a client is practically never sampled and 1/q terms dominate any sensible objective).
Q_FLOOR = 1e-6
# Relative improvement a move must bring to be taken (shields decisions from rounding noise).
_REL_TOL = 1e-10


class InfeasiblePlan(ValueError):
    """P2 has no feasible point for these constants and data shares."""


class AppendixCInfeasible(InfeasiblePlan):
    """The Appendix-C bound q_i >= N gamma p_i^2 / (beta s_i) cannot hold for some client
    (its largest allowed q is too small even at full rank); pin_large_clients relaxes it."""


class ConstantEstimationError(ValueError):
    """The pilot rounds do not determine usable constants (alpha, beta, gamma, delta)."""


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class BoundConstants:
    """The four positive constants of the rounds factor R(q, s) (docs/theory.md section 3).

    Only ratios matter: multiplying all four by the same positive number leaves R unchanged.
    """

    alpha: float
    beta: float
    gamma: float
    delta: float

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "delta"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v > 0.0):
                raise ValueError(f"bound constant {name} must be a finite positive number, got {getattr(self, name)!r}")
            object.__setattr__(self, name, v)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "delta": self.delta}


@dataclass(frozen=True)
class RoundsModel:
    """The rounds factor in its general form (docs/theory.md sections 3 and 8):

        R(q, s) = (alpha + delta X) / (beta - gamma Y),
        X = sum_i p_i^2 w_i s_i^(-theta_x) / q_i,   Y = sum_i p_i^2 w_i s_i^(-theta_y) / q_i,

    with per-client weights w (``client_weight``) and sketch exponents theta_x
    (``numerator_sketch_exponent``) and theta_y (``denominator_sketch_exponent``). The seed's
    model is w = 1, theta_x = 0, theta_y = 1 (``RoundsModel.seed``). The online model [ours]
    (fedlora.online) is the seed's form with w = measured relative update energies, theta_y =
    the sketch's cost exponent, delta = 0, alpha = 1 - rho, gamma = rho and beta = 1 - rho +
    rho sum p^2 w, rho the measured step ratio (R = 1 at full participation and rank).

    Constraints: beta > 0, gamma >= 0, delta >= 0, w >= 0, theta_x, theta_y >= 0; alpha may be
    <= 0 as long as the numerator is positive on the whole domain (PlanProblem checks
    alpha + delta sum p^2 w > 0, its value at q = s = 1, below which X never falls).
    """

    alpha: float
    beta: float
    gamma: float
    delta: float
    client_weight: np.ndarray
    numerator_sketch_exponent: float = 0.0
    denominator_sketch_exponent: float = 1.0

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "delta", "numerator_sketch_exponent", "denominator_sketch_exponent"):
            v = float(getattr(self, name))
            if not math.isfinite(v):
                raise ValueError(f"rounds model {name} must be finite, got {getattr(self, name)!r}")
            object.__setattr__(self, name, v)
        if not self.beta > 0 or self.gamma < 0 or self.delta < 0:
            raise ValueError(f"rounds model needs beta > 0, gamma >= 0, delta >= 0 (got {self.beta}, "
                             f"{self.gamma}, {self.delta})")
        if self.numerator_sketch_exponent < 0 or self.denominator_sketch_exponent < 0:
            raise ValueError("sketch exponents must be >= 0 (a smaller sketch never lowers the rounds)")
        w = _vector("client_weight", self.client_weight)
        if w.size == 0 or np.any(w < 0):
            raise ValueError("client_weight must be >= 0, one per client")
        object.__setattr__(self, "client_weight", _frozen(w))

    @classmethod
    def seed(cls, constants: BoundConstants, num_clients: int) -> "RoundsModel":
        """Seed 001's model: X = sum p^2 / q, Y = sum p^2 / (q s)."""
        return cls(alpha=constants.alpha, beta=constants.beta, gamma=constants.gamma, delta=constants.delta,
                   client_weight=np.ones(int(num_clients)))

    def tables(self, data_share, s_grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a, b), each [n, len(s_grid)]: X = sum_i a[i, j_i] / q_i, Y = sum_i b[i, j_i] / q_i
        when client i sits at s_grid[j_i]."""
        pw = np.asarray(data_share, dtype=np.float64) ** 2 * self.client_weight
        sg = np.asarray(s_grid, dtype=np.float64)
        return (pw[:, None] * sg[None, :] ** -self.numerator_sketch_exponent,
                pw[:, None] * sg[None, :] ** -self.denominator_sketch_exponent)

    def value(self, q, s, data_share) -> float:
        """R(q, s); +inf when beta - gamma Y <= 0."""
        pw = np.asarray(data_share, dtype=np.float64) ** 2 * self.client_weight
        x = float(np.sum(pw * s ** -self.numerator_sketch_exponent / q))
        y = float(np.sum(pw * s ** -self.denominator_sketch_exponent / q))
        den = self.beta - self.gamma * y
        return (self.alpha + self.delta * x) / den if den > 0 else math.inf

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "delta": self.delta,
                "client_weight": self.client_weight.tolist(),
                "numerator_sketch_exponent": self.numerator_sketch_exponent,
                "denominator_sketch_exponent": self.denominator_sketch_exponent}


def _vector(name: str, x, n: int | None = None) -> np.ndarray:
    a = np.array(x, dtype=np.float64).reshape(-1) if np.ndim(x) else np.array([x], dtype=np.float64)
    if n is not None and a.size == 1 and n != 1:
        a = np.full(n, float(a[0]))
    if n is not None and a.shape != (n,):
        raise ValueError(f"{name} must have {n} entries, got shape {np.shape(x)}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class PlanProblem:
    """Everything the planner needs. Arrays are copied and made read-only.

    data_share: p_i >= 0, sums to 1 (within 1e-6; renormalised unless within 1e-12).
    compute_time_s: c_i > 0, tau local steps at full rank (s = 1).
    upload_s_hz: t_cm_i(1) >= 0, full-rank upload time at 1 Hz (seconds * Hz).
    bandwidth_hz: B > 0. rank: r >= 1 (global LoRA rank).
    constants: BoundConstants (the seed's rounds model) or a RoundsModel (any form of
      section 8 of docs/theory.md); ``model`` is the RoundsModel either way.
    pin_large_clients: False = the seed's Appendix-C bound for every client (a client whose
      bound exceeds 1 makes P2 infeasible). True = relaxed Appendix C [ours]: such a client is
      pinned at full rank and the largest q it may have (1; its fixed q in ``plan_ranks``),
      the others keep the bound, and the plan must still meet gamma Y < beta (finite R).
    min_participation: a floor on every q_i (scalar or per client, in [Q_FLOOR, 1]): the
      exploration floor of online planning, so that every client is seen now and then.
    download_s: t_dl_i >= 0, client i's time to receive the round's broadcast alone (docs/
      system.md, Downlink); the broadcast goes at the weakest participant's rate, so the
      round time gains E[max_{i in S} t_dl_i]. None: no download term (the seed's bound).
    upload_exposed_fraction: f in [0, 1], the share of the bound's upload term sum q t_cm / B
      that a round really adds on top of max t_cp: under equal-finish allocation the faster
      participants upload while the stragglers compute. 1 = Theorem 2 as the seed states it;
      online planning measures f at the plan in force (``upload_exposed_fraction`` below,
      docs/theory.md section 8.7).
    """

    data_share: np.ndarray
    compute_time_s: np.ndarray
    upload_s_hz: np.ndarray
    bandwidth_hz: float
    rank: int
    compute_model: ComputeModel
    constants: BoundConstants | RoundsModel
    pin_large_clients: bool = False
    min_participation: float | np.ndarray = Q_FLOOR
    download_s: np.ndarray | None = None
    upload_exposed_fraction: float = 1.0
    model: RoundsModel = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        p = _vector("data_share", self.data_share)
        n = p.size
        if n == 0:
            raise ValueError("a plan needs at least one client")
        if np.any(p < 0):
            raise ValueError("data_share must be >= 0")
        if abs(p.sum() - 1.0) > 1e-6:
            raise ValueError(f"data_share must sum to 1, got {p.sum():.9g}")
        if abs(p.sum() - 1.0) > 1e-12:
            p = p / p.sum()
        c = _vector("compute_time_s", self.compute_time_s, n)
        if np.any(c <= 0):
            raise ValueError("compute_time_s must be > 0")
        u = _vector("upload_s_hz", self.upload_s_hz, n)
        if np.any(u < 0):
            raise ValueError("upload_s_hz must be >= 0")
        bw = float(self.bandwidth_hz)
        if not (math.isfinite(bw) and bw > 0):
            raise ValueError(f"bandwidth_hz must be a finite positive number, got {self.bandwidth_hz!r}")
        r = self.rank
        if isinstance(r, bool) or int(r) != r or int(r) < 1:
            raise ValueError(f"rank must be a positive integer, got {r!r}")
        if not isinstance(self.compute_model, ComputeModel):
            raise TypeError("compute_model must be a fedlora.system.ComputeModel")
        if isinstance(self.constants, BoundConstants):
            model = RoundsModel.seed(self.constants, n)
        elif isinstance(self.constants, RoundsModel):
            model = self.constants
        else:
            raise TypeError("constants must be a BoundConstants or a RoundsModel")
        if model.client_weight.size != n:
            raise ValueError(f"rounds model has {model.client_weight.size} client weights for {n} clients")
        if not model.alpha + model.delta * float(np.sum(p * p * model.client_weight)) > 0:
            raise ValueError("rounds model: alpha + delta X must be positive at q = s = 1 (X only grows from there)")
        floor = _vector("min_participation", self.min_participation, n)
        if np.any(floor < Q_FLOOR) or np.any(floor > 1):
            raise ValueError(f"min_participation must lie in [{Q_FLOOR}, 1]")
        dl = np.zeros(n) if self.download_s is None else _vector("download_s", self.download_s, n)
        if np.any(dl < 0):
            raise ValueError("download_s must be >= 0")
        f = float(self.upload_exposed_fraction)
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"upload_exposed_fraction must lie in [0, 1], got {self.upload_exposed_fraction!r}")
        object.__setattr__(self, "upload_exposed_fraction", f)
        object.__setattr__(self, "download_s", _frozen(dl))
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "min_participation", _frozen(floor))
        object.__setattr__(self, "data_share", _frozen(p))
        object.__setattr__(self, "compute_time_s", _frozen(c))
        object.__setattr__(self, "upload_s_hz", _frozen(u))
        object.__setattr__(self, "bandwidth_hz", bw)
        object.__setattr__(self, "rank", int(r))
        object.__setattr__(self, "pin_large_clients", bool(self.pin_large_clients))

    @property
    def num_clients(self) -> int:
        return int(self.data_share.size)

    def compute_s(self, sketch_ratio) -> np.ndarray:
        """t_cp_i(s_i) for all clients."""
        return np.asarray(self.compute_model.time_s(self.compute_time_s, _vector("sketch_ratio", sketch_ratio,
                                                                                   self.num_clients)))

    def upload_s_hz_at(self, sketch_ratio) -> np.ndarray:
        """t_cm_i(s_i) = s_i * t_cm_i(1) (eq. 18)."""
        return _vector("sketch_ratio", sketch_ratio, self.num_clients) * self.upload_s_hz

    def rounds_factor(self, q, s) -> float:
        """R(q, s) of this problem's rounds model (+inf when its denominator is <= 0)."""
        n = self.num_clients
        return self.model.value(_check_q(q, n), _check_s(s, n), self.data_share)

    def round_time_bound_s(self, q, s) -> float:
        """The planner's round time at (q, s): the Theorem-2 bound on E[T], the broadcast included
        (system.round_time_bound_s), its upload term scaled by ``upload_exposed_fraction``."""
        return round_time_bound_s(self.compute_s(s), self.upload_exposed_fraction * self.upload_s_hz_at(s), q,
                                  self.bandwidth_hz, self.download_s)


@dataclass(frozen=True)
class Plan:
    """Planner output. ``expected_round_time_s`` is the planner's round time at (q, s) (the
    Theorem-2 bound, its upload term scaled by the problem's ``upload_exposed_fraction``);
    ``objective`` = ``rounds_factor`` * ``expected_round_time_s`` (P2)."""

    participation_prob: np.ndarray
    ranks: np.ndarray
    sketch_ratio: np.ndarray
    objective: float
    expected_round_time_s: float
    rounds_factor: float
    iterations: int

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        arrays = {k: np.array(d[k], dtype=np.int64 if k == "ranks" else np.float64)
                  for k in ("participation_prob", "ranks", "sketch_ratio")}
        for a in arrays.values():
            a.setflags(write=False)
        return cls(**arrays, objective=float(d["objective"]), expected_round_time_s=float(d["expected_round_time_s"]),
                   rounds_factor=float(d["rounds_factor"]), iterations=int(d["iterations"]))

    def to_dict(self) -> dict:
        return {
            "participation_prob": [float(x) for x in self.participation_prob],
            "ranks": [int(x) for x in self.ranks],
            "sketch_ratio": [float(x) for x in self.sketch_ratio],
            "objective": float(self.objective),
            "expected_round_time_s": float(self.expected_round_time_s),
            "rounds_factor": float(self.rounds_factor),
            "iterations": int(self.iterations),
        }


# --------------------------------------------------------------------------- P2 pieces
def _check_q(q, n: int | None = None) -> np.ndarray:
    q = _vector("participation_prob", q, n)
    if np.any(q <= 0) or np.any(q > 1):
        raise ValueError("participation probabilities must lie in (0, 1]")
    return q


def _check_s(s, n: int | None = None) -> np.ndarray:
    s = _vector("sketch_ratio", s, n)
    if np.any(s <= 0) or np.any(s > 1):
        raise ValueError("sketch ratios must lie in (0, 1]")
    return s


def rounds_factor(q, s, p, k: BoundConstants) -> float:
    """R(q, s) = (alpha + delta X) / (beta - gamma Y) [reconstructed from Theorem 1],
    X = sum p^2 / q, Y = sum p^2 / (q s). +inf when beta - gamma Y <= 0 (no guarantee)."""
    p = _vector("data_share", p)
    q = _check_q(q, p.size)
    s = _check_s(s, p.size)
    p2 = p * p
    x = float(np.sum(p2 / q))
    y = float(np.sum(p2 / (q * s)))
    den = k.beta - k.gamma * y
    if not den > 0:
        return math.inf
    return (k.alpha + k.delta * x) / den


def q_lower_bound(s, p, k: BoundConstants) -> np.ndarray:
    """Appendix C [seed]: q_i >= N gamma p_i^2 / (beta s_i) makes every term of gamma Y
    below beta / N, hence beta - gamma Y > 0 (unless all hold with equality)."""
    p = _vector("data_share", p)
    s = _check_s(s, p.size)
    return p.size * k.gamma * p * p / (k.beta * s)


def objective(q, s, problem: PlanProblem) -> float:
    """P2 objective R(q, s) * Ebar_T(q, s), Ebar_T the Theorem-2 bound (system.round_time_bound_s),
    its upload term scaled by ``problem.upload_exposed_fraction``."""
    n = problem.num_clients
    q = _check_q(q, n)
    s = _check_s(s, n)
    r = problem.model.value(q, s, problem.data_share)
    if not math.isfinite(r):
        return math.inf
    return r * problem.round_time_bound_s(q, s)


def check_feasible(problem: PlanProblem) -> None:
    """Raise InfeasiblePlan when P2 has no feasible point.

    q = 1, s = 1 maximise beta - gamma Y; if even there it is <= 0 no (q, s) has a finite
    rounds factor. The Appendix-C bound is smallest at s = 1; if it exceeds 1 for some
    client, no q_i <= 1 satisfies it.
    """
    k = problem.model
    p = problem.data_share
    n = p.size
    y1 = float(np.sum(p * p * k.client_weight))
    den = k.beta - k.gamma * y1
    if not den > 0:
        raise InfeasiblePlan(
            f"no plan can satisfy the convergence condition: beta - gamma * sum(p^2) = {den:.6g} <= 0 even with "
            f"full participation and full rank (beta={k.beta:.6g}, gamma={k.gamma:.6g}, sum p^2={y1:.6g}); "
            "the constants say training does not converge, re-estimate them (gamma too large relative to beta)")
    lb = n * k.gamma * p * p * k.client_weight / k.beta
    bad = np.flatnonzero(lb > 1.0 + 1e-12)
    if bad.size and not problem.pin_large_clients:
        show = ", ".join(f"{i} (needs q >= {lb[i]:.4g})" for i in bad[:5])
        more = f" and {bad.size - 5} more" if bad.size > 5 else ""
        raise AppendixCInfeasible(
            f"the Appendix-C condition q_i >= N*gamma*p_i^2/(beta*s_i) exceeds 1 even at full rank for client(s) "
            f"{show}{more}; their data share is too large for gamma/beta = {k.gamma / k.beta:.6g} with N = {n} "
            "(pin_large_clients relaxes the bound for such clients)")


def _sampled_rounds(q, s, problem: PlanProblem, rounds: int, seed: int):
    """(download, compute, upload-phase, upload-term) seconds of ``rounds`` rounds under independent
    Bernoulli(q_i) sampling: max_S t_dl, max_S t_cp, the equal-finish T_up (system.
    equal_finish_allocation) and sum_S t_cm / B; an empty round is all zeros."""
    n = problem.num_clients
    q = _check_q(q, n)
    s = _check_s(s, n)
    tcp = problem.compute_s(s)
    tcm = problem.upload_s_hz_at(s)
    masks = np.random.default_rng(seed).random((int(rounds), n)) < q
    out = np.zeros((int(rounds), 4))
    for j in range(int(rounds)):
        idx = np.flatnonzero(masks[j])
        if idx.size:
            out[j] = (problem.download_s[idx].max(), tcp[idx].max(),
                      equal_finish_allocation(tcp[idx], tcm[idx], problem.bandwidth_hz)[0],
                      tcm[idx].sum() / problem.bandwidth_hz)
    return out


def monte_carlo_round_time_s(q, s, problem: PlanProblem, *, rounds: int, seed: int) -> tuple[float, float]:
    """Mean and standard error of the true round time T under independent Bernoulli(q_i)
    sampling: the broadcast at the weakest participant's rate, then the equal-finish
    bandwidth split (system.equal_finish_allocation).
    An empty round counts as T = 0 (the Theorem-2 bound makes the same convention)."""
    rounds = int(rounds)
    if rounds < 2:
        raise ValueError("rounds must be >= 2 for a standard error")
    d = _sampled_rounds(q, s, problem, rounds, seed)
    times = d[:, 0] + d[:, 2]
    return float(times.mean()), float(times.std(ddof=1) / math.sqrt(rounds))


def upload_exposed_fraction(q, s, problem: PlanProblem, *, rounds: int = 256, seed: int = 0) -> float:
    """f = E[T_up - max_S t_cp] / E[sum_S t_cm / B] at (q, s), by Monte Carlo over ``rounds``
    sampled rounds (docs/theory.md section 8.7): the share of the Theorem-2 upload term that
    the equal-finish round really adds. Per round 0 <= T_up - max t_cp <= sum t_cm / B, so f is
    in [0, 1]; 1 when no round uploads anything."""
    d = _sampled_rounds(q, s, problem, rounds, seed)
    term = float(d[:, 3].sum())
    return float(np.clip((d[:, 2] - d[:, 1]).sum() / term, 0.0, 1.0)) if term > 0 else 1.0
