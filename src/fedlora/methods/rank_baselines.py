"""Rank (sketch-ratio) baselines of seed 001 (Hou et al., arXiv 2505.23555, section VI-B).

All three are Algorithm 1 (methods/manual.py: independent sampling, random rank sketches
of k_i = ceil(s_i r) ranks with the r / k_i scale, unbiased p_i / q_i aggregation) with the
participation probability q fixed at `sampling.participation_prob` (meant as a constant;
a list or rule is resolved as in `manual`); only the sketch ratios s differ:

  * rank_full:    s_i = 1 (every client trains all r ranks).
  * rank_normal:  s_i from a normal truncated to [1/r, 1], mean at the midpoint (1/r + 1)/2,
    standard deviation a quarter of the interval, (1 - 1/r)/4 (the seed gives no
    parameters), one draw per client for the run, seeded by (seed, the s stream).
  * rank_uniform: s_i ~ U[1/r, 1], one draw per client, seeded likewise.

The drawn s_i become integer ranks k_i = ceil(s_i r) in [1, r]; plan.json reports
s_i = k_i / r (what the clients actually train).
"""

from __future__ import annotations

import numpy as np

from ..config import RandomRule
from .base import per_client_values
from ..streams import STREAM_Q, STREAM_S
from .manual import IndependentSketch


class _FixedQ(IndependentSketch):
    def participation(self) -> np.ndarray:
        return per_client_values(self.ctx.cfg.sampling.participation_prob, self.ctx, purpose=STREAM_Q)


class RankFull(_FixedQ):
    name = "rank_full"
    summary = "seed 001 baseline: q fixed (sampling.participation_prob), full rank s = 1"

    def choose_q_s(self):
        return self.participation(), np.ones(self.ctx.num_clients)


class RankNormal(_FixedQ):
    name = "rank_normal"
    summary = "seed 001 baseline: q fixed, s_i from a truncated normal on [1/r, 1] (seeded)"

    def choose_q_s(self):
        if self.ctx.rank == 1:  # [1/r, 1] is the single point 1: no spread to draw from
            return self.participation(), np.ones(self.ctx.num_clients)
        return self.participation(), per_client_values(RandomRule(rule="normal"), self.ctx, purpose=STREAM_S)


class RankUniform(_FixedQ):
    name = "rank_uniform"
    summary = "seed 001 baseline: q fixed, s_i ~ U[1/r, 1] (seeded)"

    def choose_q_s(self):
        return self.participation(), per_client_values(RandomRule(rule="uniform"), self.ctx, purpose=STREAM_S)
