"""Seed 002 (SOFT / TSFA, reconstructed from the abstract of Kim & Choi, arXiv 2505.00333).

Pure math first (penalty gradient, importance ranking, sparse aggregation, the Lyapunov
queue on a long synthetic run), then the methods on fake payloads (SOFT with rho = 1 and
lambda = 0 is plain federated LoRA), then short real runs on configs/smoke.yaml.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora import setup as setup_mod
from fedlora import simulate
from fedlora.aggregation import SketchedUpdate, scatter_sum
from fedlora.config import load_config
from fedlora.methods import METHODS
from fedlora.methods.base import MethodContext, client_payload, payload_values
from fedlora.methods.manual import IndependentSketch
from fedlora.methods.soft import Soft, decode_indices, encode_indices
from fedlora.methods.tsfa import Tsfa
from fedlora.soft import (LyapunovController, SparseComponents, aggregate_components, component_change_norms,
                          component_norms, dropped_energy_fraction, energy_profile, orthogonality_penalty,
                          orthogonality_penalty_grad, state_penalty, top_components)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
MODES = ["full", "offdiag", "none"]


# ----------------------------------------------------------------- penalty


def written_penalty(A, B, a_mode, b_mode):
    """The formula as written: ||A A^T - I||_F^2 + ||B^T B - I||_F^2 (or its off-diagonal part)."""
    def term(G, mode):
        if mode == "none":
            return torch.zeros((), dtype=G.dtype)
        target = torch.eye(G.shape[0], dtype=G.dtype) if mode == "full" else torch.diag(torch.diag(G))
        return torch.linalg.matrix_norm(G - target, ord="fro") ** 2
    return term(A @ A.T, a_mode) + term(B.T @ B, b_mode)


@pytest.mark.parametrize("a_mode", MODES)
@pytest.mark.parametrize("b_mode", MODES)
def test_penalty_closed_form_gradient_matches_autograd(a_mode, b_mode):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 9, dtype=torch.float64, generator=g).requires_grad_(True)
    B = torch.randn(7, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    ref = written_penalty(A, B, a_mode, b_mode) + 0.0 * (A.sum() + B.sum())  # (keeps "none"/"none" in the graph)
    gA_ref, gB_ref = torch.autograd.grad(ref, (A, B))
    value, gA, gB = orthogonality_penalty_grad(A.detach(), B.detach(), a_mode=a_mode, b_mode=b_mode)
    assert torch.allclose(value, ref.detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(orthogonality_penalty(A, B, a_mode=a_mode, b_mode=b_mode), ref, rtol=1e-12)
    assert torch.allclose(gA, gA_ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(gB, gB_ref, rtol=1e-10, atol=1e-10)
    # the regularizer the clients train with: lambda * sum over modules, backward = closed form
    lam = 0.37
    A2 = A.detach().clone().requires_grad_(True)
    B2 = B.detach().clone().requires_grad_(True)
    reg = state_penalty({"m1": (A2, B2), "m2": (A2, B2)}, lam, a_mode=a_mode, b_mode=b_mode)
    reg.backward()
    assert torch.allclose(reg.detach(), 2 * lam * ref.detach(), rtol=1e-12)
    assert torch.allclose(A2.grad, 2 * lam * gA_ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(B2.grad, 2 * lam * gB_ref, rtol=1e-10, atol=1e-10)


def test_penalty_on_zero_b():
    """B = 0 (LoRA's init): the off-diagonal B term (our default) is 0 with 0 gradient; the
    literal full term is r but also has 0 gradient there -- a maximum it moves away from
    as soon as the task loss makes B non-zero (then it pulls every column to unit norm)."""
    A = torch.randn(4, 6, dtype=torch.float64)
    B = torch.zeros(5, 4, dtype=torch.float64)
    v_off, _, gB_off = orthogonality_penalty_grad(A, B, a_mode="none", b_mode="offdiag")
    v_full, _, gB_full = orthogonality_penalty_grad(A, B, a_mode="none", b_mode="full")
    assert float(v_off) == 0.0 and float(v_full) == 4.0
    assert not gB_off.any() and not gB_full.any()
    small = 1e-2 * torch.randn(5, 4, dtype=torch.float64)
    _, _, g = orthogonality_penalty_grad(A, small, a_mode="none", b_mode="full")
    assert float((g * small).sum()) < 0  # descent direction grows B: the pull toward unit columns


# ----------------------------------------------------------------- importance


def orthonormal_rows(r, n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()  # [r, n], orthonormal rows


def test_importance_ranking_picks_largest_components():
    r, n_in, n_out = 5, 12, 9
    A = orthonormal_rows(r, n_in, 1)
    U = orthonormal_rows(r, n_out, 2).T  # [out, r], orthonormal columns
    sigma = torch.tensor([0.1, 3.0, 0.5, 2.0, 1.0], dtype=torch.float64)
    B = U * sigma  # orthogonal columns with norms sigma
    scores = component_norms(A, B)
    assert np.allclose(scores, sigma.numpy())
    assert top_components(scores, 2).tolist() == [1, 3]
    assert top_components(scores, 3).tolist() == [1, 3, 4]
    # orthogonal factors: the scores are the singular values of B A, and the top-k cut is
    # the Eckart-Young truncation (no SVD needed)
    W = B @ A
    s = torch.linalg.svdvals(W)[:r]
    assert np.allclose(np.sort(scores)[::-1], s.numpy())
    idx = torch.as_tensor(top_components(scores, 2))
    err = torch.linalg.matrix_norm(W - B[:, idx] @ A[idx], ord="fro")
    assert math.isclose(float(err), float(torch.sqrt((s[2:] ** 2).sum())), rel_tol=1e-10)
    assert math.isclose(dropped_energy_fraction(energy_profile(scores), 2), float((s[2:] ** 2).sum() / (s ** 2).sum()),
                        rel_tol=1e-10)
    # ties go to the lower index; k checked
    assert top_components([1.0, 2.0, 2.0, 0.5], 2).tolist() == [1, 2]
    assert top_components([2.0, 1.0, 2.0, 2.0], 2).tolist() == [0, 2]
    with pytest.raises(ValueError):
        top_components([1.0, 2.0], 3)


def test_change_norms_closed_form():
    g = torch.Generator().manual_seed(3)
    A0, B0 = torch.randn(4, 7, generator=g), torch.randn(6, 4, generator=g)
    A1, B1 = A0 + 0.3 * torch.randn(4, 7, generator=g), B0 + 0.3 * torch.randn(6, 4, generator=g)
    got = component_change_norms(A0, B0, A1, B1)
    want = [float(torch.linalg.matrix_norm(torch.outer(B1[:, j], A1[j]) - torch.outer(B0[:, j], A0[j])).double())
            for j in range(4)]
    assert np.allclose(got, want, rtol=1e-5)
    # a component starting at zero (LoRA's B = 0): the abstract's ||b_j|| ||a_j|| of the trained factors
    Z = torch.zeros_like(B0)
    assert np.allclose(component_change_norms(A0, Z, A1, B1), component_norms(A1, B1), rtol=1e-6)
    # profile sums give the pooled dropped energy for every k
    p = energy_profile([3.0, 1.0]) + energy_profile([2.0, 2.0])
    assert p.tolist() == [13.0, 5.0] and dropped_energy_fraction(p, 1) == 5.0 / 18.0
    assert dropped_energy_fraction(np.zeros(4), 1) == 0.75  # no information: prior 1 - k / r


def test_sparse_aggregation_matches_scatter_sum():
    g = torch.Generator().manual_seed(4)
    state = {"m1": (torch.randn(4, 5, generator=g), torch.randn(3, 4, generator=g)),
             "m2": (torch.randn(4, 2, generator=g), torch.randn(6, 4, generator=g))}
    full = np.arange(4)
    deltas = [{n: (torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g)) for n, (a, b) in state.items()}
              for _ in range(3)]
    weights = [0.4, 1.7, 0.9]
    ours = aggregate_components(state, [SparseComponents(i, w, {n: (full, *d[n]) for n in d})
                                        for i, (w, d) in enumerate(zip(weights, deltas))])
    ref = scatter_sum(state, [SketchedUpdate(i, full, d, w) for i, (w, d) in enumerate(zip(weights, deltas))])
    for n in state:
        assert torch.equal(ours[n][0], ref[n][0]) and torch.equal(ours[n][1], ref[n][1])
    # modules keep different ranks; unsent ranks stay zero; overlapping ranks add up
    dA, dB = torch.ones(2, 5), torch.ones(3, 2)
    u1 = SparseComponents(0, 2.0, {"m1": (np.array([0, 3]), dA, dB), "m2": (np.array([1]), torch.ones(1, 2), torch.ones(6, 1))})
    u2 = SparseComponents(1, 1.0, {"m1": (np.array([3]), torch.ones(1, 5), torch.ones(3, 1)),
                                   "m2": (np.array([1, 2]), torch.ones(2, 2), torch.ones(6, 2))})
    out = aggregate_components(state, [u1, u2])
    assert out["m1"][0][:, 0].tolist() == [2.0, 0.0, 0.0, 3.0] and out["m1"][1][0].tolist() == [2.0, 0.0, 0.0, 3.0]
    assert out["m2"][0][:, 0].tolist() == [0.0, 3.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        aggregate_components(state, [SparseComponents(0, 1.0, {"m1": (np.array([1, 0]), dA, dB),
                                                               "m2": u1.modules["m2"]})])


# ----------------------------------------------------------------- Lyapunov controller


@pytest.mark.parametrize("v", [0.1, 1.0, 30.0])
def test_virtual_queue_keeps_average_latency_within_budget(v):
    """5000 synthetic rounds, 8 rho options, random latencies and penalties per round.
    Stated tolerance: the running average latency ends within 1% of L_avg (and within the
    exact bound L_avg + Q_T / T), while the average penalty beats the cheapest-latency policy."""
    rng = np.random.default_rng(0)
    T, r = 5000, 8
    k = np.arange(1, r + 1)
    base = rng.uniform(2.0, 6.0, T)  # compute + broadcast part of the round, seconds
    per_rank = rng.uniform(0.2, 1.5, T)  # upload seconds per kept component
    lat = base[:, None] + per_rank[:, None] * k[None, :]
    sv = np.sort(rng.exponential(1.0, (T, r)), axis=1)[:, ::-1]  # component energies, per round
    pen = np.array([[dropped_energy_fraction(sv[t] ** 2, j) for j in k] for t in range(T)])
    budget = 0.5 * (lat[:, 0].mean() + lat[:, -1].mean())
    ctl = LyapunovController(v, budget)
    chosen, lats, pens, queues = [], [], [], []
    for t in range(T):
        j = ctl.choose(pen[t], lat[t])
        queues.append(ctl.queue)
        ctl.update(lat[t, j])
        chosen.append(j), lats.append(lat[t, j]), pens.append(pen[t, j])
    avg = float(np.mean(lats))
    assert avg <= budget + ctl.queue / T + 1e-9  # the queue identity, exact
    assert avg <= 1.01 * budget
    assert avg >= 0.9 * budget  # it spends the budget rather than always taking the smallest rho
    assert np.mean(pens) < np.mean(pen[:, 0])
    assert len(set(chosen)) > 1
    # running average, checked from round 500 on: within 1% after the queue has settled
    running = np.cumsum(lats) / np.arange(1, T + 1)
    assert np.all(running[500:] <= 1.01 * budget)
    # the queue recursion
    q = 0.0
    for t in range(T):
        assert math.isclose(queues[t], q, abs_tol=1e-9)
        q = max(q + lats[t] - budget, 0.0)


def test_controller_choice_and_ties():
    ctl = LyapunovController(2.0, 1.0)
    assert ctl.choose([0.5, 0.2, 0.0], [1.0, 2.0, 3.0]) == 2  # Q = 0: least penalty
    ctl.queue = 10.0
    assert ctl.choose([0.5, 0.2, 0.0], [1.0, 2.0, 3.0]) == 0  # large Q: least latency
    ctl.queue = 0.0
    assert ctl.choose([0.3, 0.3], [1.0, 1.0]) == 0
    assert ctl.update(3.5) == 2.5 and ctl.update(0.0) == 1.5 and ctl.update(0.0) == 0.5 and ctl.update(0.0) == 0.0


# ----------------------------------------------------------------- methods on fake payloads


def fake_ctx(overrides, shapes=None, n=5):
    cfg = load_config(None, [f"data.num_clients={n}", "lora.rank=4", "lora.alpha=8", *overrides])
    rng = np.random.default_rng(7)
    share = rng.uniform(0.5, 2.0, n)
    shapes = shapes or {"m.q": (6, 5), "m.v": (3, 7)}
    return MethodContext(cfg=cfg, data_share=share / share.sum(), compute_time_s=rng.uniform(1, 5, n),
                         upload_s_hz=rng.uniform(1e5, 1e6, n), module_shapes=shapes)


def fake_state(ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(ctx.rank, i, generator=g), torch.zeros(o, ctx.rank))
            for m, (i, o) in ctx.module_shapes.items()}


def fake_trained(job, seed):
    g = torch.Generator().manual_seed(seed)
    return {m: (a + 0.1 * torch.randn(a.shape, generator=g), b + 0.1 * torch.randn(b.shape, generator=g))
            for m, (a, b) in job.start.items()}


def test_soft_rho1_lambda0_equals_manual_on_fake_payloads():
    ctx = fake_ctx(["sketch.ratio=1", "options.soft_rho=1", "options.soft_lambda=0",
                    "sampling.participation_prob=0.6"])
    manual, soft = IndependentSketch(ctx), Soft(ctx)
    state_m = state_s = fake_state(ctx)
    for t in (1, 2, 3):
        rc_m, rc_s = manual.configure_round(t, state_m), soft.configure_round(t, state_s)
        assert [j.client_id for j in rc_m.jobs] == [j.client_id for j in rc_s.jobs]
        assert rc_m.broadcast_values == rc_s.broadcast_values and rc_s.info == {}
        pay_m, pay_s = {}, {}
        for jm, js in zip(rc_m.jobs, rc_s.jobs):
            assert js.regularizer is None and js.scaling == jm.scaling and js.compute_ratio == jm.compute_ratio
            pay_m[jm.client_id] = client_payload(jm, fake_trained(jm, 100 * t + jm.client_id))
            pay_s[js.client_id] = client_payload(js, fake_trained(js, 100 * t + js.client_id))
            assert payload_values(pay_s[js.client_id]) == payload_values(pay_m[jm.client_id])
        state_m = manual.aggregate(t, state_m, {j.client_id: j for j in rc_m.jobs}, pay_m).state
        state_s = soft.aggregate(t, state_s, {j.client_id: j for j in rc_s.jobs}, pay_s).state
        for m in state_m:
            assert torch.equal(state_m[m][0], state_s[m][0]) and torch.equal(state_m[m][1], state_s[m][1])


@pytest.mark.parametrize("bpv", [2, 4])
@pytest.mark.parametrize("method_cls", [Soft, Tsfa])
def test_sparse_upload_is_what_is_sent(bpv, method_cls):
    ctx = fake_ctx(["options.soft_rho=0.5", "options.soft_lambda=0.1", f"system.bytes_per_value={bpv}",
                    "sampling.participation_prob=1"])
    m = method_cls(ctx)
    state = fake_state(ctx)
    rc = m.configure_round(1, state)
    job = rc.jobs[0]
    assert job.regularizer is not None
    for keep in (1, 2, 4):
        job.upload = dataclasses.replace(job.upload, keep=keep)
        trained = fake_trained(job, 5)
        pay = client_payload(job, trained)
        # values + int32 indices (when not every rank is sent) [+ TSFA's r energy values], at their true size
        assert payload_values(pay) == m.upload_values(keep)
        idx_bytes = 0 if keep == 4 else 4 * keep * len(ctx.module_shapes)
        extra = 4 * bpv if method_cls is Tsfa else 0
        vals = sum(keep * (i + o) for i, o in ctx.module_shapes.values())
        assert sum(t.numel() for t in pay.values()) * bpv == vals * bpv + idx_bytes + extra
        for name, (a0, b0) in job.start.items():
            a1, b1 = trained[name]
            want = top_components(component_change_norms(a0, b0, a1, b1), keep)
            idx = decode_indices(pay[f"{name}.idx"]) if keep < 4 else np.arange(4)
            assert idx.tolist() == want.tolist()
            assert torch.equal(pay[f"{name}.A"], (a1 - a0)[torch.as_tensor(idx)])
            assert torch.equal(pay[f"{name}.B"], (b1 - b0)[:, torch.as_tensor(idx)])
        # the server puts the components back where they came from
        new = m.aggregate(1, state, {job.client_id: job}, {job.client_id: pay}).state
        w = ctx.data_share[job.client_id] / 1.0
        for name, (a0, b0) in state.items():
            idx = decode_indices(pay[f"{name}.idx"]) if keep < 4 else np.arange(4)
            rest = np.setdiff1d(np.arange(4), idx)
            assert torch.equal(new[name][0][rest], a0[rest])
            assert torch.allclose(new[name][0][idx], a0[idx] + w * pay[f"{name}.A"])
    assert decode_indices(encode_indices(np.array([0, 3, 70000]), bpv)).tolist() == [0, 3, 70000]


def test_tsfa_round_decision_and_state():
    ctx = fake_ctx(["sampling.participation_prob=0.8", "options.tsfa_v=1.0"])
    m = Tsfa(ctx)
    plan = m.plan()["tsfa"]
    assert plan["budget_feasible"] and plan["expected_latency_min_rho_s"] <= plan["latency_budget_s"] \
        <= plan["expected_latency_full_rho_s"]
    state = fake_state(ctx)
    seen = []
    for t in range(1, 30):
        q_before = m.controller.queue
        rc = m.configure_round(t, state)
        info = rc.info
        assert info["tsfa_queue"] == q_before
        assert info["tsfa_keep_ranks"] == round(info["tsfa_rho"] * 4)
        ids = [j.client_id for j in rc.jobs]
        lat, b = m.round_latency(ids, info["tsfa_keep_ranks"])
        assert info["tsfa_latency_s"] == lat and len(info["tsfa_bandwidth_hz"]) == len(ids)
        if ids:
            assert math.isclose(sum(info["tsfa_bandwidth_hz"]), ctx.cfg.system.bandwidth_hz, rel_tol=1e-9)
        assert math.isclose(m.controller.queue, max(q_before + lat - plan["latency_budget_s"], 0.0), abs_tol=1e-12)
        pays = {j.client_id: client_payload(j, fake_trained(j, t * 10 + j.client_id)) for j in rc.jobs}
        state = m.aggregate(t, state, {j.client_id: j for j in rc.jobs}, pays).state
        seen.append(info["tsfa_keep_ranks"])
    assert len(set(seen)) > 1  # it does adapt rho
    # checkpoint round trip
    m2 = Tsfa(ctx)
    m2.load_state_dict(m.state_dict())
    assert m2.controller.queue == m.controller.queue and np.array_equal(m2.profile, m.profile)


def test_registered_and_labeled():
    for name in ("soft", "tsfa"):
        assert name in METHODS and "RECONSTRUCTED" in METHODS[name].summary


# ----------------------------------------------------------------- real runs (smoke config)

COMMON = ["sketch.ratio=1", "options.soft_rho=1", "options.soft_lambda=0", "train.rounds=2", "train.local_steps=1",
          "train.batch_size=2", "model.max_length=32", "eval.every=2",
          "eval.max_examples=8", "eval.final_max_examples=8"]


@pytest.fixture(scope="module")
def setup():
    return setup_mod.build_setup(load_config(SMOKE, COMMON))


def with_cfg(setup, overrides):
    """The same data, model and profiles under other method options (the method reads
    setup.cfg through its context, so it must carry them)."""
    return dataclasses.replace(setup, cfg=load_config(SMOKE, COMMON + overrides))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_cpu_time(rs):
    return [{k: v for k, v in r.items() if k != "cpu_time_s"} for r in rs]


@pytest.mark.slow
def test_soft_rho1_lambda0_run_equals_manual(setup, tmp_path):
    res_m = simulate.run(setup.cfg, tmp_path / "manual", setup=setup, progress=False)
    soft_setup = with_cfg(setup, ["method=soft"])
    res_s = simulate.run(soft_setup.cfg, tmp_path / "soft", setup=soft_setup, progress=False)
    rm, rs = rows(tmp_path / "manual"), rows(tmp_path / "soft")
    assert len(rm) == 3 and any(r["participants"] for r in rm[1:])
    assert without_cpu_time(rm) == without_cpu_time(rs)
    assert res_m["final_eval"] == res_s["final_eval"] and res_m["upload_bytes"] == res_s["upload_bytes"]


@pytest.mark.slow
def test_soft_and_tsfa_short_runs(setup, tmp_path):
    s = with_cfg(setup, ["method=soft", "options.soft_rho=0.5", "options.soft_lambda=0.01"])
    res = simulate.run(s.cfg, tmp_path / "soft", setup=s, progress=False)
    assert res["rounds"] == 2 and math.isfinite(res["final_eval_mean"])
    soft = Soft(s.method_context())
    for r in rows(tmp_path / "soft")[1:]:
        assert not r["rejected"] and r["upload_bytes"] == soft.upload_values(2) * 4 * len(r["participants"])

    # a tiny budget and V: round 1 (Q = 0) sends everything, round 2 (Q > 0) the least
    t = with_cfg(setup, ["method=tsfa", "options.soft_lambda=0.01", "options.tsfa_v=1e-6",
                         "options.tsfa_latency_budget_s=0.001"])
    res = simulate.run(t.cfg, tmp_path / "tsfa", setup=t, progress=False)
    assert res["rounds"] == 2
    plan = json.loads((tmp_path / "tsfa" / "plan.json").read_text())["tsfa"]
    assert plan["latency_budget_s"] == 0.001 and plan["offline_stage"]["rank"] == 4
    tsfa = Tsfa(t.method_context())
    rs = rows(tmp_path / "tsfa")
    q = 0.0
    for r in rs[1:]:
        for key in ("tsfa_queue", "tsfa_rho", "tsfa_latency_s", "tsfa_penalty", "tsfa_bandwidth_hz"):
            assert key in r, key
        assert math.isclose(r["tsfa_queue"], q, abs_tol=1e-12)
        # no fading: the controller's latency model is the clock's round time
        assert math.isclose(r["tsfa_latency_s"], r["round_time_s"], rel_tol=1e-9)
        assert r["upload_bytes"] == tsfa.upload_values(r["tsfa_keep_ranks"]) * 4 * len(r["participants"])
        q = max(q + r["tsfa_latency_s"] - 0.001, 0.0)
    assert rs[1]["tsfa_rho"] == 1.0
    if rs[2]["participants"]:
        assert rs[2]["tsfa_rho"] == 0.25
