"""HetLoRA: heterogeneous LoRA ranks by truncation (Cho et al., "Heterogeneous LoRA for
Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024).

One global rank-r adapter. Each round m clients are sampled (uniformly without
replacement, the same set as FSLoRA / FLoRA / FlexLoRA for a given seed); client i keeps
the FIRST r_i ranks, A[:r_i, :] and B[:, :r_i], trains them and uploads their changes.
The server zero-pads every update to rank r and averages each rank j over the clients that
hold it (r_i > j):

    Delta[j] = sum_{i in S, r_i > j} w_i Delta_i[j] / sum_{i in S, r_i > j} w_i,

then applies the server optimizer (the plain rule x + Delta with the default sgd, lr 1; it
equals the paper's zero-padded averaging of the trained factors, since every holder of
rank j started from the same global value). Ranks no sampled client holds stay unchanged.

Choices where the paper is vague:
  * Weights (`options.hetlora_weighting`): "uniform" (default) uses the data shares p_i,
    renormalized per rank over that rank's holders. "norm" is the paper's sparsity-
    weighted aggregation: w_i proportional to ||B_i A_i||_F, the Frobenius norm of the
    client's trained LoRA product (its update of that weight matrix: start + change, which
    the server can rebuild from what it sent and what came back), computed per adapted
    module and likewise renormalized per rank. If every norm of a module is zero (nothing
    trained) the data shares are used for that module.
  * Scaling: clients train with the global scaling alpha / r, NOT the sketch's
    (alpha / r) * (r / r_i): truncation to the first r_i ranks is deterministic, not a
    uniformly random sketch, so E[S_i] != I and the r / r_i rescale would not make the
    update unbiased; it would only inflate the low ranks that every client holds. The
    paper's LoRA uses a fixed alpha / r per module and so do we.
  * Ranks r_i: `options.client_ranks`, else ceil(s_i r) from `sketch.ratio` (fixed for the
    run). The paper's optional rank self-pruning is not implemented (its ranks stay fixed).
  * Download: the full rank-r global adapter is broadcast (one broadcast serves every
    client; each keeps its prefix), as for FSLoRA and Algorithm 1.
  * Clients whose update is not finite are dropped by the loop (weights renormalize over
    the rest); an empty round leaves the adapter unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import AdapterState, ClientJob, RoundConfig, split_payload, state_values
from .fslora import FixedSizeSampling


def truncate(state: AdapterState, k: int) -> AdapterState:
    """The first k ranks of every module: A[:k, :], B[:, :k] (fresh tensors)."""
    return {n: (a[:k].clone(), b[:, :k].clone()) for n, (a, b) in state.items()}


def padded_rank_average(state: AdapterState, deltas: dict[int, dict], weights: dict[int, dict[str, float]]
                        ) -> AdapterState:
    """Zero-pad each client's rank-r_i change to rank r and average every rank over the
    clients holding it. deltas[i][module] = (dA [r_i, in], dB [out, r_i]); weights[i][module]
    is w_i (>= 0) for that module. Ranks nobody holds get a zero update."""
    out: AdapterState = {}
    for name, (a, b) in state.items():
        dtype = torch.promote_types(a.dtype, torch.float32)
        acc_a, acc_b = torch.zeros(a.shape, dtype=dtype), torch.zeros(b.shape, dtype=dtype)
        wsum = torch.zeros(a.shape[0], dtype=torch.float64)
        for i, delta in deltas.items():
            da, db = delta[name]
            k, w = da.shape[0], float(weights[i][name])
            acc_a[:k] += w * da.to(dtype)
            acc_b[:, :k] += w * db.to(dtype)
            wsum[:k] += w
        held = wsum > 0
        acc_a[held] /= wsum[held].to(dtype)[:, None]
        acc_b[:, held] /= wsum[held].to(dtype)[None, :]
        out[name] = (acc_a, acc_b)
    return out


class HetLoRA(FixedSizeSampling):
    name = "hetlora"
    summary = "HetLoRA (Cho et al. 2024): clients train the first r_i ranks; zero-padded per-rank averaging"

    def configure_round(self, round_idx: int, state: AdapterState) -> RoundConfig:
        r = self.ctx.rank
        jobs = [ClientJob(client_id=int(i), start=truncate(state, int(self.ranks[i])),
                          rank_indices=np.arange(int(self.ranks[i])), scaling=self.ctx.base_scaling,
                          compute_ratio=int(self.ranks[i]) / r)
                for i in self.sample(round_idx)]
        return RoundConfig(jobs=jobs, broadcast_values=state_values(state))

    def weights(self, jobs, deltas: dict[int, dict]) -> dict[int, dict[str, float]]:
        """w_i per module: data share ("uniform") or ||B_i A_i||_F of the trained product ("norm")."""
        ids = sorted(deltas)
        p = self.ctx.data_share
        modules = list(self.ctx.module_shapes) if not deltas else list(deltas[ids[0]])
        share = {i: {n: float(p[i]) for n in modules} for i in ids}
        if self.ctx.cfg.options.hetlora_weighting != "norm":
            return share
        norms = {}
        for i in ids:
            norms[i] = {}
            for n in modules:
                a0, b0 = jobs[i].start[n]
                da, db = deltas[i][n]
                norms[i][n] = float(torch.linalg.matrix_norm(((b0 + db).double() @ (a0 + da).double())))
        for n in modules:
            if sum(norms[i][n] for i in ids) <= 0.0:
                for i in ids:
                    norms[i][n] = share[i][n]
        return norms

    def aggregate(self, round_idx, state, jobs, payloads) -> AdapterState:
        if not payloads:
            return state
        deltas = {i: split_payload(payloads[i]) for i in sorted(payloads)}
        update = padded_rank_average(state, deltas, self.weights(jobs, deltas))
        return self.server_opt.apply(state, update)
