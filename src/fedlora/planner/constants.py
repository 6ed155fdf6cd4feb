"""The bound's constants from pilot runs (docs/theory.md section 5, eq. 22-23)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .problem import BoundConstants, ConstantEstimationError, _frozen, _vector

# --------------------------------------------------------------------------- constants
@dataclass(frozen=True)
class PilotObservation:
    """One pilot run with uniform settings: every client at q = participation_prob and
    s = sketch_ratio; ``rounds`` = rounds needed to reach the pilot loss eps0."""

    participation_prob: float
    sketch_ratio: float
    rounds: float

    def __post_init__(self) -> None:
        q, s, r = float(self.participation_prob), float(self.sketch_ratio), float(self.rounds)
        if not (math.isfinite(q) and 0 < q <= 1):
            raise ValueError(f"pilot participation_prob must be in (0, 1], got {self.participation_prob!r}")
        if not (math.isfinite(s) and 0 < s <= 1):
            raise ValueError(f"pilot sketch_ratio must be in (0, 1], got {self.sketch_ratio!r}")
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"pilot rounds must be a positive number, got {self.rounds!r}")
        object.__setattr__(self, "participation_prob", q)
        object.__setattr__(self, "sketch_ratio", s)
        object.__setattr__(self, "rounds", r)


@dataclass(frozen=True)
class ConstantEstimate:
    """Result of ``estimate_constants``. ``constants`` are scaled so that beta = 1.
    ``singular_values``: of the column-equilibrated design matrix, descending.
    ``condition_number``: sigma_1 / sigma_3, the condition number of that matrix with its
    smallest singular value removed (how well the null direction is separated).
    ``residual``: sigma_4 / sigma_3 (0 for pilots that fit the model exactly)."""

    constants: BoundConstants
    singular_values: np.ndarray
    condition_number: float
    residual: float


def estimate_constants(pilots: Sequence[PilotObservation], data_share, *, max_condition: float = 1e8,
                       max_residual: float = 0.5) -> ConstantEstimate:
    """Estimate (alpha, beta, gamma, delta) from pilot runs (docs/theory.md section 5, eq. 22-23).

    Each pilot k satisfies alpha + delta X_k - R_k beta + R_k gamma Y_k = 0 with
    X_k = sum p^2 / q_k, Y_k = sum p^2 / (q_k s_k): rows [1, -R_k, R_k Y_k, X_k] form A and
    theta = (alpha, beta, gamma, delta) spans its null space. With 4 pilots this is the
    seed's square system; with more it is the total-least-squares solution through the same
    SVD. Columns are scaled to unit norm first (the answer does not depend on units; the
    scaling is undone afterwards), the right singular vector of the smallest singular value
    is taken, its sign fixed so that beta > 0, and it is scaled to beta = 1.

    Raises ConstantEstimationError when: fewer than 4 pilots; the design is degenerate or
    ill-conditioned (sigma_1 / sigma_3 > max_condition: two or more directions fit, e.g.
    pilots that repeat the same (q, s)); the fit is poor (sigma_4 / sigma_3 > max_residual:
    the pilots do not follow the model); or any estimated constant is non-positive.
    """
    pilots = list(pilots)
    if len(pilots) < 4:
        raise ConstantEstimationError(f"need at least 4 pilot runs to estimate 4 constants, got {len(pilots)}")
    p = _vector("data_share", data_share)
    p2 = float(np.sum(p * p))
    rows = []
    for o in pilots:
        if not isinstance(o, PilotObservation):
            raise TypeError("pilots must be PilotObservation objects")
        x = p2 / o.participation_prob
        y = p2 / (o.participation_prob * o.sketch_ratio)
        rows.append([1.0, -o.rounds, o.rounds * y, x])
    a = np.asarray(rows, dtype=np.float64)
    colnorm = np.linalg.norm(a, axis=0)
    an = a / colnorm
    _u, sv, vt = np.linalg.svd(an, full_matrices=False)
    cond = float(sv[0] / sv[2]) if sv[2] > 0 else math.inf
    resid = float(sv[3] / sv[2]) if sv[2] > 0 else math.inf
    if not cond <= max_condition:
        raise ConstantEstimationError(
            f"pilot design is degenerate or ill-conditioned (condition number {cond:.3g} > {max_condition:.3g}; "
            f"singular values {np.array2string(sv, precision=3)}): the pilots do not pin down a single "
            "direction (alpha, beta, gamma, delta); use 4 or more runs with clearly different q AND s")
    if not resid <= max_residual:
        raise ConstantEstimationError(
            f"pilot rounds do not fit R = (alpha + delta X)/(beta - gamma Y): smallest/third singular value "
            f"ratio {resid:.3g} > {max_residual:.3g}; check the pilot measurements or pass the constants directly")
    theta = vt[-1] / colnorm
    if theta[1] < 0:
        theta = -theta
    names = ("alpha", "beta", "gamma", "delta")
    shown = theta / theta[1] if theta[1] > 0 else theta / np.max(np.abs(theta))
    if not np.all(theta > 0):
        got = ", ".join(f"{nm}={v:.4g}" for nm, v in zip(names, shown))
        raise ConstantEstimationError(
            f"estimated constants must all be positive, got {got} "
            f"({'scaled to beta = 1' if theta[1] > 0 else 'scaled to max |.| = 1'}); the pilots contradict the "
            "model (e.g. fewer rounds with a smaller q or s, or noise larger than the effect): rerun pilots "
            "further apart in q and s, or pass the constants directly")
    theta = theta / theta[1]
    consts = BoundConstants(alpha=float(theta[0]), beta=1.0, gamma=float(theta[2]), delta=float(theta[3]))
    return ConstantEstimate(constants=consts, singular_values=_frozen(sv), condition_number=cond, residual=resid)


def fit_constants_constrained(pilots: Sequence[PilotObservation], data_share, *, floor: float = 1e-6,
                              margin: float = 0.05) -> tuple[BoundConstants, float]:
    """The positive constants (beta = 1) that best fit the pilots' rounds [ours].

    Minimizes sum_k ((alpha + delta X_k) / R_k + gamma Y_k - 1)^2, the pilots' equations
    of estimate_constants divided by R_k (a relative residual), over alpha, gamma, delta >=
    floor, with gamma Y_k <= 1 - margin so the model predicts finite rounds at every pilot.
    Linear least squares in (alpha, gamma, delta) with box bounds, solved exactly by
    scipy.optimize.lsq_linear (a general QP solver stopped short on ordinary inputs). For
    pilots that fit the model it returns the SVD estimate; where the pilots contradict it
    (a constant would be negative), the closest positive model.
    Returns (constants, rms relative residual).
    """
    from scipy.optimize import lsq_linear

    pilots = list(pilots)
    if len(pilots) < 3:
        raise ConstantEstimationError(f"need at least 3 pilot runs to fit 3 free constants, got {len(pilots)}")
    p = _vector("data_share", data_share)
    p2 = float(np.sum(p * p))
    x = np.array([p2 / o.participation_prob for o in pilots])
    y = np.array([p2 / (o.participation_prob * o.sketch_ratio) for o in pilots])
    r = np.array([float(o.rounds) for o in pilots])
    design = np.column_stack([1.0 / r, y, x / r])  # columns: alpha, gamma, delta
    g_max = (1.0 - margin) / float(np.max(y))
    if not g_max >= floor:
        raise ConstantEstimationError(f"pilot Y up to {np.max(y):.4g}: no gamma >= {floor} keeps the rounds finite")
    res = lsq_linear(design, np.ones(len(pilots)), bounds=([floor, floor, floor], [np.inf, g_max, np.inf]),
                     method="bvls")
    if not res.success:
        raise ConstantEstimationError(f"constrained fit of the pilot rounds failed ({res.message})")
    a, g, d = (float(v) for v in res.x)
    rms = float(np.sqrt(np.mean(((a + d * x) / r + g * y - 1.0) ** 2)))
    return BoundConstants(alpha=a, beta=1.0, gamma=g, delta=d), rms
