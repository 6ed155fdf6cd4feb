"""Sampling baselines of seed 001 (Hou et al., arXiv 2505.23555, section VI-A).

All four are Algorithm 1 (methods/manual.py: independent Bernoulli(q_i) participation,
unbiased aggregation sum_{i in S} (p_i / q_i) Delta_i, no division by |S|) with every
client at full rank, s_i = 1; only the participation probabilities q differ:

  * sample_full:     q_i = 1 (everyone, every round).
  * sample_fixed:    q_i = 0.5.
  * sample_uniform:  q_i ~ U[0.05, 1], one draw per client for the whole run, seeded by
    (seed, the q stream). The seed says U(0, 1]; we floor it at 0.05 by drawing from
    U[0.05, 1] (no atom at the floor) because the unbiased weight p_i / q_i explodes as
    q_i -> 0: one rare participant with q = 0.001 would be scaled by 1000.
  * sample_weighted: q_i proportional to p_i (water-filled at 1, base.weighted_probabilities),
    scaled so that sum_i q_i = expected_participants(). As in the seed, that is the
    proposed plan's expected participants when planner constants are given as numbers
    (planner.constants); else `sampling.participation_prob.expected_participants` when the
    config gives a "weighted" rule with that field; else 0.5 N (as many expected
    participants as sample_fixed).
"""

from __future__ import annotations

import numpy as np

from ..config import RandomRule
from .base import per_client_values, weighted_probabilities
from .manual import STREAM_Q, IndependentSketch

UNIFORM_Q_FLOOR = 0.05


class SampleFull(IndependentSketch):
    name = "sample_full"
    summary = "seed 001 baseline: full participation q = 1, full rank s = 1"

    def choose_q_s(self):
        n = self.ctx.num_clients
        return np.ones(n), np.ones(n)


class SampleFixed(IndependentSketch):
    name = "sample_fixed"
    summary = "seed 001 baseline: fixed q = 0.5 for every client, full rank s = 1"

    def choose_q_s(self):
        n = self.ctx.num_clients
        return np.full(n, 0.5), np.ones(n)


class SampleUniform(IndependentSketch):
    name = "sample_uniform"
    summary = "seed 001 baseline: q_i ~ U[0.05, 1] per client (seeded), full rank s = 1"

    def choose_q_s(self):
        rule = RandomRule(rule="uniform", low=UNIFORM_Q_FLOOR, high=1.0)
        return per_client_values(rule, self.ctx, purpose=STREAM_Q), np.ones(self.ctx.num_clients)


class SampleWeighted(IndependentSketch):
    name = "sample_weighted"
    summary = "seed 001 baseline: q_i proportional to data share p_i (sum q = expected participants), s = 1"

    def expected_participants(self) -> float:
        """Target sum of q: the proposed plan's when constants are given; else see the docstring."""
        if self.ctx.constants is not None:
            from .proposed import Proposed

            return float(Proposed(self.ctx).participation_prob.sum())
        spec = self.ctx.cfg.sampling.participation_prob
        if isinstance(spec, RandomRule) and spec.rule == "weighted" and spec.expected_participants is not None:
            return float(spec.expected_participants)
        return 0.5 * self.ctx.num_clients

    def choose_q_s(self):
        q = weighted_probabilities(self.ctx.data_share, self.expected_participants())
        return q, np.ones(self.ctx.num_clients)
