"""Sampling baselines of seed 001 (Hou et al., arXiv 2505.23555, section VI-A).

All four are Algorithm 1 (methods/manual.py: independent Bernoulli(q_i) participation,
unbiased aggregation sum_{i in S} (p_i / q_i) Delta_i, no division by |S|) with every
client at full rank, s_i = 1; only the participation probabilities q differ:

  * sample_full:     q_i = 1 (everyone, every round).
  * sample_fixed:    q_i = 0.5.
  * sample_uniform:  one q for every client (the seed: fixed and uniform sampling "assign
    identical participation probabilities to all clients"), q = E / N;
  * sample_weighted: q_i proportional to p_i (water-filled at 1, base.weighted_probabilities),
    sum_i q_i = E.

E, the expected participants per round, is that of the planned method the baseline is
compared with (as in the seed): `sampling.expected_participants` when given, else the
starting plan of the method named by `sampling.match` (`proposed` by default; the sampling
study sets `proposed_q`): its round-1 plan, from the constants when `planner.constants`
gives numbers, else from the online prior (the pilots of `planner.constants: pilots` are
not run for a baseline). An online plan moves after round 1, and its prior plan can be far
from where it settles (at 50 clients it keeps about 49 of 50, the plans that follow 30-45):
a study that runs the matched method beside the baseline therefore sets
`expected_participants` to that run's mean participants per round, seed by seed, before the
baseline starts (fedlora.study; docs/baselines.md).
"""

from __future__ import annotations

import numpy as np

from .base import weighted_probabilities
from .manual import IndependentSketch
from .planned_ablations import ProposedQ
from .proposed import Proposed
from .relaxed import ProposedRelaxed

MATCHABLE = {cls.name: cls for cls in (Proposed, ProposedQ, ProposedRelaxed)}  # config: sampling.match


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


def matched_participants(ctx) -> float:
    """E: `sampling.expected_participants`, else the sum of q of `sampling.match`'s round-1 plan."""
    from dataclasses import replace

    from ..config import ConstantsConfig

    spec, constants = ctx.cfg.sampling, ctx.cfg.planner.constants
    if spec.expected_participants is not None:
        return min(float(spec.expected_participants), float(ctx.num_clients))
    given = constants.bound_constants() if isinstance(constants, ConstantsConfig) else None
    return float(MATCHABLE[spec.match](replace(ctx, constants=given)).participation_prob.sum())


class SampleUniform(IndependentSketch):
    name = "sample_uniform"
    matches_participation = True  # a study sets E from the matched method's run
    summary = "seed 001 baseline: one q for every client, as many expected participants as the planned method, s = 1"

    def choose_q_s(self):
        n = self.ctx.num_clients
        return np.full(n, matched_participants(self.ctx) / n), np.ones(n)


class SampleWeighted(IndependentSketch):
    name = "sample_weighted"
    matches_participation = True  # a study sets E from the matched method's run
    summary = "seed 001 baseline: q_i proportional to data share p_i, as many expected participants as the planned method, s = 1"

    def choose_q_s(self):
        return weighted_probabilities(self.ctx.data_share, matched_participants(self.ctx)), np.ones(self.ctx.num_clients)
