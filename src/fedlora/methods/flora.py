"""FLoRA / FedStackLoRA: stacking-based heterogeneous LoRA aggregation (Wang et al.,
"FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024).

Each round m sampled clients (uniformly without replacement; the same sets as FSLoRA /
HetLoRA / FlexLoRA for one seed) train a FRESH rank-r_i LoRA on the current base weights
(A_i from a seeded kaiming-uniform init like PEFT's, B_i = 0) and upload the trained
A_i and B_i in full. The server stacks, per module,

    B = [B_1, ..., B_m]   (out x sum r_i),     A = [p_1 A_1; ...; p_m A_m]   (sum r_i x in),

so that B A = sum_i p_i B_i A_i exactly (no cross terms, unlike averaging A and B
separately), merges scaling * B A into the base weights (the loop applies the merge
`aggregate` returns) and the global LoRA restarts
(B = 0). Every client must apply the same merge to its copy of the base, so the stacked
factors (sum_i r_i (in + out) values per module) are broadcast at the start of the next
round: the download grows with sum r_i and is charged on the clock.

Choices where the paper is vague:
  * p_i: data shares renormalized over the clients whose updates arrived (the paper's
    code: dataset sizes L1-normalized over the selected clients).
  * Scaling: every client trains with the global scaling alpha / r, whatever its r_i;
    the merged delta is (alpha / r) * B A. The authors' code likewise keeps the LoRA
    scaling fixed across ranks (lora_alpha = 2 r_i, i.e. scaling 2 for every client, and
    the stacked adapter r * N with lora_alpha * N).
  * m = `options.clients_per_round` (default max(1, round(0.2 N))); r_i =
    `options.client_ranks`, else ceil(s_i r) from `sketch.ratio`.
  * No server optimizer: the stacked merge is the whole server step (the paper's rule);
    `train.server_optimizer` is ignored.
  * Round 1 broadcasts nothing (every client already holds the base model and draws its
    fresh adapter locally); round t > 1 broadcasts round t-1's stacked factors. The fresh
    A_i are drawn from (seed, round, client), so nothing else travels down.
  * The global adapter state the loop evaluates keeps B = 0, so the evaluated model is the
    merged base; the run's adapter/ folds the merged deltas in (Engine.save_peft_adapter).
  * Resume: the engine's merged base deltas are checkpointed by the loop; this method's
    own state is the size of the pending broadcast (plus the unused server optimizer).
  * On Flower (fedlora.flower) each node gets the server's accumulated merged delta with
    every message and loads it (Engine.load_base_delta), so its base equals the server's.
"""

from __future__ import annotations

import math

import torch

from ..streams import STREAM_FRESH_INIT
from .base import AdapterState, Aggregated, ClientJob, FactorsUpload, RoundConfig, split_payload, state_values
from .fslora import FixedSizeSampling



def fresh_adapter(module_shapes: dict[str, tuple[int, int]], k: int, seed: int) -> AdapterState:
    """A rank-k LoRA like PEFT's default: A kaiming-uniform (a = sqrt(5)), B zeros."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, (fan_in, fan_out) in sorted(module_shapes.items()):
        a = torch.empty(k, fan_in)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        out[name] = (a, torch.zeros(fan_out, k))
    return out


def stack_adapters(factors: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]],
                   weights: dict[int, float]) -> AdapterState:
    """Per module: A = [w_1 A_1; ...; w_m A_m], B = [B_1, ..., B_m] (clients in id order),
    so B A = sum_i w_i B_i A_i."""
    ids = sorted(factors)
    names = list(factors[ids[0]])
    return {n: (torch.cat([weights[i] * factors[i][n][0] for i in ids], dim=0),
                torch.cat([factors[i][n][1] for i in ids], dim=1)) for n in names}


class FLoRA(FixedSizeSampling):
    name = "flora"
    summary = "FLoRA (Wang et al. 2024): fresh rank-r_i LoRAs, stacked exactly and merged into the base each round"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.pending_broadcast = 0  # stacked values of the last merge, sent at the next round's start

    def configure_round(self, round_idx: int, state: AdapterState) -> RoundConfig:
        r = self.ctx.rank
        jobs = []
        for i in self.sample(round_idx):
            k = int(self.ranks[i])
            seed = int(self.ctx.rng(STREAM_FRESH_INIT, round_idx, int(i)).integers(2**63))
            # the trained fresh adapter itself, A_i and B_i in full (the server stacks the factors)
            jobs.append(ClientJob(client_id=int(i), start=fresh_adapter(self.ctx.module_shapes, k, seed),
                                  scaling=self.ctx.base_scaling, compute_ratio=k / r, upload=FactorsUpload()))
        return RoundConfig(jobs=jobs, broadcast_values=self.pending_broadcast,
                           info={"stacked_download_values": self.pending_broadcast})

    def aggregate(self, round_idx, state, jobs, payloads) -> Aggregated:
        if not payloads:
            self.pending_broadcast = 0
            return Aggregated(state)
        ids = sorted(payloads)
        weights = self.shares(ids)
        stacked = stack_adapters({i: split_payload(payloads[i]) for i in ids}, weights)
        s = self.ctx.base_scaling
        self.pending_broadcast = state_values(stacked)
        restarted = {n: (a.clone(), torch.zeros_like(b)) for n, (a, b) in state.items()}  # global LoRA restarts
        return Aggregated(restarted, base_merge={n: s * (b.double() @ a.double()).float()
                                                 for n, (a, b) in stacked.items()})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pending_broadcast": int(self.pending_broadcast)}

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.pending_broadcast = int(d["pending_broadcast"])
