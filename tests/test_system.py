"""System model: profiles, channel, bandwidth allocation, round-time bound (docs/theory.md 1-2, docs/system.md)."""

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import spearmanr

from fedlora.system import (
    ClientProfile,
    ComputeModel,
    channel_profiles,
    downlink_time_s,
    equal_finish_allocation,
    equal_split_allocation,
    expected_max_compute_s,
    generate_profiles,
    path_loss_db,
    rayleigh_fading,
    round_time_bound_s,
    upload_s_hz,
)


# ---------------------------------------------------------------- compute model
def test_compute_model_linear_and_affine():
    lin = ComputeModel("linear")
    aff = ComputeModel("affine", fixed_fraction=0.4)
    assert lin.time_s(10.0, 0.5) == 5.0 and isinstance(lin.time_s(10.0, 0.5), float)
    assert aff.time_s(10.0, 0.5) == pytest.approx(10 * (0.4 + 0.6 * 0.5))
    assert aff.time_s(10.0, 1.0) == pytest.approx(10.0)  # full rank: the measured time
    out = aff.time_s(np.array([1.0, 2.0]), np.array([0.25, 1.0]))
    np.testing.assert_allclose(out, [0.4 + 0.6 * 0.25, 2.0])
    np.testing.assert_allclose(lin.time_s(np.array([1.0, 2.0]), 0.5), [0.5, 1.0])
    assert ComputeModel("affine", 0.0).time_s(3.0, 0.2) == pytest.approx(lin.time_s(3.0, 0.2))
    assert lin.to_dict() == {"kind": "linear"}
    assert aff.to_dict() == {"kind": "affine", "fixed_fraction": 0.4}
    assert ComputeModel.from_dict(aff.to_dict()) == aff
    for bad in [dict(kind="quadratic"), dict(kind="affine", fixed_fraction=1.5), dict(kind="linear", fixed_fraction=0.2)]:
        with pytest.raises(ValueError):
            ComputeModel(**bad)


def test_upload_s_hz():
    assert upload_s_hz(8e6, 4.0) == 2e6
    assert upload_s_hz(8e6, 4.0, ratio=0.25) == 5e5
    np.testing.assert_allclose(upload_s_hz(np.array([1e6, 2e6]), np.array([1.0, 2.0])), [1e6, 1e6])


# ---------------------------------------------------------------- generated profiles
@pytest.mark.parametrize("dist", ["lognormal", "uniform"])
def test_generate_profiles_deterministic_and_homogeneous(dist):
    kw = dict(seed=3, compute_time_s=2.0, compute_spread=0.5, bits_per_s_per_hz=4.0, link_spread=0.8, distribution=dist)
    a, b = generate_profiles(20, **kw), generate_profiles(20, **kw)
    assert a == b
    c = generate_profiles(20, **{**kw, "seed": 4})
    assert [p.compute_time_s for p in a] != [p.compute_time_s for p in c]
    assert [p.id for p in a] == list(range(20))
    homo = generate_profiles(7, **{**kw, "compute_spread": 0.0, "link_spread": 0.0})
    assert {p.compute_time_s for p in homo} == {2.0}
    assert {p.bits_per_s_per_hz for p in homo} == {4.0}
    # Changing one spread does not reshuffle the other quantity (fixed stream order).
    d = generate_profiles(20, **{**kw, "link_spread": 0.1})
    assert [p.compute_time_s for p in a] == [p.compute_time_s for p in d]


def test_generate_profiles_medians_and_ranges():
    n = 4001
    ln = generate_profiles(n, seed=0, compute_time_s=3.0, compute_spread=0.5, bits_per_s_per_hz=5.0, link_spread=1.0)
    assert np.median([p.compute_time_s for p in ln]) == pytest.approx(3.0, rel=0.05)
    assert np.median([p.bits_per_s_per_hz for p in ln]) == pytest.approx(5.0, rel=0.1)
    assert np.std(np.log([p.compute_time_s for p in ln])) == pytest.approx(0.5, rel=0.05)
    un = generate_profiles(n, seed=0, compute_time_s=3.0, compute_spread=1.0, bits_per_s_per_hz=5.0, link_spread=0.5,
                           distribution="uniform")
    c = np.array([p.compute_time_s for p in un])
    assert c.min() >= 1.5 and c.max() <= 6.0 and c.min() < 1.6 and c.max() > 5.9
    e = np.array([p.bits_per_s_per_hz for p in un])
    assert e.min() >= 5.0 / 1.5 and e.max() <= 7.5
    with pytest.raises(ValueError):
        generate_profiles(3, seed=0, compute_time_s=1.0, compute_spread=-1.0, bits_per_s_per_hz=1.0, link_spread=0.0)
    with pytest.raises(ValueError):
        generate_profiles(3, seed=0, compute_time_s=1.0, compute_spread=0.0, bits_per_s_per_hz=1.0, link_spread=0.0,
                          distribution="pareto")


def test_profile_to_dict():
    p = ClientProfile(3, 1.5, 2.5, {"device_flops": np.float64(1e12)})
    d = p.to_dict()
    assert d == {"id": 3, "compute_time_s": 1.5, "bits_per_s_per_hz": 2.5, "device_flops": 1e12}
    assert type(d["device_flops"]) is float


# ---------------------------------------------------------------- channel profiles
CH = dict(flops_per_round=1e13, device_flops_median=1e12, device_flops_spread=0.5, reference_bandwidth_hz=2e6)


def test_channel_profiles_geometry_and_consistency():
    profs = channel_profiles(3000, seed=11, **CH)
    d = np.array([p.extra["distance_m"] for p in profs])
    assert d.min() >= 10.0 and d.max() <= 500.0
    # Uniform over the disc: P(d <= R/2) ~ 1/4.
    assert np.mean(d <= 250.0) == pytest.approx((250**2 - 100) / (500**2 - 100), abs=0.03)
    for p in profs[:50]:
        x = p.extra
        assert x["path_loss_db"] == pytest.approx(128.1 + 37.6 * math.log10(x["distance_m"] / 1000))
        assert 10.0 <= x["tx_power_dbm"] <= 23.0
        assert p.bits_per_s_per_hz == pytest.approx(math.log2(1 + x["snr_linear"]))
        noise_dbm = -174 + 10 * math.log10(2e6)
        assert x["snr_db"] == pytest.approx(x["tx_power_dbm"] - x["path_loss_db"] - x["shadowing_db"] - noise_dbm)
        assert p.compute_time_s == pytest.approx(1e13 / x["device_flops"])
    eff = np.array([p.bits_per_s_per_hz for p in profs])
    assert np.all(eff > 0)
    # Efficiency falls with distance on average (shadowing blurs it, path loss dominates).
    # (Most users sit near the edge, where 8 dB shadowing and the 13 dB spread of transmit
    # power rival the path-loss differences, so the rank correlation is moderate.)
    assert spearmanr(d, eff)[0] < -0.45
    near, far = eff[d < 200].mean(), eff[d > 400].mean()
    assert near > far + 3.0
    edges = np.linspace(10.0, 500.0, 6)
    bin_means = [eff[(d >= lo) & (d < hi)].mean() for lo, hi in zip(edges[:-1], edges[1:])]
    assert np.all(np.diff(bin_means) < 0)
    assert np.median([p.extra["device_flops"] for p in profs]) == pytest.approx(1e12, rel=0.06)


def test_channel_profiles_deterministic_and_validated():
    a, b = channel_profiles(10, seed=5, **CH), channel_profiles(10, seed=5, **CH)
    assert a == b
    c = channel_profiles(10, seed=6, **CH)
    assert a != c
    assert path_loss_db(1000.0) == pytest.approx(128.1)
    assert channel_profiles(0, seed=0, **CH) == []
    with pytest.raises(ValueError):
        channel_profiles(3, seed=0, cell_radius_m=5.0, **CH)
    with pytest.raises(ValueError):
        channel_profiles(3, seed=0, tx_power_dbm=(23.0, 10.0), **CH)
    # More reference bandwidth -> more noise -> lower efficiency (same geometry, same seed).
    wide = channel_profiles(10, seed=5, **{**CH, "reference_bandwidth_hz": 2e7})
    assert all(w.bits_per_s_per_hz < p.bits_per_s_per_hz for w, p in zip(wide, a))


def test_rayleigh_fading():
    profs = channel_profiles(4, seed=1, **CH)
    eff = np.array([p.bits_per_s_per_hz for p in profs] + [3.0])
    snr = np.array([p.extra["snr_linear"] for p in profs] + [np.nan])  # last: no channel model
    draws = np.stack([rayleigh_fading(np.random.default_rng(s), eff, snr) for s in range(4000)])
    assert np.all(draws[:, -1] == 3.0)
    assert np.all(draws[:, :-1] >= 0)
    # Jensen: E[log2(1 + g SNR)] < log2(1 + SNR) when E[g] = 1, and the mean gain is 1.
    assert np.all(draws[:, :-1].mean(axis=0) < eff[:-1])
    a = rayleigh_fading(np.random.default_rng(0), eff, snr)
    b = rayleigh_fading(np.random.default_rng(0), eff, snr)
    assert np.array_equal(a, b)
    g = (2 ** draws[:, 0] - 1) / snr[0]
    assert g.mean() == pytest.approx(1.0, abs=4 / math.sqrt(4000))


# ---------------------------------------------------------------- allocation
def _brute_two(c, u, bw):
    f = lambda x: max(c[0] + u[0] / x, c[1] + u[1] / (bw - x))  # noqa: E731
    res = minimize_scalar(f, bounds=(0.0, bw), method="bounded", options={"xatol": 1e-13 * bw, "maxiter": 2000})
    return float(res.fun)


def _brute_three(c, u, bw):
    # min over b0 of max(t0(b0), best two-client split of the rest): both pieces are
    # monotone, so the outer function is unimodal and bounded Brent finds the minimum.
    f = lambda x: max(c[0] + u[0] / x, _brute_two(c[1:], u[1:], bw - x))  # noqa: E731
    res = minimize_scalar(f, bounds=(0.0, bw), method="bounded", options={"xatol": 1e-13 * bw, "maxiter": 2000})
    return float(res.fun)


def _random_instance(rng, n):
    c = rng.uniform(0.0, 3.0, n)
    u = 1e6 * rng.lognormal(0.0, 1.0, n)
    bw = 1e6 * rng.uniform(0.5, 5.0)
    return c, u, bw


def _check_equal_finish(c, u, bw, T, b):
    assert b.shape == c.shape and np.all(b > 0)
    assert b.sum() == pytest.approx(bw, rel=1e-12)
    np.testing.assert_allclose(c + u / b, T, rtol=1e-10)
    assert T > c.max()


def test_equal_finish_hand_computed():
    # 1/(T-1) + 1/(T-2) = 1  ->  T^2 - 5T + 5 = 0  ->  T = (5 + sqrt 5)/2
    T, b = equal_finish_allocation(np.array([1.0, 2.0]), np.array([1e6, 1e6]), 1e6)
    T_exact = (5 + math.sqrt(5)) / 2
    assert T == pytest.approx(T_exact, rel=1e-14)
    np.testing.assert_allclose(b, [1e6 / (T_exact - 1), 1e6 / (T_exact - 2)], rtol=1e-13)
    # Single client gets everything.
    T1, b1 = equal_finish_allocation(np.array([2.0]), np.array([3e6]), 1e6)
    assert T1 == pytest.approx(5.0) and np.array_equal(b1, [1e6])
    # Identical clients: same as equal split.
    T3, b3 = equal_finish_allocation(np.full(4, 1.0), np.full(4, 1e6), 2e6)
    assert T3 == pytest.approx(1 + 4 * 1e6 / 2e6) and np.allclose(b3, 5e5)
    assert T3 == pytest.approx(equal_split_allocation(np.full(4, 1.0), np.full(4, 1e6), 2e6)[0])


def test_equal_finish_edge_cases():
    T, b = equal_finish_allocation(np.array([]), np.array([]), 1e6)
    assert T == 0.0 and b.shape == (0,)
    T, b = equal_split_allocation(np.array([]), np.array([]), 1e6)
    assert T == 0.0 and b.shape == (0,)
    # Zero-upload clients: b = 0, they only bound T from below.
    T_exact = (5 + math.sqrt(5)) / 2
    T, b = equal_finish_allocation(np.array([5.0, 1.0, 2.0]), np.array([0.0, 1e6, 1e6]), 1e6)
    assert T == 5.0 and b[0] == 0.0 and b.sum() == pytest.approx(1e6)
    np.testing.assert_allclose(b[1:], [1e6 / (T_exact - 1), 1e6 / (T_exact - 2)], rtol=1e-13)
    T, b = equal_finish_allocation(np.array([0.5, 1.0, 2.0]), np.array([0.0, 1e6, 1e6]), 1e6)
    assert T == pytest.approx(T_exact, rel=1e-14) and b[0] == 0.0
    T, b = equal_finish_allocation(np.array([0.5, 3.0]), np.array([0.0, 0.0]), 1e6)
    assert T == 3.0 and np.array_equal(b, [0.0, 0.0])
    # Zero compute everywhere: T = sum u / B (all share the band, all finish together).
    T, b = equal_finish_allocation(np.zeros(3), np.array([1e6, 2e6, 3e6]), 1e6)
    assert T == pytest.approx(6.0) and np.allclose(b, [1e6 / 6, 2e6 / 6, 3e6 / 6])
    for bad in [(np.array([-1.0]), np.array([1.0]), 1.0), (np.array([1.0]), np.array([np.nan]), 1.0),
                (np.array([1.0]), np.array([1.0]), 0.0), (np.array([1.0, 2.0]), np.array([1.0]), 1.0)]:
        with pytest.raises(ValueError):
            equal_finish_allocation(*bad)


def test_equal_finish_is_well_conditioned_near_ties():
    # Compute times that differ by far less than T: T - t_cp must not cancel.
    c = np.array([1000.0, 1000.0 + 1e-9, 1000.0 + 2e-9])
    u = np.array([1.0, 2.0, 3.0])
    T, b = equal_finish_allocation(c, u, 1e6)
    gaps = T - c
    np.testing.assert_allclose(u / b, gaps, rtol=1e-6)
    assert b.sum() == pytest.approx(1e6, rel=1e-12)
    # Extreme spread of upload sizes.
    c = np.array([0.0, 1.0, 2.0])
    u = np.array([1e-6, 1e3, 1e9])
    T, b = equal_finish_allocation(c, u, 1e6)
    _check_equal_finish(c, u, 1e6, T, b)


@pytest.mark.parametrize("seed", range(12))
def test_equal_finish_matches_brute_force_two_clients(seed):
    rng = np.random.default_rng(seed)
    c, u, bw = _random_instance(rng, 2)
    T, b = equal_finish_allocation(c, u, bw)
    _check_equal_finish(c, u, bw, T, b)
    T_bf = _brute_two(c, u, bw)
    assert T <= T_bf * (1 + 1e-12)  # nothing beats it
    assert T == pytest.approx(T_bf, rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_equal_finish_matches_brute_force_three_clients(seed):
    rng = np.random.default_rng(100 + seed)
    c, u, bw = _random_instance(rng, 3)
    T, b = equal_finish_allocation(c, u, bw)
    _check_equal_finish(c, u, bw, T, b)
    T_bf = _brute_three(c, u, bw)
    assert T <= T_bf * (1 + 1e-12)
    assert T == pytest.approx(T_bf, rel=1e-6)


def test_equal_finish_optimal_against_random_splits_and_equal_split():
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        c, u, bw = _random_instance(rng, n)
        T, b = equal_finish_allocation(c, u, bw)
        _check_equal_finish(c, u, bw, T, b)
        T_split, b_split = equal_split_allocation(c, u, bw)
        assert b_split.sum() == pytest.approx(bw) and T_split == pytest.approx(np.max(c + u / b_split))
        assert T <= T_split * (1 + 1e-12)
        # Any other split on the simplex is no faster.
        other = rng.dirichlet(np.ones(n), size=20) * bw
        assert np.all(np.max(c + u / other, axis=1) >= T * (1 - 1e-12))


# ---------------------------------------------------------------- expectation and bound
def _enumerate_expected_max(c, q):
    total = 0.0
    for mask in itertools.product([0, 1], repeat=len(c)):
        m = np.array(mask, dtype=bool)
        prob = float(np.prod(np.where(m, q, 1 - q)))
        total += prob * (c[m].max() if m.any() else 0.0)
    return total


@pytest.mark.parametrize("seed", range(10))
def test_expected_max_compute_matches_enumeration_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    c = rng.integers(1, 4, n).astype(float)  # values in {1,2,3}: many ties
    q = rng.uniform(0, 1, n)
    q[rng.random(n) < 0.2] = 1.0
    q[rng.random(n) < 0.1] = 0.0
    assert expected_max_compute_s(c, q) == pytest.approx(_enumerate_expected_max(c, q), rel=1e-12, abs=1e-15)
    c2 = rng.uniform(0, 5, n)
    assert expected_max_compute_s(c2, q) == pytest.approx(_enumerate_expected_max(c2, q), rel=1e-12, abs=1e-15)


def test_expected_max_compute_simple_cases():
    assert expected_max_compute_s(np.array([]), np.array([])) == 0.0
    assert expected_max_compute_s(np.array([2.0, 5.0]), np.ones(2)) == 5.0
    assert expected_max_compute_s(np.array([2.0, 5.0]), np.zeros(2)) == 0.0
    # All tied at 3 with q = 0.5 each: 3 * P(S non-empty) = 3 * (1 - 0.25)
    assert expected_max_compute_s(np.array([3.0, 3.0]), np.array([0.5, 0.5])) == pytest.approx(2.25)
    with pytest.raises(ValueError):
        expected_max_compute_s(np.array([1.0]), np.array([1.5]))


@pytest.mark.parametrize("seed", range(3))
def test_round_time_bound_dominates_monte_carlo(seed):
    rng = np.random.default_rng(seed)
    n = 8
    c, u, bw = _random_instance(rng, n)
    q = rng.uniform(0.1, 1.0, n)
    bound = round_time_bound_s(c, u, q, bw)
    assert bound == pytest.approx(expected_max_compute_s(c, q) + float(np.sum(q * u)) / bw)
    rounds = 1500
    times = np.empty(rounds)
    per_round_bound = np.empty(rounds)
    for k in range(rounds):
        s = np.flatnonzero(rng.random(n) < q)
        times[k], _ = equal_finish_allocation(c[s], u[s], bw)
        per_round_bound[k] = (c[s].max() + u[s].sum() / bw) if s.size else 0.0
    # Per round: T <= max t_cp + sum t_cm / B (the step in the proof).
    assert np.all(times <= per_round_bound * (1 + 1e-12))
    se = times.std(ddof=1) / math.sqrt(rounds)
    assert times.mean() <= bound + 3 * se
    # The bound is exactly the expectation of the per-round bound (checks the formula).
    se_b = per_round_bound.std(ddof=1) / math.sqrt(rounds)
    assert abs(per_round_bound.mean() - bound) < 4 * se_b


def test_downlink_time_broadcast_at_weakest_then_unicasts_share_the_band():
    eff = np.array([4.0, 1.0, 2.0])
    # broadcast 8e5 bits at min e = 1 over 2e5 Hz: 4 s; unicasts 4e5, 1e5, 2e5 bits: (1e5 + 1e5 + 1e5) / 2e5 = 1.5 s
    assert downlink_time_s(8e5, [4e5, 1e5, 2e5], eff, 2e5) == pytest.approx(4.0 + 1.5)
    assert downlink_time_s(8e5, 0.0, eff[[0, 2]], 2e5) == pytest.approx(8e5 / (2e5 * 2.0))
    assert downlink_time_s(8e5, [], np.zeros(0), 2e5) == 0.0  # nobody to send to
    # the unicast term is the equal-finish split of the band (no compute), the best split
    bits = np.array([3e5, 5e4, 7e5])
    t_eq, _ = equal_finish_allocation(np.zeros(3), bits / eff, 2e5)
    assert downlink_time_s(0.0, bits, eff, 2e5) == pytest.approx(t_eq)
    with pytest.raises(ValueError):
        downlink_time_s(1.0, [1.0], [0.0], 2e5)
    with pytest.raises(ValueError):
        downlink_time_s(1.0, [1.0], [1.0], 0.0)

