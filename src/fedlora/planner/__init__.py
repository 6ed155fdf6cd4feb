"""Joint planning of participation probabilities q and sketch ratios s (docs/theory.md sections 2-6).

Pure math: numpy / scipy / cvxpy only, no model, no I/O. Formulas and their provenance
([seed] or [reconstructed]) are written out in docs/theory.md.

Per client i: data share p_i (sum 1), compute time c_i of tau local steps at full rank,
full-rank upload time at unit bandwidth t_cm_i(1) (s*Hz). With k_i of the r ranks,
s_i = k_i / r, t_cp_i(s) = compute_model.time_s(c_i, s), t_cm_i(s) = s * t_cm_i(1).

P2 (what ``plan`` minimises):

    F(q, s) = R(q, s) * Ebar_T(q, s)
    R(q, s) = (alpha + delta X) / (beta - gamma Y),  X = sum p^2 / q,  Y = sum p^2 / (q s)
    Ebar_T  = E[max_{i in S} t_cp_i(s_i)] + sum_i q_i t_cm_i(s_i) / B     (Theorem 2)
    s.t.  q_lower_i <= q_i <= 1,  q_lower_i = N gamma p_i^2 / (beta s_i)  (Appendix C),
          k_i in {1..r}.

``plan`` is Algorithm 2: alternate a q-step (convex surrogate solved by cvxpy on a line
search over the round-time level m, candidates ranked by the true F, best ones polished
by L-BFGS-B on the true F) and an s-step (greedy integer coordinate descent on k_i, each
move re-fitting that client's q_i in closed form, incremental O(log N) move evaluation,
plus block "cap" moves for stragglers), until F stops improving.

Modules: `problem` (P2's inputs and pieces), `solver` (Algorithm 2), `constants` (the
constants from pilot runs). Their public names are re-exported here.
"""

from __future__ import annotations

from .constants import ConstantEstimate, PilotObservation, estimate_constants, fit_constants_constrained
from .problem import (Q_FLOOR, AppendixCInfeasible, BoundConstants, ConstantEstimationError, InfeasiblePlan, Plan,
                      PlanProblem, RoundsModel, check_feasible, monte_carlo_round_time_s, objective, q_lower_bound,
                      rounds_factor, upload_exposed_fraction)
from .solver import plan, plan_participation, plan_ranks

__all__ = [
    "fit_constants_constrained",
    "BoundConstants",
    "RoundsModel",
    "InfeasiblePlan",
    "AppendixCInfeasible",
    "ConstantEstimationError",
    "PlanProblem",
    "Plan",
    "PilotObservation",
    "ConstantEstimate",
    "Q_FLOOR",
    "rounds_factor",
    "objective",
    "q_lower_bound",
    "check_feasible",
    "monte_carlo_round_time_s",
    "upload_exposed_fraction",
    "plan",
    "plan_participation",
    "plan_ranks",
    "estimate_constants",
]
