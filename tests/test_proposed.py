"""The proposed method end to end: plan command, planned run (online and from constants),
re-planning between rounds, resume, pilot constant estimation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedlora import pilot, simulate
from fedlora.config import InputError, load_config
from fedlora.methods.proposed import plan_problem
from fedlora.methods import get_method
from fedlora.planner import BoundConstants, plan, plan_participation, plan_ranks

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
CONSTANTS = "planner.constants={alpha: 2.0, beta: 1.0, gamma: 0.05, delta: 0.5}"


@pytest.fixture(scope="module")
def setup():
    return simulate.build_setup(load_config(SMOKE, [CONSTANTS, "method=proposed", "train.rounds=2"]))


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


def test_pilots_without_a_target_are_bad_input(tmp_path):
    for switch in ("planner.constants=pilots", "planner.pilot=true"):  # the second: older configs
        cfg = load_config(SMOKE, ["method=proposed", switch])
        with pytest.raises(InputError, match="target_loss or target_accuracy"):
            simulate.run(cfg, tmp_path / "x", progress=False)
        assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def online_setup():
    """proposed on the smoke config with no planner keys (online planning), re-planning every round."""
    return simulate.build_setup(load_config(SMOKE, ["method=proposed", "train.rounds=4",
                                                   "planner.online.replan_every=1"]))


def test_online_planning_out_of_the_box_and_resume_after_a_kill(online_setup, tmp_path, monkeypatch):
    """No planner keys: the run plans from round 1, re-plans every round from what it measured,
    charges each plan on the clock, and a run killed in round 3 resumes to the same numbers."""
    cfg = online_setup.cfg
    full = tmp_path / "full"
    result = simulate.run(cfg, full, setup=online_setup, progress=False)
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    plans = [r["plan"] for r in rows[1:] if "plan" in r]
    assert [p["round"] for p in plans] == [1, 2, 3, 4]
    assert len({tuple(p["participation_prob"]) for p in plans}) > 1  # the measurements moved the plan
    floor = cfg.planner.online.min_participation
    for r in rows[1:]:
        assert r["planning_time_s"] == cfg.planner.plan_time_s
        assert r["server_time_s"] == pytest.approx(cfg.planner.plan_time_s)
        q = np.array(r["plan"]["participation_prob"])
        assert np.all(q >= floor * (1 - 1e-12)) and np.all(q <= 1)
    assert result["planning_time_s"] == pytest.approx(4 * cfg.planner.plan_time_s)
    assert result["pre_run_planning_s"] == 0.0
    written = json.loads((full / "plan.json").read_text())
    assert written["constants"] == "online" and written["participation_prob"] == plans[-1]["participation_prob"]
    assert [h["round"] for h in written["online"]["plans"]] == [1, 2, 3, 4]

    killed = tmp_path / "killed"
    real = simulate.client_batches

    def crash_in_round_3(s, client, round_idx):
        if round_idx == 3:
            raise KeyboardInterrupt("killed")
        return real(s, client, round_idx)

    monkeypatch.setattr(simulate, "client_batches", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        simulate.run(cfg, killed, setup=online_setup, progress=False)
    monkeypatch.setattr(simulate, "client_batches", real)
    simulate.run(cfg, killed, setup=online_setup, progress=False, resume=True)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "cpu_time_s"} for r in rs]  # noqa: E731
    assert strip([json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]) == strip(rows)
    assert json.loads((killed / "plan.json").read_text()) == written


def test_replanning_keeps_every_round_unbiased(online_setup):
    """Fixed synthetic client updates, a re-plan before every round (q changes from round to
    round): the mean aggregated update over many rounds is sum_i p_i Delta_i, i.e. each round's
    weights p_i / q_i are those its sampling used (a re-plan between sampling and aggregation
    would bias it)."""
    import torch

    ctx = online_setup.method_context()
    method = get_method("proposed")(ctx)
    state = online_setup.engine.init_state(0)
    gen = torch.Generator().manual_seed(0)
    delta = [{n: (torch.randn(a.shape, generator=gen, dtype=torch.float64),
                  torch.randn(b.shape, generator=gen, dtype=torch.float64)) for n, (a, b) in state.items()}
             for _ in range(ctx.num_clients)]
    state = {n: (a.double() * 0, b.double() * 0) for n, (a, b) in state.items()}
    r = ctx.rank
    total = {n: (torch.zeros_like(a), torch.zeros_like(b)) for n, (a, b) in state.items()}
    qs, rounds = set(), 3000
    for t in range(1, rounds + 1):
        rc = method.configure_round(t, state)
        qs.add(tuple(np.round(method.participation_prob, 9)))
        jobs = {j.client_id: j for j in rc.jobs}
        payloads = {}
        for i, job in jobs.items():  # the ideal sketch: kept ranks scaled by r / k
            idx = torch.as_tensor(job.rank_indices)
            k = len(job.rank_indices)
            payloads[i] = {}
            for n, (a, b) in delta[i].items():
                payloads[i][f"{n}.A"] = a[idx] * r / k
                payloads[i][f"{n}.B"] = b[:, idx] * r / k
        new = method.aggregate(t, state, jobs, payloads)
        for n in total:
            total[n] = (total[n][0] + new[n][0] - state[n][0], total[n][1] + new[n][1] - state[n][1])
    assert len(qs) > 5  # q really changed between rounds
    p = torch.as_tensor(ctx.data_share)
    for n in total:
        for j in (0, 1):
            expect = sum(p[i] * delta[i][n][j] for i in range(ctx.num_clients))
            got = total[n][j] / rounds
            assert float((got - expect).norm() / expect.norm()) < 0.1


def test_pilot_wiring_recovers_constants(setup, tmp_path, monkeypatch):
    """Pilot runs replaced by the model's own round counts: the four settings of the config
    go through X, Y and the SVD and come back as the constants that made them."""
    truth = BoundConstants(alpha=3.0, beta=1.0, gamma=0.2, delta=0.7)
    p2 = float(np.sum(setup.data_share ** 2))
    seen = []

    def fake_run(cfg, out, **kw):
        q, s = cfg.sampling.participation_prob, cfg.sketch.ratio
        seen.append((q, s, cfg.method))
        x, y = p2 / q, p2 / (q * s)
        rounds = (truth.alpha + truth.delta * x) / (truth.beta - truth.gamma * y)
        return {"stop_reason": "stop_when", "rounds": rounds}

    monkeypatch.setattr(simulate, "run", fake_run)
    cfg = load_config(SMOKE, ["planner.pilot={target_loss: 1.0}"])
    report = pilot.run_pilots(cfg, tmp_path / "pilot", setup=setup, progress=False, log=lambda *_: None)
    assert [(q, s) for q, s, _ in seen] == [tuple(x) for x in cfg.planner.pilot.settings]
    assert {m for *_, m in seen} == {"manual"}
    est = report["constants"]
    for name in ("alpha", "gamma", "delta"):
        assert est[name] == pytest.approx(getattr(truth, name), rel=1e-6)
    assert json.loads((tmp_path / "pilot" / "constants.json").read_text())["constants"] == est


def test_pilot_rejects_contradicting_rounds(setup, tmp_path, monkeypatch):
    def fake_run(cfg, out, **kw):  # more rounds with more participation: contradicts the model
        return {"stop_reason": "stop_when", "rounds": 5 + 20 * cfg.sampling.participation_prob * cfg.sketch.ratio}

    monkeypatch.setattr(simulate, "run", fake_run)
    cfg = load_config(SMOKE, ["planner.pilot={target_loss: 1.0}"])
    with pytest.raises(InputError, match="planner.pilot"):
        pilot.run_pilots(cfg, tmp_path / "pilot", setup=setup, progress=False, log=lambda *_: None)


def test_real_pilot_run_stops_at_the_loss_target(setup, tmp_path):
    """One real pilot setting through the loop: it stops when the smoothed train loss is at
    the target and the rounds it reports are that round."""
    cfg = load_config(SMOKE, ["train.rounds=6", "eval.every=6"])
    rows_seen = []

    def stop(rows):
        rows_seen.append(len(rows))
        return len(rows) >= 4  # row 0 + 3 rounds

    res = simulate.run(cfg, tmp_path / "one", setup=setup, progress=False, stop_when=stop)
    assert res["stop_reason"] == "stop_when" and res["rounds"] == 3
    assert pilot.loss_reached([{"train_loss": 1.0}, {"train_loss": None}, {"train_loss": 2.0},
                               {"train_loss": 3.0}], 2.0)
    assert not pilot.loss_reached([{"train_loss": 1.0}, {"train_loss": 9.0}], 5.0)  # fewer than 3 losses
