"""TSFA, two-stage federated algorithm (seed 002, Kim & Choi, arXiv 2505.00333) --
RECONSTRUCTED from the paper's abstract (no full text, no code); docs/theory.md, section
"Seed 002: SOFT and TSFA (reconstructed)".

Offline stage: fixes the structural parameters. Here it is the config, reported as such:
rank = lora.rank, lambda = options.soft_lambda, V = options.tsfa_v, and the latency budget
L_avg = options.tsfa_latency_budget_s (default: halfway between the expected round latency at
rho = 1/r and at rho = 1, each the mean over 512 seeded draws of the sampled set; always
feasible, unlike "0.8 x the rho = 1 latency", which is below the rho = 1/r latency whenever
compute dominates the round, as in configs/smoke.yaml). The paper derives rank and lambda
from its convergence bound, which the abstract does not give.

Online stage, every round t, with the sampled set S_t known:
  for every k in {1, ..., r} (rho = k / r):
    latency(k) = broadcast time + equal-finish time of S_t with uploads of k components
                 (the equal-finish split is the latency-optimal bandwidth split for a given
                 rho, so that split IS the bandwidth decision);
    penalty(k) = fraction of update energy a top-k cut drops, from the energy profiles the
                 clients reported last round (1 - k / r before any are known);
  pick k minimising V * penalty(k) + Q_t * latency(k), then
  Q_{t+1} = max(Q_t + latency_t - L_avg, 0).
The rest is SOFT. Each client also uploads its energy profile: r float values (the sorted
squared component importances summed over modules), counted in upload bytes.
Per-round metrics: tsfa_queue (Q_t), tsfa_rho, tsfa_latency_s, tsfa_penalty,
tsfa_keep_ranks and tsfa_bandwidth_hz (Hz per participant, in participant order).
"""

from __future__ import annotations

import numpy as np
import torch

from ..soft import LyapunovController, dropped_energy_fraction
from ..streams import STREAM_TSFA_BUDGET
from ..system import equal_finish_allocation, equal_split_allocation
from .base import MethodContext, compute_model
from .soft import Soft

BUDGET_DRAWS = 512
DEFAULT_BUDGET_POSITION = 0.5  # default L_avg: this far from the rho = 1/r to the rho = 1 latency


class Tsfa(Soft):
    name = "tsfa"
    summary = ("seed 002 TSFA, RECONSTRUCTED from the abstract of Kim & Choi (arXiv 2505.00333): SOFT with rho_t and "
               "the bandwidth split chosen per round by drift-plus-penalty under a latency budget")
    uploads_energy_profile = True

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        cfg = ctx.cfg
        r = ctx.rank
        self.grid = np.arange(1, r + 1)  # k; rho = k / r
        cm = compute_model(cfg)
        self.compute_s = np.asarray(cm.time_s(ctx.compute_time_s, np.ones(ctx.num_clients)), dtype=float)
        self.eff = self.upload_bits_full() / np.asarray(ctx.upload_s_hz, dtype=float)  # bits/s/Hz per client
        self.allocate = equal_finish_allocation if cfg.system.allocation == "equal_finish" else equal_split_allocation
        self.bandwidth_hz = float(cfg.system.bandwidth_hz)
        # the server broadcasts the full rank-r state, received at the weakest participant's rate
        self.download_s = np.zeros(ctx.num_clients) if ctx.download_s is None else np.asarray(ctx.download_s)
        self.expected_full_s = self.expected_latency(r)
        self.expected_min_s = self.expected_latency(1)
        budget = cfg.options.tsfa_latency_budget_s
        self.budget_source = "options.tsfa_latency_budget_s"
        if budget is None:
            budget = self.expected_min_s + DEFAULT_BUDGET_POSITION * (self.expected_full_s - self.expected_min_s)
            self.budget_source = (f"default: expected latency at rho = 1/r + {DEFAULT_BUDGET_POSITION} x "
                                  "(expected latency at rho = 1 - that)")
        self.controller = LyapunovController(float(cfg.options.tsfa_v), float(budget))
        self.profile: np.ndarray | None = None  # pooled energy profile of the last non-empty round

    # ------------------------------------------------------------ latency and penalty models

    def round_latency(self, sampled, k: int) -> tuple[float, np.ndarray]:
        """Broadcast + compute/upload time of the sampled clients under the allocation rule
        (equal finish by default) with uploads of k components per module; and the split."""
        ids = np.asarray(sampled, dtype=int)
        if ids.size == 0:
            return 0.0, np.zeros(0)
        download_s = float(self.download_s[ids].max())
        upload_s_hz = self.upload_bits(int(k)) / self.eff[ids]
        t, b = self.allocate(self.compute_s[ids], upload_s_hz, self.bandwidth_hz)
        return download_s + float(t), b

    def expected_latency(self, k: int) -> float:
        """Mean round latency at k over BUDGET_DRAWS seeded draws of the sampled set."""
        rng = self.ctx.rng(STREAM_TSFA_BUDGET)
        q = self.participation_prob
        draws = rng.random((BUDGET_DRAWS, q.size)) < q
        return float(np.mean([self.round_latency(np.flatnonzero(row), k)[0] for row in draws]))

    def penalty(self, k: int) -> float:
        if self.profile is None:
            return 1.0 - k / self.ctx.rank
        return dropped_energy_fraction(self.profile, int(k))

    # ------------------------------------------------------------ Method

    def plan(self) -> dict:
        plan = super().plan()
        for key in ("soft_rho", "keep_ranks", "expected_round_time_s"):
            plan.pop(key)
        budget = self.controller.budget_s
        plan["tsfa"] = {
            "offline_stage": {"source": "config (the paper's bound-based choice is not in the abstract)",
                              "rank": self.ctx.rank, "soft_lambda": self.lam},
            "v": self.controller.v,
            "latency_budget_s": budget,
            "latency_budget_source": self.budget_source,
            "expected_latency_full_rho_s": self.expected_full_s,
            "expected_latency_min_rho_s": self.expected_min_s,
            "budget_feasible": bool(budget >= self.expected_min_s),
            "rho_grid": (self.grid / self.ctx.rank).tolist(),
        }
        return plan

    def round_keep(self, round_idx: int, sampled: np.ndarray) -> tuple[int, dict]:
        options = [self.round_latency(sampled, int(k)) for k in self.grid]
        latencies = np.array([t for t, _ in options])
        penalties = np.array([self.penalty(int(k)) for k in self.grid])
        j = self.controller.choose(penalties, latencies)
        queue = self.controller.queue
        self.controller.update(float(latencies[j]))
        k = int(self.grid[j])
        info = {"tsfa_queue": queue, "tsfa_rho": k / self.ctx.rank, "tsfa_latency_s": float(latencies[j]),
                "tsfa_penalty": float(penalties[j]), "tsfa_keep_ranks": k,
                "tsfa_bandwidth_hz": [float(x) for x in options[j][1]]}
        return k, info

    def aggregate(self, round_idx, state, jobs, payloads):
        profiles = [payloads[i]["tsfa.energy_profile"].double().numpy() for i in sorted(payloads)]
        if profiles:
            self.profile = np.sum(profiles, axis=0)
        return super().aggregate(round_idx, state, jobs, payloads)

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["tsfa"] = {"controller": self.controller.state_dict(),
                     "profile": None if self.profile is None else torch.as_tensor(self.profile)}
        return d

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.controller.load_state_dict(d["tsfa"]["controller"])
        prof = d["tsfa"]["profile"]
        self.profile = None if prof is None else torch.as_tensor(prof).double().numpy()
