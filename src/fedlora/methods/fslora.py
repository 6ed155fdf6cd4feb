"""FSLoRA: Federated Sketching LoRA (Fang et al., arXiv 2501.19389).

One global rank-r adapter. Each round the server samples a set S_t of m clients uniformly
without replacement; every sampled client i trains a fresh uniformly random sketch of
k_i of the r ranks (S_i = (r / k_i) sum_{j in I_i} e_j e_j^T, E[S_i] = I) as a rank-k_i
sub-adapter with the scaling (alpha / r) * (r / k_i), exactly as seed 001's Algorithm 1
(methods/manual.py) does; it uploads only the changes of its k_i ranks. The server adds

    Delta^t = sum_{i in S_t} w_i * scatter(Delta_i^t),   w_i = p_i / sum_{j in S_t} p_j,

and applies the server optimizer (AdamW-like `train.server_optimizer=adam` in the paper's
public defaults; plain `x + Delta` with the default sgd, lr 1).

Choices where the paper is vague (or where we deviate from its public code):
  * m = `options.clients_per_round`, default max(1, round(0.2 N)) (the paper's 10 of 50);
    round half up, not Python's banker's rounding. m > N is an input error.
  * k_i = `options.client_ranks[i]` when given, else ceil(s_i r) from `sketch.ratio` (a
    constant, a list or a seeded random rule), fixed per client for the whole run; the
    index set I_i is fresh every round (the same random stream as Algorithm 1, so with the
    same seed FSLoRA and `manual` draw the same sketches for the same client and round).
  * Server weights: the paper's server step is FedAvg over the sampled set, i.e. the
    sampled clients' updates averaged with weights that sum to one over S_t. We use the
    data shares renormalized over S_t (McMahan et al.'s FedAvg rule): with equal shares this
    is exactly the paper's (1/m) sum_{i in S_t}; with unequal shares it keeps the step size
    independent of which clients were drawn (the weights always sum to one), whereas the
    unbiased alternative (N/m) p_i has a random total weight and a larger variance. It is a
    self-normalized (ratio) estimator: unbiased for equal shares, consistent otherwise.
    Seed 001's independent-sampling rule p_i / q_i is what `manual` implements instead.
  * Overlapping sketches simply add (aggregation.scatter_sum); there is no per-rank
    normalization, because the r / k_i factor already makes each client's sketched update
    unbiased for its full-rank one.
  * The public code masks gradients by a parameter-name test that never matches PEFT's
    names (the sketch is never applied); we implement the paper: a real rank-k_i
    sub-adapter, so compute and upload shrink with k_i.
  * Clients whose update is not finite are dropped by the loop; the weights are
    renormalized over the clients whose payloads arrived. An empty round leaves the
    adapter unchanged (no server-optimizer step).
  * plan.json: inclusion probability m / N per client and the ranks; the expected round
    time is the Theorem-2 style bound for fixed-size sampling (exact E[max compute] and
    E[max broadcast time] over a uniform m-subset plus (m / N) sum_i t_cm_i(s_i) / B).

`FixedSizeSampling`, the fixed-size sampled set shared by FSLoRA, HetLoRA, FLoRA and
FlexLoRA (the same random stream, so with one seed all four train the same clients in the
same rounds), lives here too.
"""

from __future__ import annotations

import math

import numpy as np

from ..aggregation import SketchedUpdate, scatter_sum
from ..config import InputError
from .base import (AdapterState, Aggregated, Method, MethodContext, RoundConfig, compute_model, plan_json,
                   per_client_values, ranks_from_ratios, split_payload, state_values)
from ..streams import STREAM_FIXED_SAMPLE, STREAM_S
from .manual import sketch_job



def default_clients_per_round(num_clients: int) -> int:
    """max(1, round(0.2 N)), rounding halves up."""
    return max(1, int(math.floor(0.2 * num_clients + 0.5)))


def client_ranks(ctx: MethodContext) -> np.ndarray:
    """Rank per client: `options.client_ranks` if given, else ceil(s_i r) from `sketch.ratio`."""
    if ctx.cfg.options.client_ranks is not None:
        return np.asarray(ctx.cfg.options.client_ranks, dtype=int)
    return ranks_from_ratios(per_client_values(ctx.cfg.sketch.ratio, ctx, purpose=STREAM_S), ctx.rank)


def expected_max_fixed_size(values: np.ndarray, m: int) -> float:
    """E[max_{i in S} v_i] for S a uniform m-subset of the N values (without replacement):
    sorted ascending, P(max = v_(i)) = C(i - 1, m - 1) / C(N, m), i = m..N."""
    v = np.sort(np.asarray(values, dtype=float))
    n = v.size
    if m < 1 or m > n:
        raise ValueError(f"m must be in [1, {n}], got {m}")
    total = math.comb(n, m)
    return float(sum(v[i - 1] * math.comb(i - 1, m - 1) / total for i in range(m, n + 1)))


class FixedSizeSampling(Method):
    """m clients per round, uniformly without replacement; client ranks r_i per client."""

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        n = ctx.num_clients
        m = ctx.cfg.options.clients_per_round
        m = default_clients_per_round(n) if m is None else int(m)
        if m > n:
            raise InputError(f"field 'options.clients_per_round': value {m}: exceeds data.num_clients={n}")
        self.clients_per_round = m
        self.ranks = client_ranks(ctx)

    def sample(self, round_idx: int) -> np.ndarray:
        """The sampled set S_t: m distinct ids, sorted, seeded by (seed, round)."""
        rng = self.ctx.rng(STREAM_FIXED_SAMPLE, round_idx)
        return np.sort(rng.choice(self.ctx.num_clients, size=self.clients_per_round, replace=False))

    def shares(self, ids) -> dict[int, float]:
        """Data shares renormalized over `ids`: p_i / sum_{j in ids} p_j."""
        p = self.ctx.data_share
        total = float(sum(p[i] for i in ids))
        return {int(i): float(p[i]) / total for i in ids}

    def plan(self) -> dict:
        cfg, n, m = self.ctx.cfg, self.ctx.num_clients, self.clients_per_round
        s = self.ranks / self.ctx.rank
        cm = compute_model(cfg)
        bound = (expected_max_fixed_size(cm.time_s(self.ctx.compute_time_s, s), m)
                 + m / n * float(np.sum(s * self.ctx.upload_s_hz)) / cfg.system.bandwidth_hz)
        if self.ctx.download_s is not None:  # the broadcast, at the weakest sampled client's rate
            bound += expected_max_fixed_size(self.ctx.download_s, m)
        # participation_prob: the inclusion probability of a uniform m-subset
        return plan_json(self.ctx, participation_prob=[m / n] * n, sketch_ratio=s, ranks=self.ranks,
                         expected_round_time_s=bound, expected_participants=m, sampling="fixed_size",
                         clients_per_round=m)


class FSLoRA(FixedSizeSampling):
    name = "fslora"
    summary = "FSLoRA (Fang et al. 2025): m sampled clients train random rank sketches, FedAvg of sketched updates"

    def configure_round(self, round_idx: int, state: AdapterState) -> RoundConfig:
        jobs = [sketch_job(self.ctx, state, round_idx, int(i), int(self.ranks[i])) for i in self.sample(round_idx)]
        return RoundConfig(jobs=jobs, broadcast_values=state_values(state))

    def aggregate(self, round_idx, state, jobs, payloads) -> Aggregated:
        if not payloads:
            return Aggregated(state)
        w = self.shares(sorted(payloads))
        updates = [SketchedUpdate(client_id=i, rank_indices=jobs[i].rank_indices,
                                  delta=split_payload(payloads[i]), weight=w[i]) for i in sorted(payloads)]
        return Aggregated(self.server_opt.apply(state, scatter_sum(state, updates)))
