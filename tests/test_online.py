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

from fedlora.online import OnlineEstimator, RoundObservation, energy_exponent_for
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


def test_rounds_model_is_one_plus_noise_to_signal_and_plans():
    p, delta, q, k = synthetic(2)
    est = OnlineEstimator(p, R, energy_exponent=-1.0, sketch_exponent=1.4)
    # before any update: every client's update taken as orthogonal to the others' (omega = 1 / sum p^2)
    np.testing.assert_allclose(est.relative_energy(), 1.0 / np.sum(p ** 2))
    assert est.rounds_model().alpha == pytest.approx(0.0, abs=1e-12)
    for obs, _ in rounds(p, delta, q, k, sgd=True, count=30):
        est.observe(obs)
    model = est.rounds_model()
    assert model.gamma == 0 and model.numerator_sketch_exponent == 1.4
    s = k / R
    assert model.value(q, s, p) == pytest.approx(1.0 + est.noise_to_signal(q, s), rel=1e-12)
    assert model.value(np.ones(N), np.ones(N), p) == pytest.approx(1.0)
    pr = PlanProblem(p, [3.0, 9.0, 4.0, 20.0, 5.0], [1.0, 2.0, 8.0, 1.0, 0.5], 1.0, R, ComputeModel("linear"),
                     model, min_participation=0.05)
    pl = plan(pr)
    assert np.all(pl.participation_prob >= 0.05) and np.all(pl.participation_prob <= 1)


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
