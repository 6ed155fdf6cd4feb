"""HetLoRA's truncation with each rank averaged over its holders only: a LATER VARIANT, not
HetLoRA (compare RBLA, arXiv 2408.08699, which aggregates each rank over the clients that
hold it so that zero-padding does not dilute the high ranks).

Clients keep the first r_i ranks as in HetLoRA (methods/hetlora.py: same sampled sets,
same global scaling, fixed ranks: no self-pruning); the server zero-pads every change and
averages each rank j over the sampled clients holding it (r_i > j) with their data shares:

    Delta[j] = sum_{i in S, r_i > j} p_i Delta_i[j] / sum_{i in S, r_i > j} p_i,

then applies the server optimizer. Ranks no sampled client holds stay unchanged. With
ranks [4, 2, 1] and shares .5/.3/.2, ranks 3-4 take client 1's whole change here and
half of its factors under HetLoRA's rule.
"""

from __future__ import annotations

import torch

from .base import AdapterState, Aggregated, split_payload
from .hetlora import HetLoRA


def padded_rank_average(state: AdapterState, deltas: dict[int, dict], weights: dict[int, float]) -> AdapterState:
    """Zero-pad each client's rank-r_i change to rank r and average every rank over the
    clients holding it. deltas[i][module] = (dA [r_i, in], dB [out, r_i]); weights[i] = w_i
    (> 0). Ranks nobody holds get a zero update."""
    out: AdapterState = {}
    for name, (a, b) in state.items():
        dtype = torch.promote_types(a.dtype, torch.float32)
        acc_a, acc_b = torch.zeros(a.shape, dtype=dtype), torch.zeros(b.shape, dtype=dtype)
        wsum = torch.zeros(a.shape[0], dtype=torch.float64)
        for i, delta in deltas.items():
            da, db = delta[name]
            k, w = da.shape[0], float(weights[i])
            acc_a[:k] += w * da.to(dtype)
            acc_b[:, :k] += w * db.to(dtype)
            wsum[:k] += w
        held = wsum > 0
        acc_a[held] /= wsum[held].to(dtype)[:, None]
        acc_b[:, held] /= wsum[held].to(dtype)[None, :]
        out[name] = (acc_a, acc_b)
    return out


class HetLoRARankAverage(HetLoRA):
    name = "hetlora_rank_avg"
    summary = ("later variant of HetLoRA (not the paper's rule; cf. RBLA 2024): first r_i ranks, each rank "
               "averaged over the sampled clients holding it, data-share weights, fixed ranks")

    @property
    def pruning(self) -> bool:
        return False

    def aggregate(self, round_idx, state, jobs, payloads) -> Aggregated:
        if not payloads:
            return Aggregated(state)
        deltas = {i: split_payload(payloads[i]) for i in sorted(payloads)}
        weights = {i: float(self.ctx.data_share[i]) for i in deltas}
        return Aggregated(self.server_opt.apply(state, padded_rank_average(state, deltas, weights)))
