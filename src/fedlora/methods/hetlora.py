"""HetLoRA: heterogeneous LoRA ranks by truncation (Cho et al., "Heterogeneous LoRA for
Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024).

One global rank-r adapter. Each round m clients are sampled (uniformly without
replacement, the same set as FSLoRA / FLoRA / FlexLoRA for a given seed); client i keeps
the FIRST r_i ranks, A[:r_i, :] and B[:, :r_i], trains them (rank self-pruning below) and
uploads them. The server zero-pads every client's trained factors to rank r and averages
them with weights normalised over ALL the round's sampled clients:

    A <- sum_{i in S} w_i pad_r(A_i),   B <- sum_{i in S} w_i pad_r(B_i),   sum_{i in S} w_i = 1,

so a rank held by few sampled clients is pulled towards zero (the paper's rule; averaging
each rank over only its holders is a later idea, methods/hetlora_rank_avg.py). As an
update of the global factors (what the server optimizer applies; lr 1 sgd reproduces the
rule exactly), rank j moves by -(1 - W_j) x[j] + sum_{i holds j} w_i Delta_i[j], with
W_j = sum_{i holds j} w_i.

  * Weights (`options.hetlora_weighting`): "norm" (default, the paper's sparsity-weighted
    aggregation) w_i proportional to ||B_i A_i||_F, the Frobenius norm of the client's
    trained LoRA product, per adapted module; "data_share": p_i. If every norm of a module
    is zero the data shares are used for that module.
  * Rank self-pruning (`options.hetlora_pruning`, on by default): the client adds
    lambda * sum_modules ||B[:, t:]||_F ||A[t:, :]||_F to its loss, t = floor(gamma r_i) (the
    tail ranks; gamma = `hetlora_decay`, lambda = `hetlora_prune_lambda`); if that tail norm
    product is smaller after training than in the factors it received, it prunes to
    r_i <- max(`hetlora_min_rank`, floor(gamma r_i)), uploads only the kept ranks and keeps
    that rank from then on (the server reads it from the upload's size). The paper's rule;
    its gamma and lambda for our r = 8 are not given, we take gamma = 0.99 (one rank at a
    time at small r) and lambda = 0.01.
  * Scaling: clients train with the global scaling alpha / r: truncation is deterministic,
    not a random sketch, so no r / r_i rescale.
  * Ranks r_i at the start: `options.client_ranks`, else ceil(s_i r) from `sketch.ratio`.
  * Download: the full rank-r global adapter is broadcast (one broadcast serves every
    client; each keeps its prefix).
  * Clients whose update is not finite are dropped by the loop (weights renormalise over
    the rest); an empty round leaves the adapter unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import (AdapterState, Aggregated, ClientJob, DeltaUpload, Payload, RoundConfig, factor_shapes,
                   split_payload, state_values)
from .fslora import FixedSizeSampling


def truncate(state: AdapterState, k: int) -> AdapterState:
    """The first k ranks of every module: A[:k, :], B[:, :k] (fresh tensors)."""
    return {n: (a[:k].clone(), b[:, :k].clone()) for n, (a, b) in state.items()}


def tail_start(k: int, decay: float) -> int:
    """t = floor(gamma k): ranks t..k-1 are the tail the regularizer shrinks and pruning cuts."""
    return int(math.floor(decay * k))


def tail_norm_product(state: AdapterState, decay: float) -> torch.Tensor:
    """sum over modules of ||B[:, t:]||_F ||A[t:, :]||_F, t = floor(gamma k)."""
    total = torch.zeros((), dtype=torch.float64)
    for a, b in state.values():
        t = tail_start(a.shape[0], decay)
        total = total + torch.linalg.norm(b[:, t:]) * torch.linalg.norm(a[t:])
    return total


@dataclass(frozen=True)
class TailRegularizer:
    """HetLoRA's client regularizer lambda * tail norm product of the live factors (plain
    numbers, so that Flower can send it and rebuild it)."""

    kind: ClassVar[str] = "hetlora-tail"
    lam: float
    decay: float

    def __call__(self, state: AdapterState) -> torch.Tensor:
        return self.lam * tail_norm_product(state, self.decay)


def pruned_rank(k: int, decay: float, min_rank: int) -> int:
    return max(min(min_rank, k), tail_start(k, decay))


@dataclass(frozen=True)
class PruningUpload:
    """HetLoRA's self-pruning client: the change of its k ranks, or of the first
    pruned_rank(k) only when training shrank the tail norm product (the client keeps that rank)."""

    kind: ClassVar[str] = "hetlora-prune"
    decay: float
    min_rank: int

    def payload(self, start: AdapterState, trained: AdapterState) -> Payload:
        payload = DeltaUpload().payload(start, trained)
        k = next(iter(start.values()))[0].shape[0]
        keep = pruned_rank(k, self.decay, self.min_rank)
        if keep == k or not bool(tail_norm_product(trained, self.decay) < tail_norm_product(start, self.decay)):
            return payload
        return {key: (v[:keep] if key.endswith(".A") else v[:, :keep]) for key, v in payload.items()}

    def shapes(self, start: AdapterState) -> list[dict[str, tuple[int, ...]]]:
        k = next(iter(start.values()))[0].shape[0]
        return [factor_shapes(start), factor_shapes(start, pruned_rank(k, self.decay, self.min_rank))]


def zero_padded_average(state: AdapterState, trained: dict[int, AdapterState],
                        weights: dict[int, dict[str, float]]) -> AdapterState:
    """sum_i w_i pad_r(trained_i) - state per module: the paper's zero-padded average as an
    update of the global factors. trained[i][module] = (A_i [r_i, in], B_i [out, r_i]);
    weights[i][module] = w_i, normalised here over the clients given."""
    out: AdapterState = {}
    for name, (a, b) in state.items():
        dtype = torch.promote_types(a.dtype, torch.float32)
        total = sum(float(weights[i][name]) for i in trained)
        acc_a, acc_b = -a.to(dtype), -b.to(dtype)
        for i, factors in trained.items():
            ta, tb = factors[name]
            k, w = ta.shape[0], float(weights[i][name]) / total
            acc_a[:k] += w * ta.to(dtype)
            acc_b[:, :k] += w * tb.to(dtype)
        out[name] = (acc_a, acc_b)
    return out


def sparsity_weights(trained: dict[int, AdapterState], data_share) -> dict[int, dict[str, float]]:
    """w_i per module proportional to ||B_i A_i||_F (data shares for a module whose norms are all 0)."""
    ids = sorted(trained)
    modules = list(trained[ids[0]]) if ids else []
    w = {i: {n: float(torch.linalg.matrix_norm(trained[i][n][1].double() @ trained[i][n][0].double()))
             for n in modules} for i in ids}
    for n in modules:
        if sum(w[i][n] for i in ids) <= 0.0:
            for i in ids:
                w[i][n] = float(data_share[i])
    return w


class HetLoRA(FixedSizeSampling):
    name = "hetlora"
    summary = ("HetLoRA (Cho et al. 2024): clients train the first r_i ranks and self-prune; zero-padded, "
               "sparsity-weighted average over the sampled clients")

    @property
    def pruning(self) -> bool:
        return bool(self.ctx.cfg.options.hetlora_pruning)

    def regularizer(self) -> TailRegularizer | None:
        o = self.ctx.cfg.options
        return TailRegularizer(float(o.hetlora_prune_lambda), float(o.hetlora_decay)) \
            if self.pruning and o.hetlora_prune_lambda > 0 else None

    def upload(self):
        o = self.ctx.cfg.options
        return PruningUpload(float(o.hetlora_decay), int(o.hetlora_min_rank)) if self.pruning else DeltaUpload()

    def configure_round(self, round_idx: int, state: AdapterState) -> RoundConfig:
        r, reg, upload = self.ctx.rank, self.regularizer(), self.upload()
        jobs = [ClientJob(client_id=int(i), start=truncate(state, int(self.ranks[i])),
                          rank_indices=np.arange(int(self.ranks[i])), scaling=self.ctx.base_scaling,
                          compute_ratio=int(self.ranks[i]) / r, regularizer=reg, upload=upload)
                for i in self.sample(round_idx)]
        return RoundConfig(jobs=jobs, broadcast_values=state_values(state))

    def aggregate(self, round_idx, state, jobs, payloads) -> Aggregated:
        if not payloads:
            return Aggregated(state)
        trained = {}
        for i in sorted(payloads):
            delta = split_payload(payloads[i])
            trained[i] = {n: (jobs[i].start[n][0][:da.shape[0]] + da, jobs[i].start[n][1][:, :db.shape[1]] + db)
                          for n, (da, db) in delta.items()}
            self.ranks[i] = next(iter(delta.values()))[0].shape[0]  # a pruned client keeps its new rank
        if self.ctx.cfg.options.hetlora_weighting == "norm":
            weights = sparsity_weights(trained, self.ctx.data_share)
        else:
            weights = {i: {n: float(self.ctx.data_share[i]) for n in state} for i in trained}
        return Aggregated(self.server_opt.apply(state, zero_padded_average(state, trained, weights)))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ranks": [int(k) for k in self.ranks]}

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.ranks = np.asarray(d["ranks"], dtype=int)
