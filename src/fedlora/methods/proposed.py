"""Seed 001's full method (Hou et al., arXiv 2505.23555): Algorithm 1 with q and s planned.

The planner (Algorithm 2, `fedlora.planner`) picks every client's participation
probability q_i and integer rank k_i by minimizing the convergence-time bound P2:
rounds factor R(q, s) (Theorem 1, constants from the config or from pilot runs) times the
Theorem-2 bound on the expected round time under equal-finish bandwidth allocation. The
rounds then run exactly as Algorithm 1 (`manual`): independent sampling, random sketches,
unbiased (p_i / q_i) aggregation.
"""

from __future__ import annotations

import numpy as np

from ..planner import PlanProblem, plan
from ..system import ComputeModel
from .manual import IndependentSketch


def plan_problem(ctx, pin_large_clients: bool = False) -> PlanProblem:
    cfg = ctx.cfg
    cm = cfg.system.compute_model
    return PlanProblem(data_share=ctx.data_share, compute_time_s=ctx.compute_time_s, upload_s_hz=ctx.upload_s_hz,
                       bandwidth_hz=cfg.system.bandwidth_hz, rank=cfg.lora.rank,
                       compute_model=ComputeModel(cm.kind, cm.fixed_fraction), constants=ctx.constants,
                       pin_large_clients=pin_large_clients)


class Proposed(IndependentSketch):
    name = "proposed"
    summary = "seed 001: planner picks q_i and ranks k_i (Algorithm 2) minimizing the convergence-time bound"
    needs_constants = True
    pin_large_clients = False  # the seed's Appendix-C bound for every client (methods/relaxed.py relaxes it)

    def choose_q_s(self) -> tuple[np.ndarray, np.ndarray]:
        self.planned = self.run_planner(plan)
        return self.planned.participation_prob, self.planned.sketch_ratio

    def run_planner(self, planner, *args):
        """planner(problem, *args) -> Plan; an infeasible problem is an input error."""
        from ..config import InputError
        from ..planner import AppendixCInfeasible, InfeasiblePlan

        try:
            return planner(plan_problem(self.ctx, self.pin_large_clients), *args)
        except InfeasiblePlan as e:
            hint = ""
            if isinstance(e, AppendixCInfeasible) and not self.pin_large_clients:
                hint = "; methods proposed_relaxed / proposed_s_relaxed plan with the bound relaxed for such clients"
            raise InputError(f"planner.constants / sampling.participation_prob: {e}{hint}") from None

    def plan(self) -> dict:
        out = super().plan()
        out["constants"] = self.ctx.constants.to_dict()
        out["objective"] = float(self.planned.objective)
        out["rounds_factor"] = float(self.planned.rounds_factor)
        out["planner_iterations"] = int(self.planned.iterations)
        return out
