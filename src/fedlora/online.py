"""Online estimate of the rounds model from the run's own updates (docs/theory.md section 8).

Pure math: numpy only, no model, no I/O. The server sees, every round, the sketched update
u_i of each participant (scattered into the global factor space) and knows p_i, q_i and
k_i. From the Gram matrix G_ij = <u_i, u_j> of the round's updates it estimates

  * m_i = E||Delta_i||^2, client i's update energy at full rank: E||u_i||^2 = e(k_i) m_i with
    the energy ratio e(k) = s^eta of a rank-k sketch (s = k / r; eta = 1 for a local Adam,
    whose steps do not scale with the gradient; eta = -1 for local SGD, whose sketched
    gradient is r / k times larger on the kept ranks);
  * ||D||^2, the energy of the full-participation, full-rank mean update D = sum_i p_i Delta_i,
    unbiased from the cross products of different clients' updates (independent sampling
    and sketches): E[sum_{i != j in S} w_i w_j <u_i, u_j> / (c_i c_j)] = sum_{i != j} p_i p_j
    <Delta_i, Delta_j> with w_i = p_i / q_i and the sketch's retention c(k) = E<u, Delta> /
    ||Delta||^2 = s^((eta + theta) / 2), plus sum_i p_i^2 m_i;
  * omega_i = m_i / ||D||^2, the relative energy of client i's update.

With them the aggregated update (read per unit of retained signal) has, per client,

    sampling variance  p_i^2 m_i (1 / q_i - 1)
    sketch variance    p_i^2 m_i (s_i^-theta - 1) / q_i

(theta = 1 is the ideal sketch of the seed; a measured theta > 1 says a sketch costs more);
nu(q, s) = (sum of both) / ||D||^2 is the noise-to-signal ratio of a round's update.

How much that noise costs depends on the step, which the run keeps fixed (docs/theory.md
8.4). Along the mean update the loss is taken as quadratic: a round's expected progress is
a - b (1 + nu), a the linear gain of D and b = D^T H D / 2, so with rho = b / a the rounds
to a target grow as

    R(q, s) = (1 - rho) / (1 - rho (1 + nu(q, s)))

(R = 1 at full participation and rank; the seed's form with the noise in the denominator:
alpha = 1 - rho, beta = 1 - rho + rho sum p^2 omega, gamma = rho, delta = 0, weights
omega, denominator sketch exponent theta). rho is measured from consecutive applied
updates A_t, A_{t+1} (what the server added): the next mean update is the current one
changed by the curvature, D(x + A) = D - eta H A for gradient steps (rho = eta h / 2), so
E<A_t, A_{t+1}> = ||D||^2 (1 - 2 rho (1 + nu_t)) and E||A_t||^2 = ||D||^2 (1 + nu_t); per
pair, with c_t = <A_t, A_{t+1}> / ||A_t||^2,

    rho_t = (1 - c_t (1 + nu_t)) / (2 (1 + nu_t)).

Each rho_t is clipped to STEP_RATIO_RANGE and folded into a running mean that starts from
STEP_RATIO_PRIOR counted as STEP_RATIO_PRIOR_PAIRS pairs (an exponential moving average once
1 / count falls below `smoothing`).

Before a client has been seen its update is taken to be orthogonal to everybody else's and
as large as the average seen one (before any: omega_i = 1 / sum p^2, the mean update of
mutually orthogonal client updates); estimates are running means early on and exponential
moving averages later (updates shrink and turn as training goes on).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .planner import RoundsModel

__all__ = ["RoundObservation", "OnlineEstimator", "energy_exponent_for", "fixed_step_model", "STEP_RATIO_PRIOR",
           "STEP_RATIO_PRIOR_PAIRS", "STEP_RATIO_RANGE"]

# rho before any pair of updates was seen: half the noise-free optimum (rho = 1/2, where a
# step's curvature cost is half its linear gain), between a tiny step (rho -> 0: noise is
# free) and a tuned one.
STEP_RATIO_PRIOR = 0.25
# Measured rho is kept in this range: below, noise would look free and every q would fall to
# the exploration floor on one lucky pair (while the adapter's factors grow from B = 0,
# consecutive updates align more than a quadratic allows); above, R would be infinite at
# full participation.
STEP_RATIO_RANGE = (0.02, 0.9)
# The prior counts as this many pairs in the running mean: one pair is noisy (and the first
# rounds, while the factors grow from B = 0, are not a quadratic regime), so a single pair
# cannot move every q to the floor. Chosen after the first 50-client look (docs/results.md).
STEP_RATIO_PRIOR_PAIRS = 2


def energy_exponent_for(optimizer: str) -> float:
    """eta of e(k) = s^eta for the clients' local optimizer (docs/theory.md section 8)."""
    return 1.0 if optimizer in ("adam", "adamw") else -1.0


@dataclass(frozen=True)
class RoundObservation:
    """What the server saw in one round: participants, their ranks and participation
    probabilities, and the Gram matrix of their scattered updates (raw, unweighted)."""

    clients: np.ndarray  # ids, shape [m]
    ranks: np.ndarray  # k_i, shape [m]
    participation_prob: np.ndarray  # q_i used for this round's sampling, shape [m]
    gram: np.ndarray  # <u_i, u_j>, shape [m, m]

    def __post_init__(self) -> None:
        m = len(self.clients)
        for name, shape in (("ranks", (m,)), ("participation_prob", (m,)), ("gram", (m, m))):
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"RoundObservation.{name} must have shape {shape}, got {np.shape(getattr(self, name))}")


def fixed_step_model(data_share, relative_energy, step_ratio: float, sketch_exponent: float = 1.0) -> RoundsModel:
    """R(q, s) = (1 - rho) / (1 - rho (1 + nu(q, s))) as a RoundsModel, nu(q, s) = sum_i p_i^2
    omega_i (s_i^-theta / q_i - 1)."""
    p, omega, rho = np.asarray(data_share, dtype=np.float64), np.asarray(relative_energy, dtype=np.float64), step_ratio
    return RoundsModel(alpha=1.0 - rho, beta=1.0 - rho + rho * float(np.sum(p ** 2 * omega)), gamma=rho, delta=0.0,
                       client_weight=omega, denominator_sketch_exponent=sketch_exponent)


class OnlineEstimator:
    """Running estimate of m_i, ||D||^2 and the per-client variances; see the module docstring.

    smoothing: weight of the newest observation once the running mean's 1/n falls below it
    (exponential moving average with that weight); None keeps a plain running mean."""

    def __init__(self, data_share, rank: int, *, energy_exponent: float, sketch_exponent: float = 1.0,
                 smoothing: float | None = 0.3, signal_floor: float = 0.05):
        self.p = np.asarray(data_share, dtype=np.float64)
        self.r = int(rank)
        self.eta = float(energy_exponent)
        self.theta = float(sketch_exponent)
        self.smoothing = smoothing
        self.signal_floor = float(signal_floor)  # ||D||^2 >= floor * sum p^2 m (the estimate may go negative)
        n = self.p.size
        self.energy = np.full(n, np.nan)  # m_i
        self.seen = np.zeros(n, dtype=np.int64)
        self.cross = 0.0  # sum_{i != j} p_i p_j <Delta_i, Delta_j>
        self.rounds = 0
        self.step = STEP_RATIO_PRIOR  # rho
        self.step_pairs = 0

    # -- the sketch model
    def energy_ratio(self, k) -> np.ndarray:
        return (np.asarray(k, dtype=np.float64) / self.r) ** self.eta

    def retention(self, k) -> np.ndarray:
        return (np.asarray(k, dtype=np.float64) / self.r) ** ((self.eta + self.theta) / 2.0)

    def _weight(self, n_obs: int) -> float:
        w = 1.0 / n_obs
        return w if self.smoothing is None else max(w, self.smoothing)

    # -- updates
    def observe(self, obs: RoundObservation) -> None:
        """Fold one round in. An empty round still counts (its cross term is 0, which is part of
        the unbiased average)."""
        ids = np.asarray(obs.clients, dtype=np.int64)
        gram = np.asarray(obs.gram, dtype=np.float64)
        for j, i in enumerate(ids):
            self.seen[i] += 1
            m = float(gram[j, j] / self.energy_ratio(obs.ranks[j]))
            old = self.energy[i]
            self.energy[i] = m if np.isnan(old) else old + self._weight(int(self.seen[i])) * (m - old)
        w = self.p[ids] / np.asarray(obs.participation_prob, dtype=np.float64) / self.retention(obs.ranks)
        g = gram * np.outer(w, w)
        cross = float(g.sum() - np.trace(g))
        self.rounds += 1
        self.cross += self._weight(self.rounds) * (cross - self.cross)

    def observe_step(self, alignment: float, nu: float) -> None:
        """Fold in one pair of consecutive applied updates: alignment = <A_t, A_{t+1}> / ||A_t||^2
        and nu the noise-to-signal ratio of the plan A_t was drawn under."""
        rho = float(np.clip((1.0 - alignment * (1.0 + nu)) / (2.0 * (1.0 + nu)), *STEP_RATIO_RANGE))
        self.step_pairs += 1
        self.step += self._weight(self.step_pairs + STEP_RATIO_PRIOR_PAIRS) * (rho - self.step)

    # -- estimates
    def step_ratio(self) -> float:
        """rho in STEP_RATIO_RANGE (the prior until a pair was seen)."""
        return float(np.clip(self.step, *STEP_RATIO_RANGE))

    def client_energy(self) -> np.ndarray:
        """m_i; a client never seen gets the data-share-weighted mean of the seen ones (1 before
        any is seen: only ratios to the signal matter)."""
        m = self.energy.copy()
        seen = ~np.isnan(m)
        m[~seen] = float(np.average(m[seen], weights=np.maximum(self.p[seen], 1e-12))) if seen.any() else 1.0
        return m

    def signal(self) -> float:
        """||D||^2 = sum_{i != j} p_i p_j <Delta_i, Delta_j> + sum_i p_i^2 m_i, floored (the
        cross term is 0 until a round has been observed: the orthogonal prior)."""
        diag = float(np.sum(self.p ** 2 * self.client_energy()))
        return max(self.cross + diag, self.signal_floor * diag)

    def relative_energy(self) -> np.ndarray:
        """omega_i = m_i / ||D||^2."""
        return self.client_energy() / self.signal()

    def variances(self, participation_prob, sketch_ratio) -> tuple[np.ndarray, np.ndarray]:
        """Per client: (sampling variance, sketch variance) of the aggregated update, read per
        unit of retained signal; absolute (the units of ||D||^2)."""
        q = np.asarray(participation_prob, dtype=np.float64)
        s = np.asarray(sketch_ratio, dtype=np.float64)
        pm = self.p ** 2 * self.client_energy()
        return pm * (1.0 / q - 1.0), pm * (s ** -self.theta - 1.0) / q

    def noise_to_signal(self, participation_prob, sketch_ratio) -> float:
        samp, sk = self.variances(participation_prob, sketch_ratio)
        return float(np.sum(samp) + np.sum(sk)) / self.signal()

    def rounds_model(self) -> RoundsModel:
        return fixed_step_model(self.p, self.relative_energy(), self.step_ratio(), self.theta)

    # -- checkpoint (JSON-able; floats survive a JSON round trip exactly)
    def state_dict(self) -> dict:
        return {"energy": [None if np.isnan(x) else float(x) for x in self.energy],
                "seen": [int(x) for x in self.seen], "cross": float(self.cross), "rounds": int(self.rounds),
                "step": float(self.step), "step_pairs": int(self.step_pairs)}

    def load_state_dict(self, d: dict) -> None:
        self.energy = np.array([np.nan if x is None else float(x) for x in d["energy"]], dtype=np.float64)
        self.seen = np.array(d["seen"], dtype=np.int64)
        self.cross = float(d["cross"])
        self.rounds = int(d["rounds"])
        self.step, self.step_pairs = float(d["step"]), int(d["step_pairs"])
