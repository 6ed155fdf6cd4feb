"""The proposed method end to end: plan command, planned run (online and from constants),
re-planning between rounds, resume, pilot constant estimation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import metric_rows
from fedlora import loop, pilot, simulate
from fedlora import setup as setup_mod
from fedlora.config import InputError, load_config
from fedlora.online import STEP_RATIO_PRIOR, fixed_step_model
from fedlora.methods.proposed import PARTICIPATION_STEP, plan_problem
from fedlora.methods import get_method
from fedlora.planner import BoundConstants, plan, plan_participation, plan_ranks, upload_exposed_fraction

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
CONSTANTS = "planner.constants={alpha: 2.0, beta: 1.0, gamma: 0.05, delta: 0.5}"


@pytest.fixture(scope="module")
def setup():
    return setup_mod.build_setup(load_config(SMOKE, [CONSTANTS, "method=proposed", "train.rounds=2"]))


def test_run_plans_then_trains_with_the_plan(setup, tmp_path):
    out = tmp_path / "p"
    simulate.run(setup.cfg, out, setup=setup, progress=False)
    written = json.loads((out / "plan.json").read_text())
    ctx = setup.method_context()
    expected = plan(plan_problem(ctx, ctx.constants))
    assert written["constants"] == {"alpha": 2.0, "beta": 1.0, "gamma": 0.05, "delta": 0.5}
    assert np.allclose(written["participation_prob"], expected.participation_prob)
    assert written["ranks"] == expected.ranks.tolist()
    assert written["objective"] == pytest.approx(expected.objective)
    # the rounds use the planned ranks: each participant uploads k_i ranks of every module
    per_rank = sum(i + o for i, o in setup.engine.module_shapes.values()) * 4
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()[1:]):
        assert row["upload_bytes"] == sum(written["ranks"][i] * per_rank for i in row["participants"])


def test_ablations_plan_one_half_each(setup):
    ctx = setup.method_context()
    ctx.constants = BoundConstants(2.0, 1.0, 0.05, 0.5)
    q_only = get_method("proposed_q")(ctx)
    q, s = q_only.choose_q_s()
    assert np.all(s == 1.0)
    np.testing.assert_array_equal(q, plan_participation(plan_problem(ctx, ctx.constants)).participation_prob)
    s_only = get_method("proposed_s")(ctx)
    q, s = s_only.choose_q_s()
    fixed = float(setup.cfg.sampling.participation_prob)
    assert np.all(q == fixed)
    np.testing.assert_array_equal(s, plan_ranks(plan_problem(ctx, ctx.constants), np.full(len(q), fixed)).sketch_ratio)


def test_relaxed_methods_plan_where_the_seeds_planner_refuses(setup):
    ctx = setup.method_context()
    p = np.asarray(ctx.data_share)
    big, n = int(np.argmax(p)), p.size
    gamma = 1.05 / (n * p[big] ** 2)  # the largest client's Appendix-C bound: 1.05 at q = s = 1
    fixed = float(setup.cfg.sampling.participation_prob)
    assert gamma * np.sum(p * p) / fixed < 1  # the exact condition holds even at the fixed q
    ctx.constants = BoundConstants(2.0, 1.0, float(gamma), 0.5)
    for name in ("proposed", "proposed_s"):
        with pytest.raises(InputError, match="Appendix-C.*proposed_relaxed / proposed_s_relaxed"):
            get_method(name)(ctx).choose_q_s()
    q, s = get_method("proposed_relaxed")(ctx).choose_q_s()
    assert q[big] == 1.0 and s[big] == 1.0
    np.testing.assert_array_equal(q, plan(plan_problem(ctx, ctx.constants, pin_large_clients=True)).participation_prob)
    q, s = get_method("proposed_s_relaxed")(ctx).choose_q_s()
    assert np.all(q == fixed) and s[big] == 1.0
    np.testing.assert_array_equal(s, plan_ranks(plan_problem(ctx, ctx.constants, pin_large_clients=True),
                                                np.full(n, fixed)).sketch_ratio)


def test_plan_command_json(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "fedlora.cli", "plan", str(SMOKE), "--json", CONSTANTS],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    for key in ("participation_prob", "sketch_ratio", "ranks", "bandwidth_hz", "compute_model",
                "expected_round_time_s", "constants", "objective", "clients"):
        assert key in out, key
    assert len(out["clients"]) == 4 and {"id", "data_share", "compute_time_s"} <= set(out["clients"][0])
    q, k = np.array(out["participation_prob"]), np.array(out["ranks"])
    p = np.array([c["data_share"] for c in out["clients"]])
    c = out["constants"]
    assert np.all(q > 0) and np.all(q <= 1) and np.all((k >= 1) & (k <= 4))
    assert np.all(q >= len(p) * c["gamma"] * p ** 2 / (c["beta"] * k / 4) - 1e-9)  # Appendix C bound


def test_plan_command_without_planner_keys_shows_the_online_start():
    from typer.testing import CliRunner

    from fedlora.cli import app

    res = CliRunner().invoke(app, ["plan", str(SMOKE)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "online planning: round 1 runs this plan" in text and "refined every 5 rounds" in text
    res = CliRunner().invoke(app, ["plan", str(SMOKE), "--json"])
    out = json.loads(res.output)
    assert out["constants"] == "online" and out["pre_run_planning_s"] == 0.0
    assert [h["round"] for h in out["online"]["plans"]] == [1]
    assert min(out["participation_prob"]) >= 0.05


def test_pilots_without_a_target_are_bad_input(tmp_path):
    for switch in ("planner.constants=pilots", "planner.pilot=true"):  # the second: older configs
        cfg = load_config(SMOKE, ["method=proposed", switch])
        with pytest.raises(InputError, match="target_loss or target_accuracy"):
            simulate.run(cfg, tmp_path / "x", progress=False)
        assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def online_setup():
    """proposed on the smoke config with no planner keys (online planning), re-planning on schedule
    only (every 2 rounds; the tolerance trigger switched off)."""
    return setup_mod.build_setup(load_config(SMOKE, ["method=proposed", "train.rounds=5", "lora.layers=[5]",
                                                   "planner.online.replan_every=2",
                                                   "planner.online.replan_tolerance=1e9"]))


def test_online_planning_out_of_the_box_and_resume_after_a_kill(online_setup, tmp_path, killed_then_resumed):
    """No planner keys: the run plans round 1 on the priors, replaces that plan in round 2 (update
    energies measured) and in round 3 (the first pair of applied updates measured the step), then
    re-plans every 2 rounds; it charges each plan on the clock, and a run killed in round 4
    (between plans, with the last update kept for the next pair) resumes to the same numbers."""
    cfg = online_setup.cfg
    full = tmp_path / "full"
    result = simulate.run(cfg, full, setup=online_setup, progress=False)
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    plans = [r["plan"] for r in rows[1:] if "plan" in r]
    assert [p["round"] for p in plans] == [1, 2, 3, 5]
    # round 1 is planned on the prior (orthogonal updates: omega = 1 / sum p^2), later rounds on measurements
    share = np.asarray(online_setup.data_share)
    np.testing.assert_allclose(plans[0]["relative_energy"], 1 / np.sum(share ** 2))
    assert not np.allclose(plans[1]["relative_energy"], plans[0]["relative_energy"])
    assert plans[0]["step_ratio"] == plans[1]["step_ratio"] == STEP_RATIO_PRIOR != plans[2]["step_ratio"]
    floor = cfg.planner.online.min_participation
    for r in rows[1:]:
        planned = "plan" in r
        assert r["planning_time_s"] == (cfg.planner.plan_time_s if planned else 0.0)
        assert r["server_time_s"] == pytest.approx(r["planning_time_s"])
        if planned:
            q = np.array(r["plan"]["participation_prob"])
            assert np.all(q >= floor * (1 - 1e-12)) and np.all(q <= 1)
            assert 0.0 <= r["plan"]["upload_exposed_fraction"] <= 1.0
    assert result["planning_time_s"] == pytest.approx(4 * cfg.planner.plan_time_s)
    assert result["pre_run_planning_s"] == 0.0
    written = json.loads((full / "plan.json").read_text())
    assert written["constants"] == "online" and written["participation_prob"] == plans[-1]["participation_prob"]
    assert [h["round"] for h in written["online"]["plans"]] == [1, 2, 3, 5]

    killed = tmp_path / "killed"
    assert [r["round"] for r in killed_then_resumed(cfg, killed, online_setup, at_round=4)] == [0, 1, 2, 3]
    assert metric_rows(killed) == metric_rows(full)
    assert json.loads((killed / "plan.json").read_text()) == written


def test_a_replan_stays_in_the_trust_region_and_prices_the_exposed_uploads(online_setup):
    """Estimates that make noise nearly free pull an unguarded plan below half of the plan in
    force; the online re-plan keeps every q_i >= q_i / PARTICIPATION_STEP and still moves. Each
    plan prices the uploads with the exposed share measured at the plan in force (the first
    plan: at the warm-up setting, q = s = 1)."""
    ctx = online_setup.method_context()
    method = get_method("proposed")(ctx)  # round 1 planned on the priors
    n = ctx.num_clients
    first = method.history[0]
    assert method._plan_entry["upload_exposed_fraction"] == upload_exposed_fraction(
        np.ones(n), np.ones(n), plan_problem(ctx, method.estimator.rounds_model(), pin_large_clients=True))
    q1, s1 = method.participation_prob.copy(), method.sketch_ratio.copy()
    cheap = fixed_step_model(ctx.data_share, np.full(n, 0.01), 0.02)
    unguarded = method.run_planner(cheap, None, floor=online_setup.cfg.planner.online.min_participation)
    assert np.any(unguarded.participation_prob < q1 / PARTICIPATION_STEP * 0.9)
    method._plan_for_round(2, cheap)
    q2 = method.participation_prob
    assert np.all(q2 >= q1 / PARTICIPATION_STEP * (1 - 1e-12)) and np.any(q2 < 0.9 * q1)
    assert method._plan_entry["upload_exposed_fraction"] == upload_exposed_fraction(
        q1, s1, plan_problem(ctx, cheap, pin_large_clients=True))
    assert first["round"] == 1 and method.history[-1]["round"] == 2


def test_replanning_keeps_every_round_unbiased(online_setup, monkeypatch):
    """Fixed synthetic client updates and a re-plan before every round that swaps q between two
    very different plans: the mean aggregated update over many rounds is sum_i p_i Delta_i,
    i.e. each round's weights p_i / q_i are those its sampling used (weights from another
    round's plan would be off by a factor up to 4.5)."""
    import torch

    from fedlora.planner import Plan

    ctx = online_setup.method_context()
    method = get_method("proposed")(ctx)
    n, r = ctx.num_clients, ctx.rank
    plans = [np.full(n, 0.2), np.full(n, 0.9)]
    plans[0][0], plans[1][0] = 0.9, 0.2

    def alternate(problem, start):
        q = plans[len(method.history) % 2]
        return Plan(participation_prob=q, ranks=np.array([r, r // 2, 1, r]), sketch_ratio=np.array([1, .5, 1 / r, 1]),
                    objective=1.0, expected_round_time_s=1.0, rounds_factor=1.0, iterations=1)

    method.solve = alternate
    method._replan_due = lambda t: True  # a new plan before every round
    # the plans are given: the exposed-upload share's Monte Carlo (tested on its own) would only
    # cost time here, 1,000 times
    monkeypatch.setattr("fedlora.methods.proposed.upload_exposed_fraction", lambda *a, **k: 1.0)
    state = {n_: (a.double() * 0, b.double() * 0) for n_, (a, b) in online_setup.engine.init_state(0).items()}
    gen = torch.Generator().manual_seed(0)
    delta = [{n_: (torch.randn(a.shape, generator=gen, dtype=torch.float64),
                   torch.randn(b.shape, generator=gen, dtype=torch.float64)) for n_, (a, b) in state.items()}
             for _ in range(n)]
    total = {n_: (torch.zeros_like(a), torch.zeros_like(b)) for n_, (a, b) in state.items()}
    rounds, used = 1000, set()
    for t in range(1, rounds + 1):
        rc = method.configure_round(t, state)
        used.add(tuple(method.participation_prob))
        jobs = {j.client_id: j for j in rc.jobs}
        payloads = {}
        for i, job in jobs.items():  # the ideal sketch: kept ranks scaled by r / k
            idx = torch.as_tensor(job.rank_indices)
            k = len(job.rank_indices)
            payloads[i] = {}
            for n_, (a, b) in delta[i].items():
                payloads[i][f"{n_}.A"] = a[idx] * r / k
                payloads[i][f"{n_}.B"] = b[:, idx] * r / k
        new = method.aggregate(t, state, jobs, payloads).state
        for n_ in total:
            total[n_] = (total[n_][0] + new[n_][0] - state[n_][0], total[n_][1] + new[n_][1] - state[n_][1])
    assert {tuple(q) for q in plans} <= used and len(method.history) >= rounds  # re-planned every round
    p = torch.as_tensor(ctx.data_share)
    for n_ in total:
        for j in (0, 1):
            expect = sum(p[i] * delta[i][n_][j] for i in range(n))
            assert float((total[n_][j] / rounds - expect).norm() / expect.norm()) < 0.1


def test_pilot_constants_of_another_config_are_refused(setup, tmp_path, monkeypatch):
    """constants.json is reused only by the config it was made for; it records the pilots'
    simulated time, which the run counts as planning before round 1."""
    calls = []

    def fake_run(cfg, out, **kw):
        calls.append(out)
        p2 = float(np.sum(setup.data_share ** 2))
        q, s = cfg.sampling.participation_prob, cfg.sketch.ratio
        return {"stop_reason": "stop_when", "rounds": (3 + 0.7 * p2 / q) / (1 - 0.2 * p2 / (q * s)),
                "sim_time_s": 100.0}

    monkeypatch.setattr(loop, "run", fake_run)  # the pilots run through the loop
    cfg = load_config(SMOKE, ["planner.constants=pilots", "planner.pilot={target_loss: 1.0}"])
    consts, cost = pilot.resolve_constants(cfg, tmp_path, setup=setup, progress=False)
    assert cost == pytest.approx(4 * 100.0) and len(calls) == 4
    again, cost2 = pilot.resolve_constants(cfg, tmp_path, setup=setup, progress=False)  # reused, not re-run
    assert again == consts and cost2 == cost and len(calls) == 4
    other = load_config(SMOKE, ["planner.constants=pilots", "planner.pilot={target_loss: 1.0}", "train.lr=0.01"])
    with pytest.raises(InputError, match="pilot constants of another config"):
        pilot.resolve_constants(other, tmp_path, setup=setup, progress=False)
    # the planned method itself does not change which pilots fit
    same = load_config(SMOKE, ["planner.constants=pilots", "planner.pilot={target_loss: 1.0}", "method=proposed_q"])
    assert pilot.resolve_constants(same, tmp_path, setup=setup, progress=False)[0] == consts
