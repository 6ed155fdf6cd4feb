"""Rank sketching: counts, uniform subsets, unbiasedness of the sketch (docs/theory.md section 0)."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2, norm

from fedlora.sketch import (
    payload_bits,
    payload_values,
    rank_count,
    sample_rank_indices,
    sketch_diagonal,
    sketch_scale,
    slice_ranks,
)


# ---------------------------------------------------------------- rank_count
@pytest.mark.parametrize(
    "ratio, rank, expected",
    [
        (0.3, 10, 3),
        (0.1, 30, 3),
        (0.28, 25, 7),  # 0.28 * 25 == 7.000000000000001: plain ceil would give 8
        (0.14, 50, 7),  # 7.000000000000001
        (0.56, 50, 28),  # 28.000000000000004
        (0.29, 100, 29),  # 28.999999999999996 (must not floor below either)
        (1 / 49, 49, 1),  # 0.9999999999999999
        (1 / 3, 3, 1),
        (1 / 7, 7, 1),
        (2 / 3, 3, 2),
        (0.25, 10, 3),  # 2.5 -> ceil 3
        (0.26, 10, 3),
        (0.31, 10, 4),  # genuinely above 3
        (0.05, 8, 1),  # 0.4 -> ceil 1
        (1e-9, 64, 1),  # clamp to at least one rank
        (1.0, 8, 8),
        (1.0, 1, 1),
    ],
)
def test_rank_count_edge_cases(ratio, rank, expected):
    assert rank_count(ratio, rank) == expected


def test_float_trap_is_real():
    # The cases above are not hypothetical: a plain ceil gets them wrong.
    assert math.ceil(0.28 * 25) == 8 and math.ceil(0.56 * 50) == 29


def test_rank_count_round_trips_the_planner_grid():
    # The planner picks s in {1/r, ..., 1}; every grid point must map back to its k.
    for r in range(1, 257):
        for k in range(1, r + 1):
            assert rank_count(k / r, r) == k, (k, r)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.0000001, 2.0, float("nan"), float("inf")])
def test_rank_count_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError):
        rank_count(ratio, 8)


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_rank_count_rejects_bad_rank(rank):
    with pytest.raises(ValueError):
        rank_count(0.5, rank)


# ---------------------------------------------------------------- indices / scale / slices
def test_sample_rank_indices_sorted_unique_int64():
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = sample_rank_indices(rng, 16, 5)
        assert idx.dtype == np.int64 and idx.shape == (5,)
        assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 16
    assert np.array_equal(sample_rank_indices(rng, 6, 6), np.arange(6))
    with pytest.raises(ValueError):
        sample_rank_indices(rng, 4, 0)
    with pytest.raises(ValueError):
        sample_rank_indices(rng, 4, 5)


def test_sample_rank_indices_every_subset_equally_likely():
    rng = np.random.default_rng(1)
    r, k, draws = 5, 2, 20000
    subsets = list(itertools.combinations(range(r), k))
    counts = dict.fromkeys(subsets, 0)
    for _ in range(draws):
        counts[tuple(sample_rank_indices(rng, r, k).tolist())] += 1
    obs = np.array(list(counts.values()), dtype=float)
    exp = draws / len(subsets)
    stat = float(np.sum((obs - exp) ** 2 / exp))
    assert stat < chi2.ppf(1 - 1e-4, df=len(subsets) - 1)


def test_sample_rank_indices_deterministic_per_seed():
    a = [sample_rank_indices(np.random.default_rng(7), 32, 9) for _ in range(2)]
    assert np.array_equal(a[0], a[1])


def test_sketch_scale_and_diagonal():
    assert sketch_scale(8, 2) == 4.0
    assert sketch_scale(10, 3) == pytest.approx(10 / 3)
    d = sketch_diagonal(4, [1, 3])
    assert np.array_equal(d, [0.0, 2.0, 0.0, 2.0])
    with pytest.raises(ValueError):
        sketch_diagonal(4, [3, 1])  # not sorted
    with pytest.raises(ValueError):
        sketch_diagonal(4, [1, 4])  # out of range


def test_slice_ranks_shapes_values_and_clones():
    A = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # [r=4, in=3]
    B = torch.arange(8, dtype=torch.float32).reshape(2, 4)  # [out=2, r=4]
    a, b = slice_ranks(A, B, np.array([0, 2]))
    assert torch.equal(a, torch.tensor([[0.0, 1, 2], [6, 7, 8]]))
    assert torch.equal(b, torch.tensor([[0.0, 2], [4, 6]]))
    a += 100
    b += 100
    assert A[0, 0] == 0 and B[0, 0] == 0  # originals untouched
    with pytest.raises(ValueError):
        slice_ranks(A, B.T, [0])  # mismatched r


def test_slice_ranks_product_equals_masked_product():
    # B[:, I] A[I, :] * (r/k) == B diag(S) A : slicing is the sketch, not an approximation.
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 5, generator=g, dtype=torch.float64)
    B = torch.randn(4, 6, generator=g, dtype=torch.float64)
    idx = np.array([1, 4, 5])
    a, b = slice_ranks(A, B, idx)
    S = torch.diag(torch.as_tensor(sketch_diagonal(6, idx)))
    torch.testing.assert_close(b @ a * sketch_scale(6, 3), B @ S @ A)


# ---------------------------------------------------------------- payload
def test_payload_values_hand_computed():
    shapes = {"q_proj": (4, 8), "v_proj": (4, 6)}
    # k=3: 3*(4+8) + 3*(4+6) = 36 + 30 = 66
    assert payload_values(shapes, 3) == 66
    assert payload_values(shapes, 0) == 0
    assert payload_values({}, 5) == 0
    assert payload_values({"m": (768, 768)}, 8) == 8 * 1536
    assert payload_bits(shapes, 3, bytes_per_value=2) == 66 * 2 * 8
    assert payload_bits(shapes, 3) == 66 * 4 * 8


# ---------------------------------------------------------------- Monte Carlo E[S] = I
def _max_z(samples: np.ndarray, target: np.ndarray) -> float:
    """Largest |z| over coordinates of the sample mean vs target (samples along axis 0)."""
    m = samples.shape[0]
    mean = samples.mean(axis=0)
    se = samples.std(axis=0, ddof=1) / math.sqrt(m)
    assert np.all(se > 0), "degenerate test: zero variance"
    return float(np.max(np.abs(mean - target) / se))


def _bonferroni_z(num_tests: int, alpha: float = 1e-3) -> float:
    # Family-wise two-sided level alpha; at least the "3 standard errors" of the brief.
    return max(3.0, float(norm.ppf(1 - alpha / (2 * num_tests))))


def _draw_diagonals(rng, r, k, m, sampler=sample_rank_indices, scale=None):
    D = np.zeros((m, r))
    for t in range(m):
        idx = sampler(rng, r, k)
        D[t, idx] = sketch_scale(r, k) if scale is None else scale
    return D


def test_sketch_diagonal_is_unbiased_monte_carlo():
    r, k, m = 8, 3, 20000
    rng = np.random.default_rng(123)
    D = _draw_diagonals(rng, r, k, m)
    crit = _bonferroni_z(r)
    assert _max_z(D, np.ones(r)) < crit
    # Exact variance per coordinate is r/k - 1; the sample must agree (sanity of the SE).
    np.testing.assert_allclose(D.var(axis=0), r / k - 1, rtol=0.05)

    # Power: the same check rejects a biased sketch (no r/k rescaling, or always the
    # first k ranks), so passing above is not trivial.
    biased_scale = _draw_diagonals(rng, r, k, m, scale=1.0)
    assert _max_z(biased_scale, np.ones(r)) > 10 * crit

    def first_k_plus_noise(rng_, r_, k_):  # keeps rank 0 always, the rest uniformly
        rest = rng_.choice(np.arange(1, r_), size=k_ - 1, replace=False)
        return np.sort(np.concatenate([[0], rest]))

    biased_choice = _draw_diagonals(rng, r, k, m, sampler=first_k_plus_noise)
    assert _max_z(biased_choice, np.ones(r)) > 3 * crit


def test_sketched_product_is_unbiased_monte_carlo():
    r, k, m = 6, 2, 20000
    rng = np.random.default_rng(2024)
    B = rng.standard_normal((3, r))
    A = rng.standard_normal((r, 4))
    D = _draw_diagonals(rng, r, k, m)
    prods = np.einsum("oj,mj,ji->moi", B, D, A).reshape(m, -1)
    target = (B @ A).reshape(-1)
    crit = _bonferroni_z(target.size)
    assert _max_z(prods, target) < crit

    # Also through the real slicing path for a few draws: same numbers as the diagonal.
    At, Bt = torch.as_tensor(A), torch.as_tensor(B)
    for _ in range(5):
        idx = sample_rank_indices(rng, r, k)
        a, b = slice_ranks(At, Bt, idx)
        np.testing.assert_allclose((b @ a).numpy() * sketch_scale(r, k), B @ np.diag(sketch_diagonal(r, idx)) @ A)

    # Power: without the r/k scale the mean product is (k/r) B A, which the test detects.
    unscaled = prods * (k / r)
    assert _max_z(unscaled, target) > crit
