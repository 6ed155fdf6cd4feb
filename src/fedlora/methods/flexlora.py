"""FlexLoRA: full-size aggregation and SVD redistribution (Bai et al., "Federated
Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources",
NeurIPS 2024).

Client i holds a rank-r_i LoRA. Each round m sampled clients (uniformly without
replacement; the same sets as FSLoRA / HetLoRA / FLoRA for one seed) receive the rank-r_i
truncated SVD of the global update, train it and upload their factors. The server forms
the full-size (out x in) aggregate of the clients' local products

    W = sum_{i in S} p_i B_i A_i,     p_i = n_i / sum_{j in S} n_j,

takes its SVD W = U diag(S) V^T and hands client i the best rank-r_i approximation
(Eckart-Young) B_i = U[:, :r_i] diag(S[:r_i]), A_i = V[:, :r_i]^T by unicast
(r_i (in + out) values per module). The products and SVDs are real server work, charged
on the clock (`Aggregated.server_s`) in the round that aggregates as a FLOP count over
`system.server_flops_hz` (`server_flops`: 2 out r_i in per product plus the thin SVD's
4 m n^2 + 22 n^3, m >= n, Golub & Van Loan's R-SVD count), not as the wall time of the
machine that runs the simulation, which would make the simulated clock depend on it.

Choices where the paper is vague:
  * Split of the singular values: B = U_r diag(S_r), A = V_r^T (rows of A orthonormal).
    Unlike the symmetric split U sqrt(S), sqrt(S) V^T, it keeps every rank trainable when
    some singular values are zero (W of rank < r_i): B's column is then 0 but A's row is
    a unit vector, exactly the LoRA init pattern (B = 0, A != 0), whereas the symmetric
    split would zero both factors and freeze that rank forever (zero gradients for both).
  * One SVD per module per round serves every client: the rank-r_i truncation is the
    first r_i singular triplets of the same SVD (a thin exact SVD, torch.linalg.svd in
    the payload dtype, float32 in runs; no randomized or partial SVD).
  * What the loop evaluates, and what adapter/ holds: the global state is the rank-r
    truncation of W, i.e. exactly what a rank-r client receives (and every client's
    rank-r_i start is a prefix of it). We do not merge W into the base: FlexLoRA's
    clients train on W0 + trunc_{r_i}(W), so a merged base would change the algorithm.
    The dense W is formed afresh each round from the sampled clients' products (FedAvg
    in product space replaces, it does not accumulate), so the rank-r state is all that
    must persist between rounds and into checkpoints; the tail of W beyond rank r (it can
    reach sum r_i) is what a rank-r client could not hold either.
  * Round 1: W = 0, whose truncations are all 0; clients start from the standard LoRA
    init instead (the first r_i ranks of the initial state: A kaiming rows, B = 0).
  * Scaling: all clients train with the global alpha / r (W lives in one space for all
    ranks; a per-rank scaling would make the redistributed truncations inconsistent).
  * Modules with min(in, out) < r: the truncation has min(in, out) ranks; the rest of the
    rank-r state is zero-padded.
  * m = `options.clients_per_round` (default max(1, round(0.2 N))); r_i =
    `options.client_ranks`, else ceil(s_i r) from `sketch.ratio`. No server optimizer
    (the paper replaces the global update by the aggregate); `train.server_optimizer`
    is ignored. Non-finite updates are dropped by the loop and p renormalizes over the
    rest; an empty round keeps the state (and costs no SVD).
  * Download is counted as the paper's unicast even though, because the truncations are
    nested, one broadcast of the rank-max(r_i) truncation would serve every client.
"""

from __future__ import annotations

import numpy as np
import torch

from ..sketch import payload_values
from .base import AdapterState, Aggregated, ClientJob, FactorsUpload, RoundConfig, split_payload
from .fslora import FixedSizeSampling
from .hetlora import truncate


def weighted_product(factors: dict[int, tuple[torch.Tensor, torch.Tensor]], weights: dict[int, float]) -> torch.Tensor:
    """W = sum_i w_i B_i A_i for one module (factors[i] = (A_i [r_i, in], B_i [out, r_i]))."""
    ids = sorted(factors)
    w = None
    for i in ids:
        a, b = factors[i]
        term = weights[i] * (b @ a)
        w = term if w is None else w + term
    return w


def server_flops(shape: tuple[int, int], ranks: list[int]) -> float:
    """FLOPs of one module's server step: the weighted products B_i A_i (2 out r_i in each,
    plus the accumulation) and the thin SVD of the out x in sum (4 m n^2 + 22 n^3, m >= n)."""
    n_in, n_out = shape
    m, n = max(n_in, n_out), min(n_in, n_out)
    products = sum(2.0 * n_out * k * n_in + 2.0 * n_out * n_in for k in ranks)
    return products + 4.0 * m * n * n + 22.0 * n ** 3


def svd_truncation(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k approximation of w as (A [k, in], B [out, k]) with B = U_k diag(S_k),
    A = V_k^T; zero-padded beyond min(out, in) ranks."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    m = min(k, s.numel())
    a = torch.zeros(k, w.shape[1], dtype=w.dtype)
    b = torch.zeros(w.shape[0], k, dtype=w.dtype)
    a[:m] = vh[:m]
    b[:, :m] = u[:, :m] * s[:m]
    return a, b


class FlexLoRA(FixedSizeSampling):
    name = "flexlora"
    summary = "FlexLoRA (Bai et al. 2024): full-size average of client products, SVD truncation to each rank"

    def configure_round(self, round_idx: int, state: AdapterState) -> RoundConfig:
        r = self.ctx.rank
        jobs = []
        for i in self.sample(round_idx):
            k = int(self.ranks[i])
            jobs.append(ClientJob(client_id=int(i), start=truncate(state, k), rank_indices=np.arange(k),
                                  scaling=self.ctx.base_scaling, compute_ratio=k / r,
                                  unicast_values=payload_values(self.ctx.module_shapes, k),
                                  upload=FactorsUpload()))  # the factors B_i, A_i: the server needs B_i A_i
        return RoundConfig(jobs=jobs, broadcast_values=0)

    def aggregate(self, round_idx, state, jobs, payloads) -> Aggregated:
        if not payloads:
            return Aggregated(state)
        ids = sorted(payloads)
        weights = self.shares(ids)
        factors = {i: split_payload(payloads[i]) for i in ids}
        ranks = [int(self.ranks[i]) for i in ids]
        flops = sum(server_flops(self.ctx.module_shapes[name], ranks) for name in state)
        new = {}
        for name in state:
            w = weighted_product({i: factors[i][name] for i in ids}, weights)
            a, b = svd_truncation(w, self.ctx.rank)
            new[name] = (a.to(state[name][0].dtype), b.to(state[name][1].dtype))
        return Aggregated(new, server_s=flops / self.ctx.cfg.system.server_flops_hz)
