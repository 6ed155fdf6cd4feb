"""Online estimator (fedlora.online) against closed-form truth on synthetic clients.

Clients hold fixed per-rank updates Delta_i (r blocks of d values). Each round they join
with their own q_i and send a fresh uniform k_i-subset of the ranks: the ideal sketch of
local SGD (kept ranks scaled by r / k: unbiased, energy ratio r / k) or the sketch of a
scale-invariant local optimizer (kept ranks as they are: retention k / r, energy ratio
k / r). The estimator sees only the Gram matrices of what was sent; what it estimates is
computable exactly from the Delta_i, and the variances are checked by Monte Carlo.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlora.online import (STEP_RATIO_PRIOR, STEP_RATIO_PRIOR_PAIRS, STEP_RATIO_RANGE, OnlineEstimator,
                            RoundObservation, energy_exponent_for)
from fedlora.planner import PlanProblem, plan
from fedlora.system import ComputeModel

N, R, D = 5, 4, 6


def synthetic(seed=0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(N, 2.0))
    shared = rng.normal(size=(R, D))
    delta = np.stack([shared + 1.5 * rng.normal(size=(R, D)) for _ in range(N)])  # heterogeneous clients
    q = np.array([1.0, 0.8, 0.5, 0.3, 0.6])
    k = np.array([4, 2, 3, 1, 4])
    return p, delta, q, k


def rounds(p, delta, q, k, *, sgd: bool, count: int, seed=1):
    """Yield (observation, debiased aggregate U') for `count` rounds."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        joined = np.flatnonzero(rng.random(N) < q)
        sent = []
        for i in joined:
            mask = np.zeros(R)
            mask[rng.choice(R, size=k[i], replace=False)] = 1.0
            scale = R / k[i] if sgd else 1.0
            sent.append((scale * mask[:, None] * delta[i]).ravel())
        u = np.array(sent).reshape(len(joined), R * D)
        obs = RoundObservation(clients=joined, ranks=k[joined], participation_prob=q[joined], gram=u @ u.T)
        retention = 1.0 if sgd else k[joined] / R
        agg = ((p[joined] / q[joined] / retention)[:, None] * u).sum(0) if len(joined) else np.zeros(R * D)
        yield obs, agg


@pytest.mark.parametrize("sgd", [True, False])
def test_estimator_recovers_energies_signal_and_variances(sgd):
    p, delta, q, k = synthetic()
    est = OnlineEstimator(p, R, energy_exponent=energy_exponent_for("sgd" if sgd else "adamw"), smoothing=None)
    aggs = []
    for obs, agg in rounds(p, delta, q, k, sgd=sgd, count=20000):
        est.observe(obs)
        aggs.append(agg)
    flat = delta.reshape(N, -1)
    m_true = np.sum(flat ** 2, axis=1)
    mean_true = p @ flat
    np.testing.assert_allclose(est.client_energy(), m_true, rtol=0.03)
    assert est.signal() == pytest.approx(float(mean_true @ mean_true), rel=0.05)
    # closed-form variances of the debiased aggregate = Monte Carlo
    samp, sk = est.variances(q, k / R)
    np.testing.assert_allclose(samp, p ** 2 * m_true * (1 / q - 1), rtol=0.03)
    np.testing.assert_allclose(sk, p ** 2 * m_true * (R / k - 1) / q, rtol=0.03)
    aggs = np.array(aggs)
    np.testing.assert_allclose(aggs.mean(0), mean_true, atol=0.05 * np.abs(mean_true).max())
    mc_var = float(np.sum(aggs.var(axis=0)))
    assert samp.sum() + sk.sum() == pytest.approx(mc_var, rel=0.05)
    assert est.noise_to_signal(q, k / R) == pytest.approx(mc_var / float(mean_true @ mean_true), rel=0.08)


def test_sampling_and_sketch_split_against_monte_carlo_per_client():
    """Per client: the variance of its own term (p_i / q_i) 1_i u_i is sampling + sketch, and
    without the sketch (k = r) only the sampling part remains."""
    p, delta, q, k = synthetic(3)
    est = OnlineEstimator(p, R, energy_exponent=-1.0, smoothing=None)
    rng = np.random.default_rng(5)
    i = 2
    terms, terms_full = [], []
    for _ in range(40000):
        on = rng.random() < q[i]
        mask = np.zeros(R)
        mask[rng.choice(R, size=k[i], replace=False)] = 1.0
        terms.append(on * p[i] / q[i] * (R / k[i]) * (mask[:, None] * delta[i]).ravel())
        terms_full.append(on * p[i] / q[i] * delta[i].ravel())
    for obs, _ in rounds(p, delta, q, k, sgd=True, count=5000):
        est.observe(obs)
    samp, sk = est.variances(q, k / R)
    assert samp[i] == pytest.approx(float(np.sum(np.var(terms_full, axis=0))), rel=0.05)
    assert samp[i] + sk[i] == pytest.approx(float(np.sum(np.var(terms, axis=0))), rel=0.05)


def test_state_round_trips_through_json_exactly():
    p, delta, q, k = synthetic(1)
    a = OnlineEstimator(p, R, energy_exponent=1.0)
    b = OnlineEstimator(p, R, energy_exponent=1.0)
    stream = list(rounds(p, delta, q, k, sgd=False, count=40, seed=9))
    for obs, _ in stream[:20]:
        a.observe(obs)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for obs, _ in stream[20:]:
        a.observe(obs)
        b.observe(obs)
    assert a.state_dict() == b.state_dict()
    np.testing.assert_array_equal(a.relative_energy(), b.relative_energy())


def test_rounds_model_is_the_fixed_step_form_and_plans():
    p, delta, q, k = synthetic(2)
    est = OnlineEstimator(p, R, energy_exponent=-1.0, sketch_exponent=1.4)
    # before any update: every client's update taken as orthogonal to the others' (omega = 1 / sum p^2)
    np.testing.assert_allclose(est.relative_energy(), 1.0 / np.sum(p ** 2))
    assert est.step_ratio() == STEP_RATIO_PRIOR
    for obs, _ in rounds(p, delta, q, k, sgd=True, count=30):
        est.observe(obs)
    est.observe_step(0.4, 0.3)
    prior_pairs = STEP_RATIO_PRIOR_PAIRS
    rho = (prior_pairs * STEP_RATIO_PRIOR + (1 - 0.4 * 1.3) / (2 * 1.3)) / (prior_pairs + 1)
    assert est.step_ratio() == pytest.approx(rho)
    model = est.rounds_model()
    assert model.delta == 0 and model.denominator_sketch_exponent == 1.4
    s = k / R
    nu = est.noise_to_signal(q, s)
    assert model.value(q, s, p) == pytest.approx((1 - rho) / (1 - rho * (1 + nu)), rel=1e-12)
    assert model.value(np.ones(N), np.ones(N), p) == pytest.approx(1.0)
    pr = PlanProblem(p, [3.0, 9.0, 4.0, 20.0, 5.0], [1.0, 2.0, 8.0, 1.0, 0.5], 1.0, R, ComputeModel("linear"),
                     model, min_participation=0.05, pin_large_clients=True)
    pl = plan(pr)
    assert np.all(pl.participation_prob >= 0.05) and np.all(pl.participation_prob <= 1)
    assert np.isfinite(model.value(pl.participation_prob, pl.sketch_ratio, p))


@pytest.mark.parametrize("rho,nu", [(0.1, 0.5), (0.3, 2.0), (0.05, 0.0), (0.4, 0.2)])
def test_step_ratio_is_recovered_from_consecutive_updates(rho, nu):
    """Fixed-step descent on a quadratic f(x) = lam ||x||^2 / 2 with noisy rounds: the mean update is
    D(x) = -eta grad f(x), the applied one A = D + xi with E||xi||^2 = nu ||D||^2, so rho = eta lam / 2.
    The running mean of the per-pair estimates over 300 rounds recovers it (Monte Carlo)."""
    rng = np.random.default_rng(7)
    dim, eta_lam = 3000, 2 * rho
    est = OnlineEstimator(np.full(3, 1 / 3), 4, energy_exponent=1.0, smoothing=None)
    x, last = rng.normal(size=dim), None
    for _ in range(300):
        d = -eta_lam * x
        a = d + rng.normal(scale=np.sqrt(nu / dim) * np.linalg.norm(d), size=dim)
        if last is not None:
            est.observe_step(float(last @ a / (last @ last)), nu)
        x, last = x + a, a
        scale = 1 / np.linalg.norm(x)  # f is quadratic: rescaling x and the last update together changes no ratio
        x, last = x * scale, last * scale
    assert est.step_pairs == 299
    assert est.step == pytest.approx(rho, abs=0.01)  # the prior's weight is gone after 299 pairs


def test_step_ratio_stays_in_range_and_survives_a_checkpoint():
    est = OnlineEstimator(np.full(2, 0.5), 4, energy_exponent=1.0, smoothing=None)
    for _ in range(50):
        est.observe_step(1.5, 0.0)  # updates growing along themselves: outside the model, rho_t < 0
    low = STEP_RATIO_RANGE[0]  # each pair clipped, then averaged with the prior
    assert est.step_ratio() == pytest.approx((STEP_RATIO_PRIOR_PAIRS * STEP_RATIO_PRIOR + 50 * low)
                                             / (STEP_RATIO_PRIOR_PAIRS + 50))
    est.observe_step(-0.99, 0.0)
    copy = OnlineEstimator(np.full(2, 0.5), 4, energy_exponent=1.0)
    copy.load_state_dict(json.loads(json.dumps(est.state_dict())))
    assert copy.step == est.step and copy.step_pairs == 51


def test_unseen_clients_take_the_mean_and_an_empty_round_counts():
    p = np.array([0.5, 0.3, 0.2])
    est = OnlineEstimator(p, 2, energy_exponent=-1.0, smoothing=None)
    est.observe(RoundObservation(clients=np.array([0, 1]), ranks=np.array([2, 2]),
                                 participation_prob=np.array([1.0, 1.0]), gram=np.array([[4.0, 1.0], [1.0, 2.0]])))
    m = est.client_energy()
    assert m[2] == pytest.approx((0.5 * 4 + 0.3 * 2) / 0.8)
    assert est.cross == pytest.approx(2 * 0.5 * 0.3 * 1.0)
    est.observe(RoundObservation(clients=np.array([], dtype=int), ranks=np.array([], dtype=int),
                                 participation_prob=np.array([]), gram=np.zeros((0, 0))))
    assert est.rounds == 2 and est.cross == pytest.approx(0.5 * 2 * 0.5 * 0.3)
