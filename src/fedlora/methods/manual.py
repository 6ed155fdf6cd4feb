"""Algorithm 1 of seed 001 (Hou et al., arXiv 2505.23555) with q and s given by the user.

Every client joins a round with its own probability q_i (independent Bernoulli), trains a
fresh uniformly random sketch of k_i = ceil(s_i r) of the r LoRA ranks with the r/k_i
scaling, uploads only those ranks, and the server adds sum_{i in S} (p_i / q_i) Delta_i:
an unbiased estimate of the full-participation update (no division by |S|).
"""

from __future__ import annotations

import numpy as np

from ..aggregation import SketchedUpdate, sample_participants, scatter_sum
from ..sketch import sample_rank_indices, sketch_scale, slice_ranks
from ..streams import STREAM_Q, STREAM_S, STREAM_SAMPLE, STREAM_SKETCH
from .base import (compute_model, plan_json, Aggregated, AdapterState, ClientJob, Method, MethodContext, RoundConfig, per_client_values,
                   ranks_from_ratios, split_payload, state_values)

# purposes for counter-based random streams (see MethodContext.rng)


def sketch_job(ctx: MethodContext, state: AdapterState, round_idx: int, client: int, k: int) -> ClientJob:
    """Client `client` trains a fresh uniform k-subset of the r ranks, scaled by r/k."""
    r = ctx.rank
    idx = sample_rank_indices(ctx.rng(STREAM_SKETCH, round_idx, client), r, k)
    start = {n: slice_ranks(a, b, idx) for n, (a, b) in state.items()}
    return ClientJob(client_id=client, start=start, rank_indices=idx,
                     scaling=ctx.base_scaling * sketch_scale(r, k), compute_ratio=k / r)


class IndependentSketch(Method):
    name = "manual"
    summary = "seed 001 Algorithm 1: independent sampling q_i + random rank sketches s_i, both from the config"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        q, s = self.choose_q_s()
        self.participation_prob = np.asarray(q, dtype=float)
        self.ranks = ranks_from_ratios(np.asarray(s, dtype=float), ctx.rank)
        self.sketch_ratio = self.ranks / ctx.rank

    def choose_q_s(self) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.ctx.cfg
        q = per_client_values(cfg.sampling.participation_prob, self.ctx, purpose=STREAM_Q)
        s = per_client_values(cfg.sketch.ratio, self.ctx, purpose=STREAM_S)
        return q, s

    def plan(self) -> dict:
        from ..system import round_time_bound_s

        s = self.sketch_ratio
        bound = round_time_bound_s(compute_model(self.ctx.cfg).time_s(self.ctx.compute_time_s, s),
                                   s * self.ctx.upload_s_hz, self.participation_prob, self.ctx.cfg.system.bandwidth_hz,
                                   self.ctx.download_s)
        return plan_json(self.ctx, participation_prob=self.participation_prob, sketch_ratio=s, ranks=self.ranks,
                         expected_round_time_s=bound)

    def configure_round(self, round_idx: int, state: AdapterState) -> RoundConfig:
        sampled = sample_participants(self.ctx.rng(STREAM_SAMPLE, round_idx), self.participation_prob)
        jobs = [sketch_job(self.ctx, state, round_idx, int(i), int(self.ranks[i])) for i in sampled]
        return RoundConfig(jobs=jobs, broadcast_values=state_values(state))

    def aggregate(self, round_idx, state, jobs, payloads) -> Aggregated:
        if not payloads:  # empty round: x unchanged (and no server-optimizer step)
            return Aggregated(state)
        p, q = self.ctx.data_share, self.participation_prob
        updates = [SketchedUpdate(client_id=i, rank_indices=jobs[i].rank_indices,
                                  delta=split_payload(payloads[i]), weight=float(p[i] / q[i]))
                   for i in sorted(payloads)]
        return Aggregated(self.server_opt.apply(state, scatter_sum(state, updates)))
