"""Ablations of seed 001's planner (Hou et al., arXiv 2505.23555, Figs. 2 and 3).

The seed's sampling study compares its planned q against the sampling baselines with every
client at full rank, and its rank study compares its planned s against the rank baselines
with q fixed. These two methods are exactly those planned halves, run as Algorithm 1:

  * proposed_q: s_i = 1; q from Algorithm 2's q-step (planner.plan_participation).
  * proposed_s: q fixed at `sampling.participation_prob` (as the rank baselines);
    integer ranks from the seed's greedy rule (planner.plan_ranks).

Both plan like `proposed` (online by default, or from pilots / given constants).
"""

from __future__ import annotations

import numpy as np

from ..planner import Plan, PlanProblem, plan_participation, plan_ranks
from .proposed import Proposed
from .rank_baselines import _FixedQ


class ProposedQ(Proposed):
    name = "proposed_q"
    summary = "seed 001 ablation: planner picks q_i (Algorithm 2 q-step) at full rank s = 1"

    def solve(self, problem: PlanProblem, start) -> Plan:
        return plan_participation(problem)


class ProposedS(Proposed, _FixedQ):
    name = "proposed_s"
    summary = "seed 001 ablation: q fixed (sampling.participation_prob), planner picks ranks k_i (greedy)"
    plans_participation = False

    def solve(self, problem: PlanProblem, start) -> Plan:
        return plan_ranks(problem, self.participation())

    def warmup_participation(self) -> np.ndarray:
        return self.participation()
