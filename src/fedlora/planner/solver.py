"""Algorithm 2: the q-step, the s-step and their alternation (docs/theory.md section 6)."""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from .problem import (Q_FLOOR, _REL_TOL, AppendixCInfeasible, InfeasiblePlan, Plan, PlanProblem, RoundsModel,
                      _check_q, check_feasible)

# --------------------------------------------------------------------------- fast internals
class _TimeState:
    """Sorted view of E[max_{i in S} t_i] for fixed (t, q): the value E, the gradient
    dE/dq_i, and cumulative integrals that let the effect of moving one client's time be
    read off in O(log N) (``h``).

    G(t) = prod_{j: t_j > t} (1 - q_j) is P(max < t) (piecewise constant), so
    E = int_0^inf (1 - G). Moving client i from t_old to t_new changes E by
      t_new < t_old:  -q_i * int_{t_new}^{t_old} G_{-i}     (G_{-i}: product without i)
      t_new > t_old:  +q_i * int_{t_old}^{t_new} G           (i is not in G there)
    G_{-i} = G / (1 - q_i) where i is included; clients with q_i == 1 are tracked by a
    zero count so that the division never happens for them (CI1 below).
    """

    __slots__ = ("t", "q", "E", "xp", "ci0", "ci1", "grad")

    def __init__(self, t: np.ndarray, q: np.ndarray, t_max: float):
        self.t = t
        self.q = q
        n = t.size
        order = np.argsort(t, kind="stable")
        ts = t[order]
        qs = q[order]
        cs = 1.0 - qs
        zero = cs <= 0.0
        cnz = np.where(zero, 1.0, cs)
        # suffix (j >= l) product of non-zero factors and count of zero factors
        ps = np.cumprod(cnz[::-1])[::-1]
        zs = np.cumsum(zero[::-1])[::-1]
        # E = sum t_l q_l prod_{j > l} (1 - q_j)
        suf_excl = np.ones(n)
        if n > 1:
            suf_excl[:-1] = np.where(zs[1:] > 0, 0.0, ps[1:])
        self.E = float(np.dot(ts * qs, suf_excl))
        d = np.diff(ts, prepend=0.0)
        ci0 = np.cumsum(d * np.where(zs == 0, ps, 0.0))
        ci1 = np.cumsum(d * np.where(zs == 1, ps, 0.0))
        # dE/dq_i = int_0^{t_i} G_{-i}
        g_sorted = np.where(zero, ci1, ci0 / cnz)
        grad = np.empty(n)
        grad[order] = g_sorted
        self.grad = grad
        # breakpoints for interpolation (ties collapsed; beyond the slowest G == 1)
        keep = np.ones(n, dtype=bool)
        if n > 1:
            keep[:-1] = ts[1:] != ts[:-1]
        big = max(float(t_max), float(ts[-1])) * 2.0 + 1.0
        self.xp = np.concatenate(([0.0], ts[keep], [big]))
        self.ci0 = np.concatenate(([0.0], ci0[keep], [ci0[-1] + (big - ts[-1])]))
        self.ci1 = np.concatenate(([0.0], ci1[keep], [ci1[-1]]))

    def h(self, idx: np.ndarray, t_new: np.ndarray) -> np.ndarray:
        """int_0^{t_new} G_{-i}: dE/dq_i once client idx[j] sits at time t_new[j, :]."""
        t_old = self.t[idx][:, None]
        c = (1.0 - self.q[idx])[:, None]
        tmin = np.minimum(t_new, t_old)
        shape = t_new.shape
        c0min = np.interp(tmin.ravel(), self.xp, self.ci0).reshape(shape)
        c1min = np.interp(tmin.ravel(), self.xp, self.ci1).reshape(shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            below = np.where(c > 0, c0min / np.where(c > 0, c, 1.0), c1min)
        above = np.interp(t_new.ravel(), self.xp, self.ci0).reshape(shape) - np.interp(
            t_old[:, 0], self.xp, self.ci0)[:, None]
        return below + np.maximum(above, 0.0)


class _Core:
    """Normalised problem: beta = 1, times divided by the largest compute time; times and data
    shares rounded to 12 significant digits, so that changing units (or renormalising p)
    gives bit-identical plans instead of plans that differ in the last digits."""

    def __init__(self, problem: PlanProblem):
        k = problem.model
        self.n = n = problem.num_clients
        self.r = r = problem.rank
        self.alpha = k.alpha / k.beta
        self.gamma = k.gamma / k.beta
        self.delta = k.delta / k.beta
        p = problem.data_share
        c = problem.compute_time_s
        ub = problem.upload_exposed_fraction * problem.upload_s_hz / problem.bandwidth_hz  # the round's upload term
        self.scale = float(c.max())  # exact ratio under a change of time unit
        self.c = _round_sig(c / self.scale)
        self.ub = _round_sig(ub / self.scale)
        self.tdl = _round_sig(problem.download_s / self.scale)  # broadcast: E[max_S t_dl], k-independent
        self.has_dl = bool(np.any(self.tdl > 0))
        self.s_grid = np.arange(1, r + 1, dtype=np.float64) / r
        # X = sum a[i, k_i - 1] / q_i and Y = sum b[i, k_i - 1] / q_i (RoundsModel.tables)
        weighted = RoundsModel(alpha=k.alpha, beta=k.beta, gamma=k.gamma, delta=k.delta,
                               client_weight=_round_sig(k.client_weight),
                               numerator_sketch_exponent=k.numerator_sketch_exponent,
                               denominator_sketch_exponent=k.denominator_sketch_exponent)
        self.a_tab, self.b_tab = weighted.tables(_round_sig(p), self.s_grid)
        self.tcp_tab = np.asarray(problem.compute_model.time_s(self.c[:, None], self.s_grid[None, :]),
                                  dtype=np.float64).reshape(n, r)
        self.t_max = float(self.tcp_tab.max())
        self.q_floor = np.maximum(problem.min_participation, Q_FLOOR)
        # Appendix C: q_i >= N gamma b[i, k_i - 1] / beta (every term of gamma Y below beta / N).
        # lb_raw is the bound itself (the s-step's move test); lb_tab adds a 1e-10 margin that
        # covers the rounding of p, so that the plan meets the bound computed from the unrounded
        # inputs, and is relaxed by ``pin``
        self.lb_raw = n * self.gamma * self.b_tab
        self.lb_tab = self.lb_raw * (1.0 + 1e-10)
        if problem.pin_large_clients:
            self.pin(np.ones(n))
        # clients with identical (p, w, c, t_cm) are interchangeable: moved together in the s-step
        key = np.stack([p, k.client_weight, c, problem.upload_s_hz, problem.download_s, self.q_floor], axis=1)
        _, inv = np.unique(key, axis=0, return_inverse=True)
        self.group = inv.reshape(-1)
        counts = np.bincount(self.group)
        self.has_groups = bool(np.any(counts > 1))
        self.singles = np.flatnonzero(counts[self.group] == 1)
        self.groups = [np.flatnonzero(self.group == g) for g in np.flatnonzero(counts > 1)]

    # -- constraints
    def pin(self, q_max: np.ndarray) -> None:
        """Relaxed Appendix C: a client whose bound exceeds q_max_i even at full rank gets
        q_i s_i >= q_max_i, i.e. q_i = q_max_i and s_i = 1. (The s-step's move test uses the
        unrelaxed bound, so a pinned client is never moved off full rank.)"""
        shape = self.b_tab / np.where(self.b_tab[:, -1:] > 0, self.b_tab[:, -1:], 1.0)  # b(k) / b(r)
        self.lb_tab = np.minimum(self.lb_tab, np.asarray(q_max, dtype=np.float64)[:, None] * shape)

    def q_lb(self, k: np.ndarray) -> np.ndarray:
        return np.maximum(self.lb_tab[np.arange(self.n), k - 1], self.q_floor)

    def k_min(self, q: np.ndarray) -> np.ndarray:
        """Smallest rank whose bound q may meet (the bound falls as the rank grows)."""
        over = self.lb_tab > (np.asarray(q, dtype=np.float64) * (1.0 + 1e-9))[:, None]
        return np.clip(over.sum(axis=1) + 1, 1, self.r).astype(np.int64)

    # -- objective
    def download(self, q: np.ndarray) -> tuple[float, np.ndarray]:
        """E[max_{i in S} t_dl_i] and its gradient in q (multilinear: exact in each q_i)."""
        if not self.has_dl:
            return 0.0, np.zeros(self.n)
        st = _TimeState(self.tdl, q, self.t_max)
        return st.E, st.grad

    def parts(self, q: np.ndarray, k: np.ndarray):
        rows = np.arange(self.n)
        x = float(np.sum(self.a_tab[rows, k - 1] / q))
        y = float(np.sum(self.b_tab[rows, k - 1] / q))
        return x, y, self.s_grid[k - 1]

    def value(self, q: np.ndarray, k: np.ndarray) -> float:
        x, y, s = self.parts(q, k)
        den = 1.0 - self.gamma * y
        if not den > 0:
            return math.inf
        return (self.alpha + self.delta * x) / den * self.round_time(q, k)

    def round_time(self, q, k) -> float:
        s = self.s_grid[k - 1]
        st = _TimeState(self.tcp_tab[np.arange(self.n), k - 1], q, self.t_max)
        return st.E + self.download(q)[0] + float(np.dot(q, self.ub * s))

    def symmetrize(self, q: np.ndarray) -> np.ndarray:
        if not self.has_groups:
            return q
        sums = np.bincount(self.group, weights=q)
        cnt = np.bincount(self.group)
        return (sums / cnt)[self.group]


def _round_sig(x: np.ndarray, digits: int = 12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = x.copy()
    nz = x != 0
    mag = np.floor(np.log10(np.abs(x[nz])))
    f = 10.0 ** (digits - 1 - mag)
    out[nz] = np.round(x[nz] * f) / f
    return out


# --------------------------------------------------------------------------- s-step
def _s_step(core: _Core, q: np.ndarray, k: np.ndarray, max_sweeps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Greedy integer coordinate descent on the ranks; each move re-fits the moved client's q.

    A move sets client i to rank k' != k_i and q_i to its best value for k' with everybody
    else fixed. q_i and k_i are tightly coupled (the Appendix-C bound q_i s_i >= N gamma p_i^2
    / beta, and the trade-off "participate rarely at full rank / often at low rank"), and
    moving k_i with q_i frozen was measured to stall in poor plans (up to 29 % above the
    brute-force optimum on 3-4 client instances). The re-fit is exact and cheap: with the
    others fixed, X and Y are affine in 1/q_i and the round-time bound is affine in q_i
    (E[max] is multilinear), so F(q_i) = (A q + B)(E0 + E1 q) / (C q - D) whose minimiser
    over [lower bound, 1] is the positive root of a quadratic, clipped.

    A sweep scores all (client, k') pairs at once with the incremental formulas of
    ``_TimeState`` (O(N r log N), vectorised). Clients whose best move improves F are then
    visited in order of predicted gain; each is re-scored against the current state (its
    predecessors may have moved), moved if F still drops, the state rebuilt (O(N log N))
    and F recomputed exactly (a move that does not verify is undone). Identical clients
    (same p, c, t_cm) move together (``_group_moves``) so that symmetric inputs give
    symmetric plans. When no single move helps, ``_cap_move`` tries block moves on the
    stragglers. Stops when nothing helps. The seed's single steps k_i -> k_i - 1 are among
    the candidates, so the result is also a fixed point of the seed's rule.
    """
    q = q.copy()
    k = np.maximum(k.copy(), core.k_min(q))
    cur = _SState(core, q, k)
    for _ in range(max_sweeps):
        moved = False
        if core.singles.size:
            cur, m = _single_moves(core, cur, core.singles)
            moved |= m
        if core.groups:
            cur, m = _group_moves(core, cur)
            moved |= m
        if not moved:
            capped = _cap_move(core, cur)
            if capped is None:
                break
            cur = capped
    return cur.q, cur.k


def _single_moves(core: _Core, cur: "_SState", idx: np.ndarray) -> tuple["_SState", bool]:
    fn, _ = _score_moves(core, cur, idx)
    gain = cur.f - fn.min(axis=1)
    sel = np.flatnonzero(gain > _REL_TOL * cur.f)
    if sel.size == 0:
        return cur, False
    order = sel[np.lexsort((sel, -gain[sel]))]
    moved = False
    for i in idx[order]:
        fi, qi = _score_moves(core, cur, np.array([i]))
        j = int(np.argmin(fi[0]))
        if not fi[0, j] < cur.f * (1.0 - _REL_TOL):
            continue
        q2 = cur.q.copy()
        k2 = cur.k.copy()
        q2[i] = qi[0, j]
        k2[i] = j + 1
        nxt = _SState(core, q2, k2)
        if nxt.f < cur.f * (1.0 - _REL_TOL):
            cur = nxt
            moved = True
    return cur, moved


def _group_moves(core: _Core, cur: "_SState") -> tuple["_SState", bool]:
    """Moves for groups of identical clients: all members to rank k' with their common q
    re-fitted by a bounded 1-D search on the exact objective (E[max] is a polynomial of
    degree |group| in the common q, so no closed form)."""
    moved = False
    for members in core.groups:
        i0 = members[0]
        best = None
        for kk in range(1, core.r + 1):
            if kk == cur.k[i0]:
                continue
            lo = max(core.lb_tab[i0, kk - 1], core.q_floor[i0])
            if lo > 1.0:
                continue
            k2 = cur.k.copy()
            k2[members] = kk

            def f_of(qg, k2=k2):
                q2 = cur.q.copy()
                q2[members] = qg
                return core.value(q2, k2)

            res = minimize_scalar(f_of, bounds=(lo, 1.0), method="bounded", options={"xatol": 1e-9})
            qg = float(res.x) if f_of(float(res.x)) <= f_of(1.0) else 1.0
            q2 = cur.q.copy()
            q2[members] = qg
            nxt = _SState(core, q2, k2)
            if nxt.f < (best.f if best is not None else cur.f) * (1.0 - _REL_TOL):
                best = nxt
        if best is not None:
            cur = best
            moved = True
    return cur, moved


def _cap_move(core: _Core, cur: "_SState", max_levels: int = 64) -> "_SState | None":
    """Block move for the straggler structure of E[max]: for a time cap tau (any compute
    time some client reaches at some rank, below the current maximum), every client slower
    than tau drops to the largest rank that meets tau (never below its Appendix-C minimum),
    q unchanged. Single
    moves cannot do this when several clients share the role of the slowest (e.g. two
    clients with q = 1: lowering either alone leaves E[max] unchanged). Returns the best
    improving state, or None."""
    t = core.tcp_tab[np.arange(core.n), cur.k - 1]
    levels = np.unique(core.tcp_tab[core.tcp_tab < t.max()])[::-1]  # every reachable time below the max
    if levels.size > max_levels:  # the slowest half of the budget densely, the rest spread out
        head = max_levels // 2
        rest = levels[head:]
        levels = np.concatenate((levels[:head], rest[np.linspace(0, rest.size - 1, max_levels - head).astype(int)]))
    kmin = core.k_min(cur.q)
    best = None
    for tau in levels:
        fits = core.tcp_tab <= tau * (1.0 + 1e-12)
        kcap = np.where(fits.any(axis=1), core.r - np.argmax(fits[:, ::-1], axis=1), 1)
        k2 = np.where(t > tau, np.maximum(np.minimum(cur.k, kcap), kmin), cur.k)
        if np.array_equal(k2, cur.k):
            continue
        nxt = _SState(core, cur.q, k2)
        if nxt.f < (best.f if best is not None else cur.f) * (1.0 - _REL_TOL):
            best = nxt
    return best


class _SState:
    """Exact objective pieces at (q, k) for the s-step."""

    __slots__ = ("q", "k", "x", "y", "lin", "st", "dl", "dl_grad", "f")

    def __init__(self, core: _Core, q: np.ndarray, k: np.ndarray):
        self.q, self.k = q, k
        self.x, self.y, s = core.parts(q, k)
        self.lin = float(np.dot(q, core.ub * s))
        self.st = _TimeState(core.tcp_tab[np.arange(core.n), k - 1], q, core.t_max)
        self.dl, self.dl_grad = core.download(q)
        den = 1.0 - core.gamma * self.y
        self.f = ((core.alpha + core.delta * self.x) / den * (self.st.E + self.dl + self.lin)
                  if den > 0 else math.inf)


def _score_moves(core: _Core, cur: _SState, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F after moving client idx[j] to rank k' (column k'-1) with its q re-fitted, and that q.
    The current rank of each client scores +inf (not a move)."""
    q_i = cur.q[idx]
    k_i = cur.k[idx]
    s_cur = core.s_grid[k_i - 1]
    a_cur = core.a_tab[idx, k_i - 1]
    b_cur = core.b_tab[idx, k_i - 1]
    sn = core.s_grid[None, :]
    ub = core.ub[idx]
    st = cur.st
    # T with client i absent, and dT/dq_i at rank k' (the broadcast term does not depend on k)
    e0 = (st.E - q_i * st.grad[idx]) + (cur.dl - q_i * cur.dl_grad[idx]) + (cur.lin - q_i * ub * s_cur)
    e1 = st.h(idx, core.tcp_tab[idx]) + ub[:, None] * sn + cur.dl_grad[idx][:, None]
    a_ = (core.alpha + core.delta * (cur.x - a_cur / q_i))[:, None]
    b_ = core.delta * core.a_tab[idx]
    c_ = (1.0 - core.gamma * (cur.y - b_cur / q_i))[:, None]
    d_ = core.gamma * core.b_tab[idx]
    e0 = np.maximum(e0, 0.0)[:, None]
    aa = a_ * c_ * e1
    bb = 2.0 * a_ * d_ * e1
    cc = d_ * (a_ * e0 + b_ * e1) + b_ * c_ * e0
    with np.errstate(divide="ignore", invalid="ignore"):
        root = (bb + np.sqrt(bb * bb + 4.0 * aa * cc)) / (2.0 * aa)
    root = np.where(aa > 0, root, 1.0)
    lbn = np.maximum(core.lb_raw[idx], core.q_floor[idx, None])
    qn = np.clip(root, lbn, 1.0)
    den = c_ - d_ / qn
    ok = (lbn <= 1.0) & (den > 0) & (c_ > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        fn = np.where(ok, (a_ + b_ / qn) / den * (e0 + e1 * qn), np.inf)
    fn[np.arange(idx.size), k_i - 1] = np.inf
    return fn, qn


# --------------------------------------------------------------------------- q-step
class _QSolver:
    """The q-step: convex surrogate + line search over m (cvxpy), then local polish.

    Surrogate for fixed k (s), round-time level m and scale lambda > 0 (docs/theory.md):
        minimise   lambda * (alpha + delta * sum p^2/q) + (1/lambda) / (1 - gamma * sum p^2/(q s))
        subject to M_{q0}(q) <= m,  q_lower <= q <= 1 - 1e-6.
    M_{q0} is a convex majorant of the round-time bound T touching it at q0: T is concave in
    u = -log(1 - q) (E[max] = int 1 - exp(-sum_{t_j > t} u_j) dt, and q = 1 - e^{-u}), so
    T(q) <= T(q0) + sum g_i (u_i - u0_i), g_i = (1 - q0_i) dT/dq_i; and
    u - u0 <= (1 - q0)/(1 - q) - 1 (equal with equal slope at q0), so
        M_{q0}(q) = T(q0) + sum g_i ((1 - q0_i) / (1 - q_i) - 1) >= T(q),
    second-order-cone representable (no exponential cones). Every
    candidate therefore really has T(q) <= m. The objective is the HM-AM (AM-GM) upper
    bound R = (lambda N)(1/(lambda D)) <= ((lambda N + 1/(lambda D)) / 2)^2, tight at
    lambda = 1/sqrt(N D); lambda is carried along the ascending m grid from the previous
    solution. The problem is compiled once (DPP parameters) and re-solved per m.
    """

    def __init__(self, core: _Core):
        import cvxpy as cp  # here, not at the top: 1-2 s that every process importing fedlora.methods would pay

        self.core = core
        n = core.n
        self.q = cp.Variable(n)
        self.a = cp.Parameter(n, nonneg=True)  # X = a @ (1/q) at the current ranks
        self.v = cp.Parameter(n, nonneg=True)  # Y = v @ (1/q)
        self.lb = cp.Parameter(n)
        self.g = cp.Parameter(n, nonneg=True)
        self.rhs = cp.Parameter()
        self.lam = cp.Parameter(nonneg=True)
        self.ilam = cp.Parameter(nonneg=True)
        z = cp.Variable(n)  # z >= 1/q
        yv = cp.Variable()  # Y = sum (p^2/s) z
        w = cp.Variable(n)  # w >= 1 / (1 - q)
        num = core.alpha + core.delta * (self.a @ z)
        obj = self.lam * num + self.ilam * cp.inv_pos(1.0 - core.gamma * yv)
        cons = [z >= cp.inv_pos(self.q), yv >= self.v @ z, w >= cp.inv_pos(1.0 - self.q),
                self.q >= self.lb, self.q <= 1.0 - 1e-6, self.g @ w <= self.rhs]
        self.prob = cp.Problem(cp.Minimize(obj), cons)
        self.solves = 0

    def _solve(self) -> np.ndarray | None:
        import cvxpy as cp

        self.solves += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "may be inaccurate": candidates are re-scored anyway
                self.prob.solve(solver=cp.CLARABEL)
        except cp.error.SolverError:
            return None
        if self.prob.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or self.q.value is None:
            return None
        return np.asarray(self.q.value, dtype=np.float64)

    def candidates(self, q0: np.ndarray, k: np.ndarray, lb: np.ndarray, m_lo: float | None, m_hi: float | None,
                   points: int) -> tuple[list[np.ndarray], list[float]]:
        core = self.core
        s = core.s_grid[k - 1]
        st = _TimeState(core.tcp_tab[np.arange(core.n), k - 1], q0, core.t_max)
        a = core.ub * s
        dl, dl_grad = core.download(q0)  # E[max] of the broadcast: concave in u as well
        t0 = st.E + dl + float(np.dot(q0, a))
        g = np.maximum((1.0 - q0) * (st.grad + dl_grad + a), 0.0)  # dT/du at u0 = -log(1 - q0)
        h = g * (1.0 - q0)  # M(q) = t0 + sum h_i / (1 - q_i) - sum g_i
        base = t0 - float(np.sum(g))
        m_min = base + float(np.sum(h / (1.0 - np.minimum(lb, 1.0 - 1e-6))))  # M at the lower bounds
        t1 = core.round_time(np.ones(core.n), k)
        lo = max(m_min, 1e-3 * t1) if m_lo is None else max(m_lo, m_min)
        hi = t1 if m_hi is None else m_hi
        lo = lo + 1e-3 * (hi - lo)
        if not hi > lo:
            return [], []
        ms = np.geomspace(lo, hi, points)
        rows = np.arange(core.n)
        self.a.value = core.a_tab[rows, k - 1]
        self.v.value = core.b_tab[rows, k - 1]
        self.lb.value = np.minimum(lb, 1.0 - 1e-6)
        self.g.value = h
        out, used = [], []
        lam = _lam(core, q0, k)
        for m in ms:  # ascending; lambda continues from the previous solution
            self.rhs.value = float(m - base)
            self.lam.value = lam
            self.ilam.value = 1.0 / lam
            sol = self._solve()
            if sol is None:
                continue
            q = np.clip(sol, lb, 1.0)
            lam = _lam(core, q, k)
            out.append(core.symmetrize(q))
            used.append(float(m))
        return out, used


def _lam(core: _Core, q: np.ndarray, k: np.ndarray) -> float:
    x, y, _ = core.parts(q, k)
    num = core.alpha + core.delta * x
    den = 1.0 - core.gamma * y
    if not den > 0:
        den = 1e-12
    return 1.0 / math.sqrt(num * den)


def _polish(core: _Core, q0: np.ndarray, k: np.ndarray, lb: np.ndarray, maxiter: int = 300) -> np.ndarray:
    """L-BFGS-B on log F(q) with k fixed, bounds lb <= q <= 1, analytic gradient:
    d log R / dq_i = -(delta a_i/q_i^2)/N_R - (gamma b_i/(q_i^2))/D_R (X = sum a/q, Y = sum b/q),
    d log T / dq_i = (dE/dq_i + a_i) / T with dE/dq_i = int_0^{t_i} G_{-i} (multilinear E)."""
    s = core.s_grid[k - 1]
    t = core.tcp_tab[np.arange(core.n), k - 1]
    a = core.ub * s
    rows = np.arange(core.n)
    wx = core.a_tab[rows, k - 1]
    wy = core.b_tab[rows, k - 1]

    def fun(q):
        q = np.asarray(q, dtype=np.float64)
        x = float(np.sum(wx / q))
        y = float(np.sum(wy / q))
        num = core.alpha + core.delta * x
        den = 1.0 - core.gamma * y
        if not den > 0:
            return 1e300, np.zeros_like(q)
        st = _TimeState(t, q, core.t_max)
        dl, dl_grad = core.download(q)
        tt = st.E + dl + float(np.dot(q, a))
        iq2 = 1.0 / (q * q)
        g = -core.delta * wx * iq2 / num - core.gamma * wy * iq2 / den + (st.grad + dl_grad + a) / tt
        return math.log(num) - math.log(den) + math.log(tt), g

    def fun_log(xv):
        q = np.exp(np.minimum(xv, 0.0))
        f, g = fun(q)
        return f, g * q

    res = minimize(fun_log, np.log(q0), jac=True, method="L-BFGS-B",
                   bounds=list(zip(np.log(lb), np.zeros(core.n))),
                   options={"maxiter": maxiter, "ftol": 1e-14, "gtol": 1e-11, "maxcor": 20})
    q = np.clip(np.exp(np.minimum(np.asarray(res.x, dtype=np.float64), 0.0)), lb, 1.0)
    return core.symmetrize(q)


def _q_step(core: _Core, solver: _QSolver | None, q0: np.ndarray, k: np.ndarray, grid_points: int,
            polish_top: int = 3) -> np.ndarray:
    """Line search over m with the surrogate (two passes: a coarse geometric grid over the
    whole range of round times, then a finer grid between the neighbours of the best m with
    the tangent re-taken at the best candidate). Candidates are ranked by the TRUE F; the
    best few (and q0) are polished by L-BFGS-B on the true F; the best result is returned.
    F never increases: q0 itself is a candidate."""
    lb = core.q_lb(k)
    q0 = np.clip(q0, lb, 1.0)
    pool: list[tuple[float, np.ndarray]] = [(core.value(q0, k), q0)]
    cands, ms = solver.candidates(q0, k, lb, None, None, grid_points) if solver is not None else ([], [])
    vals = [core.value(q, k) for q in cands]
    pool += list(zip(vals, cands))
    if cands:
        j = int(np.nanargmin(vals))
        lo = ms[j - 1] if j > 0 else None
        hi = ms[j + 1] if j + 1 < len(ms) else None
        fine, _ = solver.candidates(cands[j], k, lb, lo, hi, 3)
        pool += [(core.value(q, k), q) for q in fine]
    pool.sort(key=lambda fq: fq[0])
    # polish the best distinct candidates
    chosen: list[np.ndarray] = []
    for _f, q in pool:
        if not math.isfinite(_f):
            continue
        if any(np.max(np.abs(q - c)) < 1e-3 for c in chosen):
            continue
        chosen.append(q)
        if len(chosen) >= polish_top:
            break
    best_f, best_q = pool[0]
    for q in chosen:
        qp = _polish(core, q, k, lb)
        fp = core.value(qp, k)
        if fp < best_f:
            best_f, best_q = fp, qp
    return best_q


def _initial_q(core: _Core, k: np.ndarray) -> np.ndarray:
    """Best uniform q (clipped to the lower bounds) on a geometric grid: the tangent point
    of the first surrogate."""
    lb = core.q_lb(k)
    best = None
    for u in np.geomspace(1e-3, 1.0, 31):
        q = np.clip(np.full(core.n, u), lb, 1.0)
        f = core.value(q, k)
        if best is None or f < best[0]:
            best = (f, q)
    return best[1]


def plan(problem: PlanProblem, *, max_iters: int = 20, grid_points: int = 10,
         start: tuple[np.ndarray, np.ndarray] | None = None) -> Plan:
    """Algorithm 2 (docs/theory.md section 6): alternating minimisation of P2. Deterministic.

    Start at s = 1 (k = r) and q = the best uniform q. Then
      q-step (``_q_step``): with k fixed, line search over the round-time level m with the
        convex HM-AM surrogate solved by cvxpy (``grid_points`` values of m on a geometric
        grid over [smallest reachable, T(q = 1)], then 3 more between the neighbours of the
        best one), every candidate scored by the true P2 objective, the 3 best distinct ones
        (and the incoming q) polished by L-BFGS-B on the true objective;
      s-step (``_s_step``): greedy integer coordinate descent on the ranks, each move
        re-fitting that client's q in closed form, plus "cap" block moves for stragglers;
    and repeat (s-step, q-step) until an iteration improves F by less than 1e-9 (relative)
    or ``max_iters`` iterations. F never increases along the way.

    ``grid_points=0`` skips the cvxpy surrogate (q-steps are then the L-BFGS-B polish
    alone); on 95 random instances (N = 3..50) this gave the same objectives, about 9x
    faster (35x at N = 1000); see docs/theory.md. ``start=(q, ranks)`` (a warm start, e.g.
    the previous plan of online re-planning) replaces the initial point: the ranks are kept
    (raised to their Appendix-C minimum) and q is clipped to its bounds, then the same
    alternation runs. Raises InfeasiblePlan when P2 has no feasible point.
    """
    if isinstance(max_iters, bool) or int(max_iters) != max_iters or int(max_iters) < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
    if isinstance(grid_points, bool) or int(grid_points) != grid_points or int(grid_points) in (1,) \
            or int(grid_points) < 0:
        raise ValueError(f"grid_points must be 0 (no surrogate) or an integer >= 2, got {grid_points!r}")
    check_feasible(problem)
    with _single_thread_blas():
        return _plan(problem, int(max_iters), int(grid_points), start)


def _single_thread_blas():
    """Limit BLAS to one thread while planning. L-BFGS-B does many tiny BLAS calls; with a
    multi-threaded OpenBLAS on a busy machine each call can cost milliseconds of thread
    hand-off (measured: 1.6 s vs 0.016 s for the same polish). No-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional dependency
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _plan(problem: PlanProblem, max_iters: int, grid_points: int, start=None) -> Plan:
    core = _Core(problem)
    solver = _QSolver(core) if grid_points else None
    if start is None:
        k = np.full(core.n, core.r, dtype=np.int64)
        q0 = _initial_q(core, k)
    else:
        q0 = _check_q(start[0], core.n)
        k = np.clip(np.asarray(start[1], dtype=np.int64), 1, core.r)
        k = np.maximum(k, core.k_min(q0))
    q = _q_step(core, solver, q0, k, grid_points)
    f = core.value(q, k)
    it = 0
    for it in range(1, int(max_iters) + 1):
        q_s, k_new = _s_step(core, q, k)
        q_new = _q_step(core, solver, q_s, k_new, grid_points)
        f_new = core.value(q_new, k_new)
        if f_new < f:
            improved = f_new < f * (1.0 - 1e-9)
            q, k, f = q_new, k_new, f_new
            if not improved:
                break
        else:
            break
    return _make_plan(problem, core, q, k, it)


def plan_participation(problem: PlanProblem, *, grid_points: int = 10) -> Plan:
    """Sampling-only ablation (seed 001, Fig. 2): every client at full rank (s = 1), q
    from Algorithm 2's q-step alone (surrogate line search + L-BFGS-B polish on P2)."""
    check_feasible(problem)
    with _single_thread_blas():
        core = _Core(problem)
        solver = _QSolver(core) if grid_points else None
        k = np.full(core.n, core.r, dtype=np.int64)
        q = _q_step(core, solver, _initial_q(core, k), k, int(grid_points))
        return _make_plan(problem, core, q, k, 1)


def plan_ranks(problem: PlanProblem, participation_prob) -> Plan:
    """Rank-only ablation (seed 001, Fig. 3): q fixed; the seed's greedy rule on the integer
    ranks alone: start at k = r and lower a client's k_i by one while that lowers P2 (and
    keeps q_i s_i above the Appendix-C bound), sweeping until no move helps."""
    check_feasible(problem)
    core = _Core(problem)
    q = _check_q(participation_prob, core.n).copy()
    k = np.full(core.n, core.r, dtype=np.int64)
    if problem.pin_large_clients:
        core.pin(q)
    if np.any(q < core.q_lb(k) * (1 - 1e-12)):
        raise AppendixCInfeasible("the fixed participation probabilities are below the Appendix-C bound "
                                  "q_i >= N gamma p_i^2 / beta even at full rank")
    k_min = core.k_min(q)
    f = core.value(q, k)
    if not math.isfinite(f):
        raise InfeasiblePlan("the fixed participation probabilities break the convergence condition "
                             "gamma * sum(p^2 / q) < beta even at full rank")
    sweeps = 0
    improved = True
    while improved:
        improved = False
        sweeps += 1
        for i in range(core.n):
            while k[i] > k_min[i]:
                k[i] -= 1
                f_new = core.value(q, k)
                if f_new < f * (1.0 - 1e-12):
                    f, improved = f_new, True
                else:
                    k[i] += 1
                    break
    return _make_plan(problem, core, q, k, sweeps)


def _make_plan(problem: PlanProblem, core: _Core, q: np.ndarray, k: np.ndarray, iterations: int) -> Plan:
    it = iterations
    s = core.s_grid[k - 1]
    rf = problem.rounds_factor(q, s)
    tb = problem.round_time_bound_s(q, s)
    q_out = q.copy()
    k_out = k.astype(np.int64).copy()
    s_out = s.copy()
    for a in (q_out, k_out, s_out):
        a.setflags(write=False)
    return Plan(participation_prob=q_out, ranks=k_out, sketch_ratio=s_out, objective=rf * tb,
                expected_round_time_s=tb, rounds_factor=rf, iterations=it)
