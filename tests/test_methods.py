"""Baselines: hand-computed aggregation of each method on 2-3 clients with tiny matrices
(r = 4, in = 2, out = 3), the advertised q and s of the seed's baselines, and one short real
run of every method through the round loop."""

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import metric_rows
from fedlora import setup as setup_mod
from fedlora import simulate
from fedlora.config import InputError, RunConfig, load_config
from fedlora.methods import METHODS
from fedlora.methods.base import ClientJob, FactorsUpload, MethodContext, client_payload, payload_values, state_values
from fedlora.methods.flexlora import FlexLoRA, svd_truncation
from fedlora.methods.flora import FLoRA, stack_adapters
from fedlora.methods.fslora import FSLoRA, default_clients_per_round, expected_max_fixed_size
from fedlora.methods.hetlora import HetLoRA, TailRegularizer, pruned_rank, truncate
from fedlora.methods.hetlora_rank_avg import HetLoRARankAverage
from fedlora.methods.rank_baselines import RankFull, RankNormal, RankUniform
from fedlora.methods.planned_ablations import ProposedQ
from fedlora.methods.proposed import Proposed
from fedlora.methods.sampling_baselines import SampleFixed, SampleFull, SampleUniform, SampleWeighted

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
T = torch.float64
P3 = (0.5, 0.3, 0.2)
NEW_METHODS = ["fslora", "hetlora", "hetlora_rank_avg", "flora", "flexlora", "sample_full", "sample_fixed", "sample_uniform",
               "sample_weighted", "rank_full", "rank_normal", "rank_uniform"]


class StubEngine:
    """Records merge_into_base calls (FLoRA) instead of touching a model."""

    def __init__(self):
        self.merged: list[dict] = []

    def merge_into_base(self, delta):
        self.merged.append({k: v.clone() for k, v in delta.items()})

    def base_delta(self):
        out = {}
        for d in self.merged:
            for k, v in d.items():
                out[k] = out[k] + v if k in out else v.clone()
        return out


def make_ctx(shares=P3, *, rank=4, alpha=8.0, shapes=None, engine=None, seed=0, **sections):
    n = len(shares)
    cfg = RunConfig(seed=seed, data={"num_clients": n}, lora={"rank": rank, "alpha": alpha}, **sections)
    return MethodContext(cfg=cfg, data_share=np.asarray(shares, float), compute_time_s=np.linspace(1.0, 3.0, n),
                         upload_s_hz=np.linspace(10.0, 30.0, n), module_shapes=shapes or {"m": (2, 3)},
                         engine=engine)


def ones_state(value=1.0, shapes=None, rank=4):
    shapes = shapes or {"m": (2, 3)}
    return {n: (torch.full((rank, i), value, dtype=T), torch.full((o, rank), value, dtype=T))
            for n, (i, o) in shapes.items()}


def t(x):
    return torch.tensor(x, dtype=T)


# ------------------------------------------------------------------ FSLoRA


def test_fslora_weighted_average_with_scatter():
    m = FSLoRA(make_ctx(options={"clients_per_round": 2, "client_ranks": [2, 4, 2]}))
    state = ones_state()
    jobs = {0: ClientJob(0, start={}, scaling=4.0, compute_ratio=0.5, rank_indices=np.array([0, 2])),
            2: ClientJob(2, start={}, scaling=4.0, compute_ratio=0.5, rank_indices=np.array([1, 2]))}
    payloads = {0: {"m.A": t([[1, 2], [3, 4]]), "m.B": t([[1, 0], [0, 1], [1, 1]])},
                2: {"m.A": t([[10, 20], [30, 40]]), "m.B": t([[7, 0], [0, 7], [7, 7]])}}
    new = m.aggregate(1, state, jobs, payloads).state
    w0, w2 = 0.5 / 0.7, 0.2 / 0.7  # data shares renormalized over the sampled set
    a = np.ones((4, 2))
    a[0] += w0 * np.array([1, 2])
    a[1] += w2 * np.array([10, 20])
    a[2] += w0 * np.array([3, 4]) + w2 * np.array([30, 40])  # overlapping rank: both add
    b = np.ones((3, 4))
    b[:, 0] += w0 * np.array([1, 0, 1])
    b[:, 1] += w2 * np.array([7, 0, 7])
    b[:, 2] += w0 * np.array([0, 1, 1]) + w2 * np.array([0, 7, 7])
    np.testing.assert_allclose(new["m"][0].numpy(), a, atol=1e-12)
    np.testing.assert_allclose(new["m"][1].numpy(), b, atol=1e-12)
    assert m.aggregate(2, state, {}, {}).state is state  # empty round: unchanged


def test_fslora_configure_round_sketches_fixed_size_set():
    ctx = make_ctx((0.1,) * 10, options={"client_ranks": [1, 2, 3, 4] * 2 + [1, 2]})
    m = FSLoRA(ctx)
    assert m.clients_per_round == 2  # round(0.2 * 10)
    state = ones_state()
    sets = set()
    for rnd in range(1, 9):
        rc = m.configure_round(rnd, state)
        ids = [j.client_id for j in rc.jobs]
        assert len(ids) == 2 == len(set(ids)) and ids == sorted(ids)
        sets.add(tuple(ids))
        assert rc.broadcast_values == state_values(state) == 4 * 5
        for j in rc.jobs:
            k = m.ranks[j.client_id]
            assert len(j.rank_indices) == k and j.start["m"][0].shape == (k, 2) and j.start["m"][1].shape == (3, k)
            assert j.scaling == pytest.approx(2.0 * 4 / k) and j.compute_ratio == k / 4
        again = FSLoRA(ctx).configure_round(rnd, state)  # deterministic per (seed, round)
        assert [j.client_id for j in again.jobs] == ids
        assert all(np.array_equal(x.rank_indices, y.rank_indices) for x, y in zip(again.jobs, rc.jobs))
    assert len(sets) > 1  # a fresh set each round


def test_fixed_size_defaults_and_bad_input():
    assert [default_clients_per_round(n) for n in (1, 3, 4, 10, 13, 50)] == [1, 1, 1, 2, 3, 10]
    with pytest.raises(InputError, match="clients_per_round"):
        FSLoRA(make_ctx(options={"clients_per_round": 4}))
    # ranks from sketch.ratio when no client_ranks: ceil(s r)
    assert FSLoRA(make_ctx(sketch={"ratio": [0.25, 0.5, 1.0]})).ranks.tolist() == [1, 2, 4]


def test_expected_max_fixed_size_matches_enumeration():
    v = np.array([3.0, 1.0, 4.0, 1.0, 5.0])
    for m in range(1, 6):
        subsets = list(itertools.combinations(range(5), m))
        brute = np.mean([v[list(s)].max() for s in subsets])
        assert expected_max_fixed_size(v, m) == pytest.approx(brute)
    plan = FSLoRA(make_ctx(options={"clients_per_round": 2, "client_ranks": [4, 2, 1]})).plan()
    assert plan["participation_prob"] == pytest.approx([2 / 3] * 3) and plan["ranks"] == [4, 2, 1]
    assert plan["sketch_ratio"] == [1.0, 0.5, 0.25] and plan["expected_round_time_s"] > 0


# ------------------------------------------------------------------ HetLoRA


def _het_setup(weighting, x0=0.0, **options):
    m = HetLoRA(make_ctx(options={"clients_per_round": 3, "client_ranks": [4, 2, 1],
                                  "hetlora_weighting": weighting, "hetlora_pruning": False, **options}))
    state = ones_state(x0)
    jobs = {i: ClientJob(i, start=truncate(state, k), scaling=2.0, compute_ratio=k / 4, rank_indices=np.arange(k))
            for i, k in enumerate([4, 2, 1])}
    c = {0: 1.0, 1: 2.0, 2: 4.0}
    payloads = {i: {"m.A": torch.full((k, 2), c[i], dtype=T), "m.B": torch.full((3, k), c[i], dtype=T)}
                for i, k in enumerate([4, 2, 1])}
    return m, state, jobs, payloads


def test_hetlora_truncates_first_ranks_with_global_scaling():
    m = HetLoRA(make_ctx(options={"clients_per_round": 3, "client_ranks": [4, 2, 1]}))
    state = {"m": (torch.arange(8, dtype=T).reshape(4, 2), torch.arange(12, dtype=T).reshape(3, 4))}
    rc = m.configure_round(1, state)
    assert [j.client_id for j in rc.jobs] == [0, 1, 2] and rc.broadcast_values == 20
    for j, k in zip(rc.jobs, [4, 2, 1]):
        a, b = j.start["m"]
        assert torch.equal(a, state["m"][0][:k]) and torch.equal(b, state["m"][1][:, :k])
        assert j.scaling == 2.0 and j.compute_ratio == k / 4  # alpha / r, no r / k rescale
        assert j.regularizer == TailRegularizer(0.01, 0.99)  # the pruning regularizer, by default
    j = rc.jobs[1]
    j.start["m"][0].add_(1.0)  # a client's start is a copy, never the global state
    assert state["m"][0][0, 0] == 0


def test_hetlora_zero_padded_average_over_all_sampled_clients():
    """The paper's rule: trained factors zero-padded to rank r, weights normalised over every
    sampled client, so a rank few clients hold is pulled towards zero."""
    m, state, jobs, payloads = _het_setup("data_share", x0=1.0)
    new = m.aggregate(1, state, jobs, payloads).state
    # trained factors 1 + c_i = 2, 3, 5; rank 0 held by all, rank 1 by clients 0 and 1, ranks 2-3 by client 0
    per_rank = [0.5 * 2 + 0.3 * 3 + 0.2 * 5, 0.5 * 2 + 0.3 * 3, 0.5 * 2, 0.5 * 2]
    np.testing.assert_allclose(new["m"][0].numpy(), np.repeat(np.array(per_rank)[:, None], 2, 1), atol=1e-12)
    np.testing.assert_allclose(new["m"][1].numpy(), np.repeat(np.array(per_rank)[None, :], 3, 0), atol=1e-12)
    # clients 1 and 2 only: weights .3/.5 and .2/.5; the ranks neither holds go to zero
    jobs5 = {i: dataclasses.replace(jobs[i], start=truncate(ones_state(5.0), k)) for i, k in ((1, 2), (2, 1))}
    new2 = m.aggregate(1, ones_state(5.0), jobs5, {1: payloads[1], 2: payloads[2]}).state
    np.testing.assert_allclose(new2["m"][0][:, 0].numpy(), [0.6 * 7 + 0.4 * 9, 0.6 * 7, 0.0, 0.0], atol=1e-12)


def test_hetlora_sparsity_weighting():
    m, state, jobs, payloads = _het_setup("norm")
    new = m.aggregate(1, state, jobs, payloads).state
    # start 0, so B_i A_i = c^2 k * ones(3, 2): norms 4, 8, 16 (times sqrt 6, which cancels)
    per_rank = [(4 * 1 + 8 * 2 + 16 * 4) / 28, (4 * 1 + 8 * 2) / 28, 4 / 28, 4 / 28]
    np.testing.assert_allclose(new["m"][0][:, 0].numpy(), per_rank, atol=1e-12)
    np.testing.assert_allclose(new["m"][1][0].numpy(), per_rank, atol=1e-12)


def test_hetlora_self_pruning():
    m = HetLoRA(make_ctx(options={"clients_per_round": 3, "client_ranks": [4, 2, 1], "hetlora_decay": 0.5,
                                  "hetlora_prune_lambda": 0.1}))
    state = {"m": (torch.ones(4, 2, dtype=T), torch.ones(3, 4, dtype=T))}
    job = m.configure_round(1, state).jobs[0]
    # the regularizer: lambda ||B[:, t:]||_F ||A[t:, :]||_F, t = floor(0.5 * 4) = 2
    assert float(job.regularizer(job.start)) == pytest.approx(0.1 * math.sqrt(6) * 2)
    a, b = job.start["m"]
    grown = {"m": (a * 2, b * 2)}
    assert client_payload(job, grown)["m.A"].shape == (4, 2)  # tail grew: all 4 ranks, no pruning
    shrunk_a, shrunk_b = a + 0.25, b.clone()
    shrunk_a[2:] = 0.5
    payload = client_payload(job, {"m": (shrunk_a, shrunk_b)})  # tail shrank: keep floor(0.5 * 4) = 2
    assert payload["m.A"].shape == (2, 2) and payload["m.B"].shape == (3, 2)
    np.testing.assert_allclose(payload["m.A"].numpy(), 0.25)
    jobs = {0: job}
    new = m.aggregate(1, state, jobs, {0: payload}).state
    np.testing.assert_allclose(new["m"][0][:, 0].numpy(), [1.25, 1.25, 0.0, 0.0])  # pruned ranks padded with 0
    assert m.ranks.tolist() == [2, 2, 1]  # client 0 keeps its new rank
    assert m.configure_round(2, new).jobs[0].start["m"][0].shape == (2, 2)
    assert pruned_rank(8, 0.99, 1) == 7 and pruned_rank(1, 0.5, 1) == 1 and pruned_rank(3, 0.5, 2) == 2
    restored = HetLoRA(m.ctx)
    restored.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert restored.ranks.tolist() == [2, 2, 1]


def test_hetlora_rank_average_variant():
    """The later variant: each rank averaged over the clients holding it, unheld ranks kept."""
    m = HetLoRARankAverage(make_ctx(options={"clients_per_round": 3, "client_ranks": [4, 2, 1]}))
    _, state, jobs, payloads = _het_setup("data_share")
    assert all(j.regularizer is None for j in m.configure_round(1, state).jobs)  # no pruning
    new = m.aggregate(1, state, jobs, payloads).state
    per_rank = [(0.5 * 1 + 0.3 * 2 + 0.2 * 4) / 1.0, (0.5 * 1 + 0.3 * 2) / 0.8, 1.0, 1.0]
    np.testing.assert_allclose(new["m"][0].numpy(), np.repeat(np.array(per_rank)[:, None], 2, 1), atol=1e-12)
    np.testing.assert_allclose(new["m"][1].numpy(), np.repeat(np.array(per_rank)[None, :], 3, 0), atol=1e-12)
    new2 = m.aggregate(1, ones_state(5.0), {1: jobs[1], 2: jobs[2]}, {1: payloads[1], 2: payloads[2]}).state
    assert torch.all(new2["m"][0][2:] == 5.0) and torch.all(new2["m"][1][:, 2:] == 5.0)
    np.testing.assert_allclose(new2["m"][0][0].numpy(), 5 + (0.3 * 2 + 0.2 * 4) / 0.5)


# ------------------------------------------------------------------ FLoRA


def test_flora_fresh_adapters_stack_exactly_and_merge():
    engine = StubEngine()
    ctx = make_ctx(engine=engine, options={"clients_per_round": 2, "client_ranks": [4, 2, 1]})
    m = FLoRA(ctx)
    state = ones_state(0.0)
    rc = m.configure_round(1, state)
    assert rc.broadcast_values == 0 and len(rc.jobs) == 2  # round 1: nothing to download
    for j in rc.jobs:
        k = m.ranks[j.client_id]
        a, b = j.start["m"]
        assert a.shape == (k, 2) and b.shape == (3, k) and torch.all(b == 0) and torch.any(a != 0)
        assert j.scaling == 2.0 and j.compute_ratio == k / 4 and isinstance(j.upload, FactorsUpload)
    again = FLoRA(ctx).configure_round(1, state)
    assert all(torch.equal(x.start["m"][0], y.start["m"][0]) for x, y in zip(rc.jobs, again.jobs))

    g = torch.Generator().manual_seed(0)
    trained = {0: {"m": (torch.randn(4, 2, generator=g, dtype=T), torch.randn(3, 4, generator=g, dtype=T))},
               2: {"m": (torch.randn(1, 2, generator=g, dtype=T), torch.randn(3, 1, generator=g, dtype=T))}}
    jobs = {i: ClientJob(i, start={"m": (torch.ones_like(a), torch.ones_like(b))}, scaling=2.0, compute_ratio=1.0,
                         upload=FactorsUpload()) for i, (a, b) in ((i, f["m"]) for i, f in trained.items())}
    payloads = {i: client_payload(jobs[i], trained[i]) for i in trained}
    # upload = the full factors, numel r_i (in + out)
    assert torch.equal(payloads[0]["m.A"], trained[0]["m"][0]) and payload_values(payloads[2]) == 1 * 5
    p0, p2 = 0.5 / 0.7, 0.2 / 0.7
    expected = p0 * trained[0]["m"][1] @ trained[0]["m"][0] + p2 * trained[2]["m"][1] @ trained[2]["m"][0]
    stacked = stack_adapters({i: trained[i] for i in trained}, {0: p0, 2: p2})
    a_s, b_s = stacked["m"]
    assert a_s.shape == (5, 2) and b_s.shape == (3, 5)
    torch.testing.assert_close(b_s @ a_s, expected, atol=1e-12, rtol=0)

    agg = m.aggregate(1, state, jobs, payloads)
    new = agg.state
    assert not engine.merged  # the method returns the merge, the loop applies it
    torch.testing.assert_close(agg.base_merge["m"].double(), 2.0 * expected, atol=1e-5, rtol=1e-5)
    assert torch.all(new["m"][1] == 0)  # the global LoRA restarts
    rc2 = m.configure_round(2, new)
    assert rc2.broadcast_values == (4 + 1) * (2 + 3)  # the stacked factors go down to every client
    restored = FLoRA(ctx)
    restored.load_state_dict(m.state_dict())
    assert restored.configure_round(2, new).broadcast_values == rc2.broadcast_values


# ------------------------------------------------------------------ FlexLoRA


def test_flexlora_svd_truncation_is_best_rank_r():
    shapes = {"m": (2, 3), "n": (6, 5)}
    ctx = make_ctx(shapes=shapes, options={"clients_per_round": 2, "client_ranks": [4, 2, 1]})
    m = FlexLoRA(ctx)
    g = torch.Generator().manual_seed(1)
    ranks = {0: 4, 1: 2}
    trained = {i: {n: (torch.randn(k, fi, generator=g, dtype=T), torch.randn(fo, k, generator=g, dtype=T))
                   for n, (fi, fo) in shapes.items()} for i, k in ranks.items()}
    jobs = {i: ClientJob(i, start={n: (a + 1, b + 1) for n, (a, b) in trained[i].items()}, scaling=2.0,
                         compute_ratio=1.0, upload=FactorsUpload()) for i in trained}
    payloads = {i: client_payload(jobs[i], trained[i]) for i in trained}
    assert payload_values(payloads[1]) == 2 * (5 + 11)
    agg = m.aggregate(1, ones_state(shapes=shapes), jobs, payloads)
    new = agg.state
    # the server step is charged as FLOPs / server_flops_hz, by hand: module m (in 2, out 3):
    # products (2*3*4*2 + 2*3*2) + (2*3*2*2 + 2*3*2) = 96, SVD 4*3*2^2 + 22*2^3 = 224;
    # module n (in 6, out 5): products 300 + 180 = 480, SVD 4*6*5^2 + 22*5^3 = 3350
    assert agg.server_s == pytest.approx((96 + 224 + 480 + 3350) / ctx.cfg.system.server_flops_hz, rel=1e-12)
    p0, p1 = 0.5 / 0.8, 0.3 / 0.8
    for n in shapes:
        w = (p0 * trained[0][n][1] @ trained[0][n][0] + p1 * trained[1][n][1] @ trained[1][n][0]).numpy()
        u, s, vh = np.linalg.svd(w, full_matrices=False)
        a, b = new[n]
        assert a.shape == (4, shapes[n][0]) and b.shape == (shapes[n][1], 4)
        best4 = (u[:, :4] * s[:4]) @ vh[:4]
        np.testing.assert_allclose((b @ a).numpy(), best4, atol=1e-10)
        # Eckart-Young: the error is the tail of the spectrum
        assert np.linalg.norm(w - (b @ a).numpy()) == pytest.approx(np.sqrt(np.sum(s[4:] ** 2)), abs=1e-10)
        for k in (1, 2):  # every client's rank-k start is the best rank-k approximation
            ak, bk = truncate(new, k)[n]
            np.testing.assert_allclose((bk @ ak).numpy(), (u[:, :k] * s[:k]) @ vh[:k], atol=1e-10)
        np.testing.assert_allclose((a[:min(4, *w.shape)] @ a[:min(4, *w.shape)].T).numpy(),
                                   np.eye(min(4, *w.shape)), atol=1e-10)  # A rows orthonormal
    # the 3 x 2 module has rank <= 2: zero-padded beyond
    assert torch.all(new["m"][0][2:] == 0) and torch.all(new["m"][1][:, 2:] == 0)
    rc = m.configure_round(2, new)
    assert rc.broadcast_values == 0
    for j in rc.jobs:
        k = m.ranks[j.client_id]
        assert j.unicast_values == k * (5 + 11) and j.scaling == 2.0 and isinstance(j.upload, FactorsUpload)
        assert torch.equal(j.start["n"][0], new["n"][0][:k])
    assert m.aggregate(3, new, {}, {}).server_s == 0.0


def test_svd_truncation_rank_deficient_keeps_ranks_trainable():
    a, b = svd_truncation(torch.zeros(5, 6, dtype=T), 3)
    assert torch.all(b == 0)
    torch.testing.assert_close(a @ a.T, torch.eye(3, dtype=T))  # unit rows: a LoRA init pattern


# ------------------------------------------------------------------ seed 001 baselines


def test_sampling_baselines_advertised_q_and_s():
    shares = (0.4, 0.3, 0.2, 0.1)
    ctx = make_ctx(shares, sketch={"ratio": 0.25}, sampling={"participation_prob": 0.3})
    for cls, q in ((SampleFull, [1.0] * 4), (SampleFixed, [0.5] * 4)):
        m = cls(ctx)
        assert m.participation_prob.tolist() == q and m.ranks.tolist() == [4] * 4
        assert m.plan()["sketch_ratio"] == [1.0] * 4
    # uniform and weighted: as many expected participants as the matched planned method's first plan
    ten = (0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01)
    seen = set()
    for match, cls in (("proposed", Proposed), ("proposed_q", ProposedQ)):
        c = make_ctx(ten, system={"bandwidth_hz": 10.0}, sampling={"match": match})
        e = float(cls(c).participation_prob.sum())
        assert 2 < e < 8  # a plan that samples: the match is not trivially everybody
        seen.add(round(e, 6))
        u, w = SampleUniform(c), SampleWeighted(c)
        np.testing.assert_allclose(u.participation_prob, e / 10)  # identical across clients
        assert u.ranks.tolist() == [4] * 10 and w.ranks.tolist() == [4] * 10
        assert w.participation_prob.sum() == pytest.approx(e)
        free = w.participation_prob < 1  # proportional to p where not capped at 1
        np.testing.assert_allclose(w.participation_prob[free] / np.array(ten)[free],
                                   w.participation_prob[free][0] / ten[int(np.argmax(free))])
    assert len(seen) == 2  # proposed and proposed_q plan different q: each baseline matches its own
    given = make_ctx(shares, sampling={"expected_participants": 1.0})
    np.testing.assert_allclose(SampleWeighted(given).participation_prob, shares)
    np.testing.assert_allclose(SampleUniform(given).participation_prob, 0.25)
    numbers = make_ctx(shares, planner={"constants": {"alpha": 10.0, "beta": 1.0, "gamma": 0.2, "delta": 1.0}})
    planned = Proposed(dataclasses.replace(numbers, constants=numbers.cfg.planner.constants.bound_constants()))
    assert SampleUniform(numbers).participation_prob.sum() == pytest.approx(planned.participation_prob.sum())


def test_rank_baselines_advertised_q_and_s():
    n, r = 400, 8
    ctx = make_ctx((1 / n,) * n, rank=r, sampling={"participation_prob": 0.3}, sketch={"ratio": 0.5})
    full = RankFull(ctx)
    assert np.all(full.participation_prob == 0.3) and np.all(full.ranks == r)
    mid, width = (1 / r + 1) / 2, 1 - 1 / r
    for cls, var in ((RankNormal, None), (RankUniform, width ** 2 / 12)):
        m = cls(ctx)
        q, s = m.choose_q_s()
        assert np.all(q == 0.3) and np.all(m.participation_prob == 0.3)
        assert s.min() >= 1 / r and s.max() <= 1 and abs(s.mean() - mid) < 0.05
        if var is not None:
            assert s.var() == pytest.approx(var, rel=0.2)
        else:
            assert s.var() < 0.9 * width ** 2 / 12  # concentrated around the midpoint
        assert np.all((m.ranks >= 1) & (m.ranks <= r)) and np.array_equal(m.ranks, np.ceil(s * r - 1e-9).astype(int))
        assert np.array_equal(cls(ctx).ranks, m.ranks)  # seeded
        assert not np.array_equal(cls(make_ctx((1 / n,) * n, rank=r, seed=3)).ranks, m.ranks)
    assert np.all(RankNormal(make_ctx(rank=1)).ranks == 1)


def test_registered_with_summaries():
    for name in NEW_METHODS:
        assert METHODS[name].name == name and METHODS[name].summary


# ------------------------------------------------------------------ real runs

RANKS = [4, 3, 2, 1]


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(SMOKE, ["train.rounds=2", "train.local_steps=1", "eval.every=2", "eval.max_examples=4",
                              "eval.final_max_examples=4", "options.clients_per_round=2",
                              f"options.client_ranks={RANKS}"])
    return setup_mod.build_setup(cfg)


@pytest.mark.parametrize("name", NEW_METHODS)
def test_real_run(setup, tmp_path, name):
    cfg = setup.cfg.model_copy(update={"method": name})
    s = dataclasses.replace(setup, cfg=cfg)  # same data, model and profiles; this method's config
    out = tmp_path / name
    result = simulate.run(cfg, out, setup=s, progress=False)
    for f in ("config.yaml", "clients.json", "plan.json", "metrics.jsonl", "data.json", "result.json",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoint/progress.json"):
        assert (out / f).exists(), f
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    plan = json.loads((out / "plan.json").read_text())
    per_rank = sum(i + o for i, o in setup.engine.module_shapes.values())  # values per rank, all modules
    bpv = cfg.system.bytes_per_value
    r = cfg.lora.rank
    prev = []
    for row in rows[1:]:
        ids = row["participants"]
        if ids:
            assert math.isfinite(row["train_loss"])
        assert row["rejected"] == []
        if name == "hetlora":  # self-pruning may cut a rank from an upload
            assert row["upload_bytes"] <= sum(plan["ranks"][i] for i in ids) * per_rank * bpv
        else:
            assert row["upload_bytes"] == sum(plan["ranks"][i] for i in ids) * per_rank * bpv
        eff = np.array([setup.profiles[i].bits_per_s_per_hz for i in ids])
        band = cfg.system.downlink_band_hz
        if name == "flora":
            down = sum(RANKS[i] for i in prev) * per_rank
        elif name == "flexlora":
            down = sum(RANKS[i] for i in ids) * per_rank
            assert row["server_time_s"] > 0
            # unicasts sharing the downlink band: sum_i bits_i / e_i / B
            unicast_s = sum(RANKS[i] * per_rank * bpv * 8 / e for i, e in zip(ids, eff)) / band
            assert row["download_time_s"] == pytest.approx(unicast_s, rel=1e-12)
        else:
            down = r * per_rank
        assert row["download_bytes"] == down * bpv
        if name != "flexlora" and ids:  # one broadcast at the weakest receiver's rate
            assert row["download_time_s"] == pytest.approx(down * bpv * 8 / (band * eff.min()), rel=1e-12)
        if name in ("fslora", "hetlora", "flora", "flexlora"):
            assert len(ids) == 2 and plan["ranks"] == RANKS
        prev = ids
    assert math.isfinite(rows[-1]["eval_mean"]) and math.isfinite(result["final_eval_mean"])
    assert result["method"] == name and result["rounds"] == 2
    if name == "flora":  # the stacked updates live in the base: merged, checkpointed, folded into adapter/
        assert setup.engine.base_delta()
        assert (out / "checkpoint" / "base_delta.safetensors").exists()
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["rank_pattern"]


def test_flora_resume_equals_uninterrupted(setup, tmp_path, killed_then_resumed):
    """FLoRA's pending broadcast (method state) and merged base (engine) survive a resume."""
    cfg = setup.cfg.model_copy(update={"method": "flora"})
    s = dataclasses.replace(setup, cfg=cfg)
    full = tmp_path / "full"
    simulate.run(cfg, full, setup=s, progress=False)

    killed = tmp_path / "killed"
    killed_then_resumed(cfg, killed, s, at_round=2)
    assert metric_rows(killed) == metric_rows(full)
    assert metric_rows(full)[2]["download_bytes"] > 0
