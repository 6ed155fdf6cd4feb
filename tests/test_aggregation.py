"""Unbiased aggregation under independent sampling (docs/theory.md section 0)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fedlora.aggregation import (
    SketchedUpdate,
    apply_update,
    is_finite_update,
    sample_participants,
    scatter_sum,
    unbiased_weights,
)

T = torch.float64


def t(x):
    return torch.tensor(x, dtype=T)


# r = 4, in = 2, out = 3, one module "m" (plus a 1x1 rank-4 module "n" to check that several
# modules are handled independently).
P = np.array([0.5, 0.3, 0.2])  # data shares
Q = np.array([0.5, 0.6, 0.8])  # participation probabilities -> weights 1.0, 0.5, 0.25


def _state():
    return {
        "m": (torch.ones(4, 2, dtype=T), torch.ones(3, 4, dtype=T)),
        "n": (torch.zeros(4, 1, dtype=T), torch.zeros(1, 4, dtype=T)),
    }


def _updates(weights):
    return [
        SketchedUpdate(
            client_id=0,
            rank_indices=np.array([0, 2]),
            delta={
                "m": (t([[1, 2], [3, 4]]), t([[1, 0], [0, 1], [1, 1]])),
                "n": (t([[1], [1]]), t([[2, 2]])),
            },
            weight=weights[0],
        ),
        SketchedUpdate(
            client_id=1,
            rank_indices=np.array([1, 2]),  # overlaps client 0 on rank 2
            delta={
                "m": (t([[2, 2], [4, 0]]), t([[2, 0], [0, 2], [2, 2]])),
                "n": (t([[2], [2]]), t([[4, 4]])),
            },
            weight=weights[1],
        ),
        SketchedUpdate(
            client_id=2,
            rank_indices=np.array([0, 3]),  # overlaps client 0 on rank 0
            delta={
                "m": (t([[4, 8], [4, 4]]), t([[4, 0], [0, 4], [8, 8]])),
                "n": (t([[4], [4]]), t([[8, 8]])),
            },
            weight=weights[2],
        ),
    ]


def test_unbiased_weights_hand_computed():
    w = unbiased_weights(P, Q, [0, 1, 2])
    assert w == pytest.approx({0: 1.0, 1: 0.5, 2: 0.25})
    assert unbiased_weights(P, Q, []) == {}
    assert unbiased_weights(P, Q, [2]) == pytest.approx({2: 0.25})
    with pytest.raises(ValueError):
        unbiased_weights(P, np.array([0.5, 0.0, 0.8]), [1])  # sampled with q = 0
    with pytest.raises(ValueError):
        unbiased_weights(P, Q, [0, 0])
    with pytest.raises(ValueError):
        unbiased_weights(P, Q, [3])


def test_scatter_sum_three_clients_hand_computed():
    w = unbiased_weights(P, Q, [0, 1, 2])
    agg = scatter_sum(_state(), _updates([w[0], w[1], w[2]]))
    # A (rows = ranks):
    #   rank 0: 1.0*[1,2] + 0.25*[4,8] = [2,4]
    #   rank 1: 0.5*[2,2]              = [1,1]
    #   rank 2: 1.0*[3,4] + 0.5*[4,0]  = [5,4]
    #   rank 3: 0.25*[4,4]             = [1,1]
    expected_A = t([[2, 4], [1, 1], [5, 4], [1, 1]])
    # B (columns = ranks):
    #   col 0: 1.0*[1,0,1] + 0.25*[4,0,8] = [2,0,3]
    #   col 1: 0.5*[2,0,2]                = [1,0,1]
    #   col 2: 1.0*[0,1,1] + 0.5*[0,2,2]  = [0,2,2]
    #   col 3: 0.25*[0,4,8]               = [0,1,2]
    expected_B = t([[2, 1, 0, 0], [0, 0, 2, 1], [3, 1, 2, 2]])
    torch.testing.assert_close(agg["m"][0], expected_A)
    torch.testing.assert_close(agg["m"][1], expected_B)
    # module n: A rank0 1*1+0.25*4=2, rank1 0.5*2=1, rank2 1*1+0.5*2=2, rank3 0.25*4=1
    #           B col0 1*2+0.25*8=4, col1 0.5*4=2, col2 1*2+0.5*4=4, col3 0.25*8=2
    torch.testing.assert_close(agg["n"][0], t([[2], [1], [2], [1]]))
    torch.testing.assert_close(agg["n"][1], t([[4, 2, 4, 2]]))

    # Apply with server lr 0.5 on the all-ones state; the input state is not modified.
    state = _state()
    new = apply_update(state, agg, server_lr=0.5)
    torch.testing.assert_close(new["m"][0], 1 + 0.5 * expected_A)
    torch.testing.assert_close(new["m"][1], 1 + 0.5 * expected_B)
    assert torch.equal(state["m"][0], torch.ones(4, 2, dtype=T))
    assert new["m"][0] is not state["m"][0]


def test_scatter_sum_subset_round_no_division_by_participants():
    # Only clients 0 and 2 sampled: weights stay p_i / q_i (1.0 and 0.25), NOT divided by |S| = 2.
    w = unbiased_weights(P, Q, [0, 2])
    ups = _updates([1.0, 0.5, 0.25])
    agg = scatter_sum(_state(), [ups[0], ups[2]])
    assert w == pytest.approx({0: 1.0, 2: 0.25})
    #   rank 0: [1,2] + 0.25*[4,8] = [2,4]; rank 1: 0; rank 2: [3,4]; rank 3: 0.25*[4,4] = [1,1]
    torch.testing.assert_close(agg["m"][0], t([[2, 4], [0, 0], [3, 4], [1, 1]]))
    #   col 0: [1,0,1] + 0.25*[4,0,8] = [2,0,3]; col 1: 0; col 2: [0,1,1]; col 3: [0,1,2]
    torch.testing.assert_close(agg["m"][1], t([[2, 0, 0, 0], [0, 0, 1, 1], [3, 0, 1, 2]]))


def test_empty_round_gives_zeros_and_unchanged_state():
    state = _state()
    agg = scatter_sum(state, [])
    for name, (A, B) in state.items():
        assert torch.count_nonzero(agg[name][0]) == 0 and agg[name][0].shape == A.shape
        assert torch.count_nonzero(agg[name][1]) == 0 and agg[name][1].shape == B.shape
    new = apply_update(state, agg)
    for name in state:
        torch.testing.assert_close(new[name][0], state[name][0])
        torch.testing.assert_close(new[name][1], state[name][1])
        assert new[name][0] is not state[name][0]


def test_scatter_sum_validation():
    state = _state()
    u = _updates([1.0, 1.0, 1.0])[0]
    bad_idx = SketchedUpdate(0, np.array([2, 0]), u.delta, 1.0)
    with pytest.raises(ValueError):
        scatter_sum(state, [bad_idx])
    out_of_range = SketchedUpdate(0, np.array([0, 4]), u.delta, 1.0)
    with pytest.raises(ValueError):
        scatter_sum(state, [out_of_range])
    wrong_k = SketchedUpdate(0, np.array([0, 1, 2]), u.delta, 1.0)
    with pytest.raises(ValueError):
        scatter_sum(state, [wrong_k])
    missing = SketchedUpdate(0, np.array([0, 2]), {"m": u.delta["m"]}, 1.0)
    with pytest.raises(ValueError):
        scatter_sum(state, [missing])
    nan = SketchedUpdate(0, np.array([0, 2]), {**u.delta, "m": (u.delta["m"][0] * float("nan"), u.delta["m"][1])}, 1.0)
    assert not is_finite_update(nan)
    assert is_finite_update(u)
    assert not is_finite_update(SketchedUpdate(0, u.rank_indices, u.delta, float("inf")))
    with pytest.raises(ValueError):
        scatter_sum(state, [nan])


def test_low_precision_state_accumulates_in_float32():
    state = {"m": (torch.zeros(4, 2, dtype=torch.bfloat16), torch.zeros(3, 4, dtype=torch.bfloat16))}
    u = SketchedUpdate(0, np.array([1]), {"m": (torch.full((1, 2), 1e-3), torch.full((3, 1), 1e-3))}, 1.0)
    agg = scatter_sum(state, [u] * 1000)
    assert agg["m"][0].dtype == torch.float32
    assert agg["m"][0][1, 0].item() == pytest.approx(1.0, rel=1e-4)
    new = apply_update(state, agg)
    assert new["m"][0].dtype == torch.bfloat16


# ---------------------------------------------------------------- sampling
def test_sample_participants_basic():
    rng = np.random.default_rng(0)
    q = np.array([0.0, 1.0, 0.5, 1.0, 0.0])
    seen_empty_possible = sample_participants(np.random.default_rng(1), np.zeros(3))
    assert seen_empty_possible.size == 0 and seen_empty_possible.dtype == np.int64
    counts = np.zeros(5)
    for _ in range(2000):
        s = sample_participants(rng, q)
        assert np.all(np.diff(s) > 0)
        counts[s] += 1
    assert counts[0] == 0 and counts[4] == 0 and counts[1] == 2000 and counts[3] == 2000
    assert abs(counts[2] / 2000 - 0.5) < 4 * math.sqrt(0.25 / 2000)
    with pytest.raises(ValueError):
        sample_participants(rng, np.array([0.5, 1.5]))
    a = sample_participants(np.random.default_rng(9), np.full(50, 0.3))
    b = sample_participants(np.random.default_rng(9), np.full(50, 0.3))
    assert np.array_equal(a, b)


def _bonferroni_z(num_tests: int, alpha: float = 1e-3) -> float:
    return max(3.0, float(norm.ppf(1 - alpha / (2 * num_tests))))


def _flatten(state) -> np.ndarray:
    return np.concatenate([torch.cat([A.reshape(-1), B.reshape(-1)]).numpy() for A, B in state.values()])


def test_independent_sampling_is_unbiased_and_dividing_by_S_is_not():
    rng = np.random.default_rng(42)
    n, r, fan_in, fan_out = 5, 6, 3, 2
    shapes = {"m": (torch.zeros(r, fan_in, dtype=T), torch.zeros(fan_out, r, dtype=T))}
    p = rng.dirichlet(np.ones(n))
    q = np.array([0.15, 0.4, 0.6, 0.85, 1.0])
    ks = [2, 3, 1, 6, 4]
    # Fixed per-client sketches and deltas (different rank subsets per client).
    base = []
    for i in range(n):
        idx = np.sort(rng.choice(r, size=ks[i], replace=False))
        delta = {"m": (torch.as_tensor(rng.standard_normal((ks[i], fan_in))),
                       torch.as_tensor(rng.standard_normal((fan_out, ks[i]))))}
        base.append(SketchedUpdate(i, idx, delta, 1.0))

    target = _flatten(scatter_sum(shapes, [SketchedUpdate(u.client_id, u.rank_indices, u.delta, p[u.client_id])
                                           for u in base]))
    rounds = 4000
    unbiased = np.empty((rounds, target.size))
    div_by_s = np.empty((rounds, target.size))
    empty_rounds = 0
    for t_ in range(rounds):
        sampled = sample_participants(rng, q)
        w = unbiased_weights(p, q, sampled)
        ups = [SketchedUpdate(i, base[i].rank_indices, base[i].delta, w[i]) for i in sampled.tolist()]
        unbiased[t_] = _flatten(scatter_sum(shapes, ups))
        div_by_s[t_] = unbiased[t_] / max(len(sampled), 1)
        empty_rounds += len(sampled) == 0
    assert empty_rounds == 0  # client 4 has q = 1; the MC has no degenerate rounds

    nz = np.abs(target) > 0
    assert nz.sum() >= 10  # the check covers many coordinates
    crit = _bonferroni_z(int(nz.sum()))
    mean = unbiased[:, nz].mean(axis=0)
    se = unbiased[:, nz].std(axis=0, ddof=1) / math.sqrt(rounds)
    assert np.max(np.abs(mean - target[nz]) / se) < crit

    # Coordinates nobody trains stay exactly zero.
    assert np.all(unbiased[:, ~nz] == 0)

    # The known bug (divide by |S|) is detected by the same test: it has power.
    mean_b = div_by_s[:, nz].mean(axis=0)
    se_b = div_by_s[:, nz].std(axis=0, ddof=1) / math.sqrt(rounds)
    assert np.max(np.abs(mean_b - target[nz]) / se_b) > 3 * crit


def test_empty_rounds_possible_and_unbiased_with_them():
    # With small q, empty rounds happen; they contribute zero and the estimator stays unbiased.
    rng = np.random.default_rng(5)
    q = np.array([0.1, 0.2])
    p = np.array([0.7, 0.3])
    shapes = {"m": (torch.zeros(2, 1, dtype=T), torch.zeros(1, 2, dtype=T))}
    deltas = [{"m": (t([[1.0]]), t([[2.0]]))}, {"m": (t([[3.0], [1.0]]), t([[1.0, -1.0]]))}]
    idxs = [np.array([0]), np.array([0, 1])]
    target = _flatten(scatter_sum(shapes, [SketchedUpdate(i, idxs[i], deltas[i], p[i]) for i in range(2)]))
    rounds, empties = 8000, 0
    acc = np.empty((rounds, target.size))
    for k in range(rounds):
        s = sample_participants(rng, q)
        empties += s.size == 0
        w = unbiased_weights(p, q, s)
        acc[k] = _flatten(scatter_sum(shapes, [SketchedUpdate(i, idxs[i], deltas[i], w[i]) for i in s.tolist()]))
    assert empties / rounds == pytest.approx(0.9 * 0.8, abs=0.02)
    se = acc.std(axis=0, ddof=1) / math.sqrt(rounds)
    assert np.max(np.abs(acc.mean(axis=0) - target) / se) < _bonferroni_z(target.size)
