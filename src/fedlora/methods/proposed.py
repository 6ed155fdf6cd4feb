"""Seed 001's full method (Hou et al., arXiv 2505.23555): Algorithm 1 with q and s planned.

The planner (Algorithm 2, `fedlora.planner`) picks every client's participation
probability q_i and integer rank k_i by minimizing the convergence-time bound P2: a rounds
factor R(q, s) times the Theorem-2 bound on the expected round time under equal-finish
bandwidth allocation. The rounds then run exactly as Algorithm 1 (`manual`): independent
sampling, random sketches, unbiased (p_i / q_i) aggregation.

Where R comes from (`planner.constants`, docs/theory.md sections 5 and 8):
  * online (default) [ours]: no constants up front. The first `planner.online.warmup_rounds`
    rounds (0 by default) run at q = 1 and full rank; the first plan takes every client's
    update as orthogonal to the others' (fedlora.online's prior). From then on the server's
    estimates, all from the updates it receives, give R = (1 - rho) / (1 - rho (1 + nu(q, s))):
    nu the noise-to-signal ratio of a round's update (each client's update energy against
    the mean update's), rho how much of a step's gain its curvature takes back at the run's
    fixed learning rate (from the alignment of consecutive applied updates). A plan made
    while either was still a prior is replaced at the next round; then the method re-plans
    every `replan_every` rounds, or sooner when the current plan's predicted R moved by
    `replan_tolerance` (docs/theory.md section 8.5). q and
    s change only between rounds, so every round's p_i / q_i weights are those its sampling
    used; q never falls below `min_participation`. Two guards on re-plans (docs/theory.md
    section 8.7): the round time prices only the share of the uploads that the equal-finish
    round does not hide behind the stragglers' compute, measured at the plan in force; and a
    re-plan divides no q_i by more than PARTICIPATION_STEP. Online planning uses the relaxed
    Appendix C (docs/theory.md section 4) for every planned method: a refusal in the middle
    of a run would stop it, and the relaxed bound equals the seed's wherever that one plans.
  * pilots, or given numbers: the seed's R with four constants, planned once before round 1.
Every planner call charges `planner.plan_time_s` of server time on the clock (the rounds'
`planning_time_s`); the estimates need nothing but the updates the server receives.
"""

from __future__ import annotations

import numpy as np
import torch

from ..online import OnlineEstimator, RoundObservation, energy_exponent_for
from ..planner import Plan, PlanProblem, plan, upload_exposed_fraction
from .base import compute_model
from .manual import IndependentSketch

# Trust region of an online re-plan [ours]: no q_i falls below 1 / PARTICIPATION_STEP of its
# value in the plan in force. The estimates come from rounds of that plan; far below it they
# are an extrapolation, and the early ones are the most optimistic (docs/theory.md 8.7).
PARTICIPATION_STEP = 2.0


def plan_problem(ctx, constants, *, pin_large_clients: bool = False, min_participation=1e-6,
                 upload_exposed: float = 1.0) -> PlanProblem:
    cfg = ctx.cfg
    return PlanProblem(data_share=ctx.data_share, compute_time_s=ctx.compute_time_s, upload_s_hz=ctx.upload_s_hz,
                       bandwidth_hz=cfg.system.bandwidth_hz, rank=cfg.lora.rank,
                       compute_model=compute_model(cfg), constants=constants,
                       pin_large_clients=pin_large_clients, min_participation=min_participation,
                       download_s=ctx.download_s, upload_exposed_fraction=upload_exposed)


def online_guards(problem: PlanProblem, q_now, s_now, min_participation: float, *,
                  plans_participation: bool = True) -> tuple[np.ndarray | float, float]:
    """(floor on q, exposed share of the uploads) of an online re-plan (docs/theory.md 8.7): the
    exploration floor and the trust region around the plan in force (q_now, s_now), where q is
    planned, and the share of the Theorem-2 upload term the equal-finish round adds there."""
    floor = np.maximum(min_participation, np.asarray(q_now) / PARTICIPATION_STEP) if plans_participation else 1e-6
    return floor, upload_exposed_fraction(q_now, s_now, problem)


def update_gram(jobs, payloads, rank: int) -> np.ndarray:
    """<u_i, u_j> of the participants' updates scattered into the full rank-r factor space,
    in the order of sorted(payloads)."""
    flat = []
    for i in sorted(payloads):
        idx = torch.as_tensor(np.asarray(jobs[i].rank_indices), dtype=torch.long)
        parts = []
        for name in sorted({k.rsplit(".", 1)[0] for k in payloads[i]}):
            da, db = payloads[i][f"{name}.A"].double(), payloads[i][f"{name}.B"].double()
            a = torch.zeros(rank, da.shape[1], dtype=torch.float64).index_copy(0, idx, da)
            b = torch.zeros(db.shape[0], rank, dtype=torch.float64).index_copy(1, idx, db)
            parts += [a.flatten(), b.flatten()]
        flat.append(torch.cat(parts))
    if not flat:
        return np.zeros((0, 0))
    u = torch.stack(flat)
    return (u @ u.T).numpy()


def applied_update(old, new) -> torch.Tensor:
    """What the server added to the adapter this round, flat in float64 (sorted module names,
    A then B)."""
    return torch.cat([torch.cat([(new[k][0].double() - old[k][0].double()).flatten(),
                                 (new[k][1].double() - old[k][1].double()).flatten()]) for k in sorted(old)])


class Proposed(IndependentSketch):
    name = "proposed"
    summary = "seed 001: planner picks q_i and ranks k_i (Algorithm 2), its rounds model learnt online by default"
    needs_constants = True  # the loop resolves planner.constants (online, pilots or numbers) first
    pin_large_clients = False  # the seed's Appendix-C bound for every client (methods/relaxed.py relaxes it)
    plans_participation = True  # q is planned (proposed_s keeps the configured q)

    def __init__(self, ctx):
        self.online = ctx.constants is None
        if self.online:
            oc = ctx.cfg.planner.online
            self.estimator = OnlineEstimator(ctx.data_share, ctx.rank,
                                             energy_exponent=energy_exponent_for(ctx.cfg.train.optimizer),
                                             sketch_exponent=oc.sketch_exponent, smoothing=oc.smoothing)
        self.planned: Plan | None = None
        self._plan_entry: dict = {}
        self.last_plan_round = 0
        self.planned_on_prior = False  # the plan in force was made before rho or the energies were measured
        self.last_update: dict | None = None  # the previous round's applied update and its (q, s)
        self.history: list[dict] = []
        super().__init__(ctx)

    # -- the planner half each variant chooses (proposed_q / proposed_s override these)
    def solve(self, problem: PlanProblem, start) -> Plan:
        """Algorithm 2; a re-plan starts from the current plan and skips the surrogate line
        search (its polish alone reached the same objectives on 95 instances, docs/theory.md 6.1)."""
        return plan(problem, start=start, grid_points=10 if start is None else 0)

    def warmup_participation(self) -> np.ndarray:
        return np.ones(self.ctx.num_clients)

    def in_force(self) -> tuple[np.ndarray, np.ndarray]:
        """(q, s) of the rounds being run: the current plan, else the warm-up setting (also the
        reference point of the first plan)."""
        if self.planned is not None:
            return self.planned.participation_prob, self.planned.sketch_ratio
        return self.warmup_participation(), np.ones(self.ctx.num_clients)

    def choose_q_s(self) -> tuple[np.ndarray, np.ndarray]:
        """The setting of round 1: the warm-up (everybody at full rank), or the first plan
        (from the online prior, or from the constants), charged in round 1."""
        if self.online and self.ctx.cfg.planner.online.warmup_rounds:
            return self.warmup_participation(), np.ones(self.ctx.num_clients)
        self._plan_for_round(1, self.estimator.rounds_model() if self.online else self.ctx.constants)
        return self.planned.participation_prob, self.planned.sketch_ratio

    def run_planner(self, constants, start, *, floor=1e-6, upload_exposed: float = 1.0) -> Plan:
        """self.solve on this run's problem; an infeasible problem is an input error."""
        from ..config import InputError
        from ..planner import AppendixCInfeasible, InfeasiblePlan

        try:
            return self.solve(plan_problem(self.ctx, constants, pin_large_clients=self.pin_large_clients or self.online,
                                           min_participation=floor, upload_exposed=upload_exposed), start)
        except InfeasiblePlan as e:
            hint = ""
            if isinstance(e, AppendixCInfeasible) and not self.pin_large_clients:
                hint = "; methods proposed_relaxed / proposed_s_relaxed plan with the bound relaxed for such clients"
            raise InputError(f"planner.constants / sampling.participation_prob: {e}{hint}") from None

    # -- online re-planning, between rounds only
    def _replan_due(self, t: int) -> bool:
        oc = self.ctx.cfg.planner.online
        if t <= oc.warmup_rounds:
            return False
        if self.planned is None or t - self.last_plan_round >= oc.replan_every:
            return True
        if self.planned_on_prior and self.last_plan_round < t:
            # replace a plan made on a prior as soon as a round measured more (its own predicted
            # R cannot flag it when q is near 1)
            return True
        now = self.estimator.rounds_model().value(self.participation_prob, self.sketch_ratio, self.ctx.data_share)
        return abs(now / self.planned.rounds_factor - 1.0) > oc.replan_tolerance

    def _plan_for_round(self, t: int, constants) -> None:
        """Plan (warm-started from the current plan when there is one) and adopt the plan from
        round t on; the metrics row of round t shows it."""
        start = None if self.planned is None else (self.participation_prob, self.ranks)
        floor, exposed = 1e-6, 1.0
        if self.online:
            q_now, s_now = self.in_force()
            floor, exposed = online_guards(plan_problem(self.ctx, constants, pin_large_clients=True), q_now, s_now,
                                           self.ctx.cfg.planner.online.min_participation,
                                           plans_participation=self.plans_participation)
        self.planned = self.run_planner(constants, start, floor=floor, upload_exposed=exposed)
        self._adopt(self.planned)
        self.last_plan_round = t
        if self.online:
            self.planned_on_prior = self.estimator.rounds == 0 or self.estimator.step_pairs == 0
        self._plan_entry = {"round": t, "participation_prob": self.planned.participation_prob.tolist(),
                            "ranks": self.planned.ranks.tolist(),
                            "expected_participants": float(self.planned.participation_prob.sum()),
                            "rounds_factor": float(self.planned.rounds_factor),
                            "expected_round_time_s": float(self.planned.expected_round_time_s)}
        if self.online:
            self._plan_entry["upload_exposed_fraction"] = exposed
            self._plan_entry["relative_energy"] = self.estimator.relative_energy().tolist()
            self._plan_entry["step_ratio"] = self.estimator.step_ratio()
        self.history.append({k: self._plan_entry[k] for k in ("round", "expected_participants", "rounds_factor",
                                                              "expected_round_time_s")})

    def _adopt(self, pl: Plan) -> None:
        self.participation_prob = np.array(pl.participation_prob, dtype=float)
        self.ranks = np.array(pl.ranks, dtype=int)
        self.sketch_ratio = self.ranks / self.ctx.rank

    def configure_round(self, round_idx, state):
        if self.online and self._replan_due(round_idx):
            self._plan_for_round(round_idx, self.estimator.rounds_model())
        info = {"planning_time_s": 0.0}
        if self.last_plan_round == round_idx:  # planned for this round: its row shows the plan and its cost
            info = {"plan": self._plan_entry, "planning_time_s": self.ctx.cfg.planner.plan_time_s}
        rc = super().configure_round(round_idx, state)
        rc.info.update(info)
        rc.server_s = info["planning_time_s"]  # the planner's time, on the clock
        return rc

    def aggregate(self, round_idx, state, jobs, payloads):
        new = super().aggregate(round_idx, state, jobs, payloads)
        if self.online:
            ids = sorted(payloads)
            self.estimator.observe(RoundObservation(
                clients=np.array(ids, dtype=np.int64), ranks=np.array([len(jobs[i].rank_indices) for i in ids]),
                participation_prob=self.participation_prob[ids], gram=update_gram(jobs, payloads, self.ctx.rank)))
            self._observe_step(applied_update(state, new.state) if ids else None)
        return new

    def _observe_step(self, update: torch.Tensor | None) -> None:
        """Pair this round's applied update with the previous round's (an empty round breaks the
        chain: nothing was applied)."""
        now = None if update is None else {"update": update, "q": self.participation_prob.copy(),
                                           "s": self.sketch_ratio.copy()}  # the plan this update was drawn under
        last = self.last_update
        if now is not None and last is not None:
            norm2 = float(last["update"] @ last["update"])
            if norm2 > 0:
                self.estimator.observe_step(float(last["update"] @ update) / norm2,
                                            self.estimator.noise_to_signal(last["q"], last["s"]))
        self.last_update = now

    # -- what the run folder shows and the checkpoint keeps
    def plan(self) -> dict:
        out = super().plan()
        if self.online:
            oc = self.ctx.cfg.planner.online
            out["constants"] = "online"
            out["online"] = {**oc.model_dump(), "plans": self.history,
                             "note": "rounds before the first plan run at the warm-up setting; "
                                     "each later plan is in its round's metrics row ('plan')"}
        else:
            out["constants"] = self.ctx.constants.to_dict()
        if self.planned is not None:
            out["objective"] = float(self.planned.objective)
            out["rounds_factor"] = float(self.planned.rounds_factor)
            out["planner_iterations"] = int(self.planned.iterations)
        return out

    def state_dict(self) -> dict:
        d = super().state_dict()
        if self.online:
            d["online"] = {"estimator": self.estimator.state_dict(), "last_plan_round": self.last_plan_round,
                           "planned_on_prior": self.planned_on_prior, "last_update": self.last_update,
                           "history": self.history, "plan": None if self.planned is None else self.planned.to_dict()}
        return d

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        if self.online:
            o = d["online"]
            self.estimator.load_state_dict(o["estimator"])
            self.last_plan_round, self.history = int(o["last_plan_round"]), list(o["history"])
            self.planned_on_prior = bool(o["planned_on_prior"])
            lu = o["last_update"]
            self.last_update = None if lu is None else {"update": lu["update"], "q": np.asarray(lu["q"], dtype=float),
                                                        "s": np.asarray(lu["s"], dtype=float)}
            self.planned = None if o["plan"] is None else Plan.from_dict(o["plan"])
            if self.planned is not None:  # else the warm-up setting __init__ chose
                self._adopt(self.planned)
