"""Wireless system model: client profiles, bandwidth allocation and round time
(docs/theory.md sections 1-2, docs/system.md).

Units are in the names: seconds (_s), hertz (_hz), bits, bits/s/Hz, dBm, dB, metres (_m).

Per client i:
  t_cp_i  compute time of tau local steps (``compute_time_s`` at full rank s = 1; a
          ``ComputeModel`` maps it to ratio s),
  t_cm_i  upload time at unit bandwidth, in s*Hz: ``upload_bits / bits_per_s_per_hz``;
          with bandwidth b_i Hz the upload takes t_cm_i / b_i seconds.
Sampled clients share B Hz orthogonally. The round ends when the slowest finishes, so
the best split makes everybody finish together (``equal_finish_allocation``); the
Theorem-2 bound (``round_time_bound_s``) is what the planner minimises.

Pure math: numpy / scipy only, no model, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import brentq

__all__ = [
    "ClientProfile",
    "ComputeModel",
    "generate_profiles",
    "channel_profiles",
    "path_loss_db",
    "rayleigh_fading",
    "upload_s_hz",
    "downlink_time_s",
    "equal_finish_allocation",
    "equal_split_allocation",
    "expected_max_compute_s",
    "round_time_bound_s",
]


# --------------------------------------------------------------------------- profiles
@dataclass
class ClientProfile:
    """Static capabilities of one client.

    compute_time_s: tau local steps at full rank (s = 1).
    bits_per_s_per_hz: link spectral efficiency; uploading ``bits`` with ``b`` Hz takes
        bits / (b * bits_per_s_per_hz) seconds.
    extra: anything else (device_flops, distance_m, tx_power_dbm, path_loss_db,
        snr_linear, ...), written to clients.json as is.
    """

    id: int
    compute_time_s: float
    bits_per_s_per_hz: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Flat JSON-ready dict (clients.json fields this module knows, plus ``extra``)."""
        d = {"id": int(self.id), "compute_time_s": float(self.compute_time_s),
             "bits_per_s_per_hz": float(self.bits_per_s_per_hz)}
        for key, val in self.extra.items():
            d.setdefault(key, val.item() if isinstance(val, np.generic) else val)
        return d


@dataclass(frozen=True)
class ComputeModel:
    """How local compute time scales with the sketch ratio s.

    linear (the seed's model, eq. 19): t_cp(s) = s * c.
    affine: t_cp(s) = c * (f + (1 - f) * s); the frozen base model's forward/backward does
    not shrink with s, so a fraction f of the full-rank time stays.
    """

    kind: Literal["linear", "affine"]
    fixed_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "affine"):
            raise ValueError(f"compute model kind must be 'linear' or 'affine', got {self.kind!r}")
        f = float(self.fixed_fraction)
        if not (0.0 <= f <= 1.0):
            raise ValueError(f"fixed_fraction must be in [0, 1], got {self.fixed_fraction!r}")
        if self.kind == "linear" and f != 0.0:
            raise ValueError("a linear compute model has no fixed_fraction; use kind='affine'")

    def time_s(self, compute_time_s, ratio):
        """Compute time at ratio s; floats in -> float out, arrays broadcast."""
        c = np.asarray(compute_time_s, dtype=np.float64)
        s = np.asarray(ratio, dtype=np.float64)
        if self.kind == "linear":
            t = c * s
        else:
            f = float(self.fixed_fraction)
            t = c * (f + (1.0 - f) * s)
        return float(t) if t.ndim == 0 else t

    def to_dict(self) -> dict:
        """plan.json form: {"kind": "linear"} or {"kind": "affine", "fixed_fraction": f}."""
        if self.kind == "linear":
            return {"kind": "linear"}
        return {"kind": "affine", "fixed_fraction": float(self.fixed_fraction)}

    @classmethod
    def from_dict(cls, d: dict) -> "ComputeModel":
        return cls(kind=d["kind"], fixed_fraction=float(d.get("fixed_fraction", 0.0)))


def _spread_factors(rng: np.random.Generator, n: int, spread: float, distribution: str) -> np.ndarray:
    if not (math.isfinite(spread) and spread >= 0.0):
        raise ValueError(f"spread must be a finite number >= 0, got {spread!r}")
    if distribution == "lognormal":
        return np.exp(spread * rng.standard_normal(n))
    if distribution == "uniform":
        lo, hi = 1.0 / (1.0 + spread), 1.0 + spread
        return rng.uniform(lo, hi, size=n)  # lo == hi == 1 when spread == 0: exactly 1
    raise ValueError(f"distribution must be 'lognormal' or 'uniform', got {distribution!r}")


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return value


def generate_profiles(
    num_clients: int,
    *,
    seed: int,
    compute_time_s: float,
    compute_spread: float,
    bits_per_s_per_hz: float,
    link_spread: float,
    distribution: Literal["lognormal", "uniform"] = "lognormal",
) -> list[ClientProfile]:
    """Synthetic heterogeneous clients without a channel model.

    lognormal: value * exp(spread * N(0, 1)), so ``value`` is the median and ``spread``
    the sigma of the log. uniform: value * U[1/(1+spread), 1+spread] (symmetric in log
    terms at the ends). spread 0 gives identical clients. Same seed -> same profiles; the
    random stream is always consumed in the same order, whatever the spreads.
    """
    if int(num_clients) != num_clients or num_clients < 0:
        raise ValueError(f"num_clients must be a non-negative integer, got {num_clients!r}")
    n = int(num_clients)
    c0 = _positive("compute_time_s", compute_time_s)
    e0 = _positive("bits_per_s_per_hz", bits_per_s_per_hz)
    rng = np.random.default_rng(seed)
    cf = _spread_factors(rng, n, float(compute_spread), distribution)
    lf = _spread_factors(rng, n, float(link_spread), distribution)
    return [
        ClientProfile(id=i, compute_time_s=float(c0 * cf[i]), bits_per_s_per_hz=float(e0 * lf[i]),
                      extra={"profile_source": f"generated_{distribution}"})
        for i in range(n)
    ]


def path_loss_db(distance_m):
    """Macro-cell path loss 128.1 + 37.6 log10(d / km) in dB (3GPP TR 36.814)."""
    d_km = np.asarray(distance_m, dtype=np.float64) / 1000.0
    pl = 128.1 + 37.6 * np.log10(d_km)
    return float(pl) if pl.ndim == 0 else pl


def channel_profiles(
    num_clients: int,
    *,
    seed: int,
    flops_per_round: float,
    device_flops_median: float,
    device_flops_spread: float,
    cell_radius_m: float = 500.0,
    tx_power_dbm: tuple[float, float] = (10.0, 23.0),
    noise_dbm_per_hz: float = -174.0,
    shadowing_db: float = 8.0,
    reference_bandwidth_hz: float,
    min_distance_m: float = 10.0,
) -> list[ClientProfile]:
    """Clients placed in a cell with a physical uplink.

    Position uniform over the disc of radius ``cell_radius_m`` outside ``min_distance_m``;
    path loss 128.1 + 37.6 log10(d/km) dB plus zero-mean log-normal shadowing (sigma
    ``shadowing_db``); transmit power uniform in ``tx_power_dbm``; noise PSD
    ``noise_dbm_per_hz``. SNR is taken at ``reference_bandwidth_hz``:
    SNR = P_rx / (N0 * b_ref), and the spectral efficiency log2(1 + SNR) is then held
    fixed, so the upload time with b Hz is bits / (b * eff).

    Simplification (documented in docs/system.md): the exact Shannon rate
    b log2(1 + P_rx / (N0 b)) is concave in b; freezing SNR at b_ref makes the rate linear
    in b, which is exactly the seed's round-time form t_cp + t_cm / b and keeps the
    equal-finish allocation a 1-D root find. Choose b_ref near the bandwidth a client
    typically gets (e.g. B / expected number of participants).

    Compute: device_flops ~ lognormal(median, sigma = spread);
    compute_time_s = flops_per_round / device_flops (tau local steps at full rank).
    ``extra`` stores distance_m, path_loss_db, shadowing_db, tx_power_dbm, rx_power_dbm,
    snr_linear, snr_db, reference_bandwidth_hz and device_flops (snr_linear lets
    ``rayleigh_fading`` redraw per-round efficiencies).
    """
    if int(num_clients) != num_clients or num_clients < 0:
        raise ValueError(f"num_clients must be a non-negative integer, got {num_clients!r}")
    n = int(num_clients)
    flops = _positive("flops_per_round", flops_per_round)
    fmed = _positive("device_flops_median", device_flops_median)
    radius = _positive("cell_radius_m", cell_radius_m)
    dmin = _positive("min_distance_m", min_distance_m)
    b_ref = _positive("reference_bandwidth_hz", reference_bandwidth_hz)
    if dmin >= radius:
        raise ValueError(f"min_distance_m ({dmin}) must be below cell_radius_m ({radius})")
    p_lo, p_hi = (float(x) for x in tx_power_dbm)
    if not (p_lo <= p_hi):
        raise ValueError(f"tx_power_dbm must be (low, high) with low <= high, got {tx_power_dbm!r}")
    if not (math.isfinite(shadowing_db) and shadowing_db >= 0.0):
        raise ValueError(f"shadowing_db must be >= 0, got {shadowing_db!r}")

    rng = np.random.default_rng(seed)
    # Uniform over the annulus dmin <= d <= R: the CDF of d^2 is uniform.
    distance = np.sqrt(rng.uniform(dmin**2, radius**2, size=n))
    angle = rng.uniform(0.0, 2.0 * math.pi, size=n)  # drawn for completeness; the model is isotropic
    shadow = shadowing_db * rng.standard_normal(n)
    p_tx = rng.uniform(p_lo, p_hi, size=n)
    dev_flops = fmed * np.exp(float(device_flops_spread) * rng.standard_normal(n))

    pl = path_loss_db(distance) if n else np.zeros(0)
    p_rx_dbm = p_tx - pl - shadow
    noise_dbm = noise_dbm_per_hz + 10.0 * math.log10(b_ref)
    snr_db = p_rx_dbm - noise_dbm
    snr = 10.0 ** (snr_db / 10.0)
    eff = np.log2(1.0 + snr)
    comp = flops / dev_flops

    return [
        ClientProfile(
            id=i,
            compute_time_s=float(comp[i]),
            bits_per_s_per_hz=float(eff[i]),
            extra={
                "profile_source": "channel",
                "distance_m": float(distance[i]),
                "angle_rad": float(angle[i]),
                "path_loss_db": float(pl[i]),
                "shadowing_db": float(shadow[i]),
                "tx_power_dbm": float(p_tx[i]),
                "rx_power_dbm": float(p_rx_dbm[i]),
                "snr_linear": float(snr[i]),
                "snr_db": float(snr_db[i]),
                "reference_bandwidth_hz": b_ref,
                "device_flops": float(dev_flops[i]),
            },
        )
        for i in range(n)
    ]


def rayleigh_fading(rng: np.random.Generator, bits_per_s_per_hz: np.ndarray, snr_linear: np.ndarray) -> np.ndarray:
    """One round of block Rayleigh fading: |h|^2 ~ Exp(1) multiplies the mean SNR, giving
    the new efficiency log2(1 + |h|^2 SNR). Clients with a non-finite SNR (profiles without
    a channel, e.g. from a file) keep their ``bits_per_s_per_hz``. One Exp(1) draw per client
    is always consumed, so streams stay aligned whatever the mix.
    """
    eff = np.asarray(bits_per_s_per_hz, dtype=np.float64)
    snr = np.asarray(snr_linear, dtype=np.float64)
    if eff.shape != snr.shape:
        raise ValueError(f"shapes differ: {eff.shape} vs {snr.shape}")
    gain = rng.exponential(1.0, size=eff.shape)
    has_snr = np.isfinite(snr)
    if np.any(snr[has_snr] < 0):
        raise ValueError("snr_linear must be >= 0")
    faded = np.log2(1.0 + gain * np.where(has_snr, snr, 0.0))
    return np.where(has_snr, faded, eff)


def upload_s_hz(upload_bits, bits_per_s_per_hz, ratio=1.0):
    """t_cm at unit bandwidth (s*Hz): ratio * upload_bits / bits_per_s_per_hz.

    ``ratio`` is the fraction of the full-rank payload sent, k / r (eq. 18)."""
    t = np.asarray(ratio, dtype=np.float64) * np.asarray(upload_bits, dtype=np.float64) / np.asarray(
        bits_per_s_per_hz, dtype=np.float64)
    return float(t) if t.ndim == 0 else t


def downlink_time_s(broadcast_bits: float, unicast_bits, bits_per_s_per_hz, downlink_hz: float) -> float:
    """Seconds to deliver a round's download to its clients over one downlink band.

    One broadcast reaches every listed client at the weakest one's rate (a multicast is sent
    at a rate all its receivers decode), then the unicasts share the band; with the band split
    so that they all finish together, they take sum_i bits_i / e_i / B (docs/system.md):

        T_dl = broadcast_bits / (B min_i e_i) + sum_i unicast_bits_i / (e_i B).

    No clients: nothing is sent (0 s)."""
    e = np.atleast_1d(np.asarray(bits_per_s_per_hz, dtype=np.float64))
    u = np.broadcast_to(np.asarray(unicast_bits, dtype=np.float64), e.shape)
    bw = float(downlink_hz)
    if not (math.isfinite(bw) and bw > 0):
        raise ValueError(f"downlink_hz must be a finite positive number, got {downlink_hz!r}")
    if e.size == 0:
        return 0.0
    if not (np.all(np.isfinite(e)) and np.all(e > 0)):
        raise ValueError("bits_per_s_per_hz must be finite and > 0")
    if not (math.isfinite(broadcast_bits) and broadcast_bits >= 0 and np.all(u >= 0)):
        raise ValueError("download sizes must be finite and >= 0")
    return float(broadcast_bits / (bw * e.min()) + np.sum(u / e) / bw)


# --------------------------------------------------------------------------- allocation
def _check_alloc(compute_s, upload_s_hz_, bandwidth_hz) -> tuple[np.ndarray, np.ndarray, float]:
    c = np.atleast_1d(np.asarray(compute_s, dtype=np.float64))
    u = np.atleast_1d(np.asarray(upload_s_hz_, dtype=np.float64))
    if c.ndim != 1 or c.shape != u.shape:
        raise ValueError(f"compute_s and upload_s_hz must be 1-D of equal length, got {c.shape} and {u.shape}")
    if not (np.all(np.isfinite(c)) and np.all(c >= 0)):
        raise ValueError("compute_s must be finite and >= 0")
    if not (np.all(np.isfinite(u)) and np.all(u >= 0)):
        raise ValueError("upload_s_hz must be finite and >= 0")
    bw = float(bandwidth_hz)
    if not (math.isfinite(bw) and bw > 0):
        raise ValueError(f"bandwidth_hz must be a finite positive number, got {bandwidth_hz!r}")
    return c, u, bw


def equal_finish_allocation(compute_s: np.ndarray, upload_s_hz: np.ndarray, bandwidth_hz: float) -> tuple[float, np.ndarray]:
    """Min-max bandwidth split for the sampled clients: returns (T, b) with
    t_cp_i + t_cm_i / b_i = T for every client with data to send and sum b = B.

    T solves g(T) = sum_i t_cm_i / (T - t_cp_i) = B on T > max t_cp; g is strictly
    decreasing and convex there, so the root is unique and also the optimum of
    min_b max_i (t_cp_i + t_cm_i / b_i) (any other split slows someone down).
    Solved in the gap x = T - c_max with d_i = c_max - t_cp_i >= 0, so T - t_cp_i = x + d_i
    never suffers cancellation; the root is bracketed by
      x_lo = max_i (t_cm_i / B - d_i)  (each client alone with all of B, g >= B there)
      x_hi = sum_i t_cm_i / B           (g <= B there; this is the Theorem-2 step)
    and found by Brent's method to ~1e-15 relative.

    Edge cases: no clients -> (0.0, empty). Clients with t_cm_i = 0 get b_i = 0 and only
    bound T from below (T = max(root, their t_cp)); if nobody uploads, T = max t_cp and
    b = 0.
    """
    c, u, bw = _check_alloc(compute_s, upload_s_hz, bandwidth_hz)
    n = c.size
    b = np.zeros(n)
    if n == 0:
        return 0.0, b
    pos = u > 0
    if not np.any(pos):
        return float(c.max()), b
    cp, up = c[pos], u[pos]
    c_max = float(cp.max())
    d = c_max - cp
    x_lo = float(np.max(up / bw - d))
    x_hi = float(up.sum() / bw)

    def excess(x: float) -> float:
        return float(np.sum(up / (x + d))) - bw

    if x_hi <= x_lo or excess(x_hi) >= 0.0:
        # Single dominant client (or all tied): x_lo == x_hi up to rounding.
        x = x_hi
    elif excess(x_lo) <= 0.0:
        x = x_lo
    else:
        x = brentq(excess, x_lo, x_hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
    bp = up / (x + d)
    bp *= bw / bp.sum()  # remove the last ~1e-15 so that sum b == B to rounding
    b[pos] = bp
    T = c_max + x
    zero_c = c[~pos]
    if zero_c.size:
        T = max(T, float(zero_c.max()))
    return float(T), b


def equal_split_allocation(compute_s: np.ndarray, upload_s_hz: np.ndarray, bandwidth_hz: float) -> tuple[float, np.ndarray]:
    """Baseline: b_i = B / |S| for everybody, T = max_i (t_cp_i + t_cm_i |S| / B).
    Empty -> (0.0, empty)."""
    c, u, bw = _check_alloc(compute_s, upload_s_hz, bandwidth_hz)
    n = c.size
    if n == 0:
        return 0.0, np.zeros(0)
    b = np.full(n, bw / n)
    return float(np.max(c + u * n / bw)), b


def _check_prob(q: np.ndarray, n: int) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (n,):
        raise ValueError(f"participation_prob must have shape ({n},), got {q.shape}")
    if np.any(~np.isfinite(q)) or np.any(q < 0) or np.any(q > 1):
        raise ValueError("participation probabilities must lie in [0, 1]")
    return q


def expected_max_compute_s(compute_s: np.ndarray, participation_prob: np.ndarray) -> float:
    """Exact E[max_{i in S} t_cp_i] under independent Bernoulli(q_i) sampling (0 when S is
    empty): sort ascending and sum_k t_(k) q_(k) prod_{m > k} (1 - q_(m)).

    The events "position k is the last sampled in sorted order" are disjoint and cover
    every non-empty S, so ties are handled exactly (a tied group is counted once, through
    its last sampled member)."""
    c = np.atleast_1d(np.asarray(compute_s, dtype=np.float64))
    if c.ndim != 1 or not np.all(np.isfinite(c)):
        raise ValueError("compute_s must be a finite 1-D array")
    q = _check_prob(participation_prob, c.size)
    if c.size == 0:
        return 0.0
    order = np.argsort(c, kind="stable")
    cs, qs = c[order], q[order]
    # suffix[k] = prod_{m > k} (1 - q_m)
    miss = 1.0 - qs
    suffix = np.ones_like(miss)
    suffix[:-1] = np.cumprod(miss[::-1])[::-1][1:]
    return float(np.sum(cs * qs * suffix))


def round_time_bound_s(compute_s: np.ndarray, upload_s_hz: np.ndarray, participation_prob: np.ndarray,
                       bandwidth_hz: float, download_s: np.ndarray | None = None) -> float:
    """Theorem 2 with the broadcast: E[T] <= E[max_{i in S} t_dl_i] + E[max_{i in S} t_cp_i]
    + sum_i q_i t_cm_i / B under equal-finish allocation (per round, T = max_S t_dl (the
    broadcast goes at the weakest participant's rate) + T_up, T_up <= max_S t_cp + sum_S
    t_cm / B). ``download_s``: t_dl_i, client i's time to receive the broadcast alone
    (None: no download term, the seed's bound)."""
    c, u, bw = _check_alloc(compute_s, upload_s_hz, bandwidth_hz)
    q = _check_prob(participation_prob, c.size)
    dl = 0.0 if download_s is None else expected_max_compute_s(download_s, q)
    return dl + expected_max_compute_s(c, q) + float(np.sum(q * u)) / bw
