"""The sampling noise's curvature against the mean update's (kappa, docs/theory.md 8.6).

A scouting measurement for the online rounds model, not a compared run. A full-participation
run (`sample_full`) records every client's update u_i at the rounds named; at each, on a fixed
set of training questions (all clients' data), the curvature per unit of energy along a
direction v is measured by a central difference of the training loss at the round's adapter x,

    h(v) = (L(x + v) + L(x - v) - 2 L(x)) / ||v||^2     (the applied step's own size),

for v = D = sum_i p_i u_i (the mean update) and for v = xi_S = sum_{i in S} (p_i / q) u_i - D,
the noise of a uniform sample S of m clients (q = m / N, FSLoRA's sampling). kappa = mean
h(xi_S) / h(D); the online model takes kappa = 1. Also printed: nu = ||xi_S||^2 / ||D||^2 and
rho = b / a along D (a = (L(x - D) - L(x + D)) / 2, b = (L(x + D) + L(x - D) - 2 L(x)) / 2), the
step ratio the online estimator measures from consecutive updates (8.4).

    python experiments/noise_curvature.py CONFIG OUT [--rounds 3,6,10,15,20] [--sample 10]
        [--draws 8] [--questions 512] [OVERRIDES...]
    (the loss change of one sampled round from x, by the quadratic pieces: L(x + D) - L(x)
    + mean(h(xi_S) nu_S) ||D||^2 / 2, ||D||^2 = 2 rho a / h(D); docs/theory.md 8.6)
    python experiments/noise_curvature.py experiments/base.yaml runs/kappa
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fedlora import loop, simulate
from fedlora.config import load_config
from fedlora.methods.proposed import applied_update


def combine(state, payloads, weights: dict[int, float], minus=None):
    """sum_i w_i u_i in the adapter's factor space (full-rank payloads), less `minus`."""
    out = {}
    for k, (a, b) in state.items():
        da = sum(w * payloads[i][f"{k}.A"].double() for i, w in weights.items())
        db = sum(w * payloads[i][f"{k}.B"].double() for i, w in weights.items())
        if minus is not None:
            da, db = da - minus[k][0], db - minus[k][1]
        out[k] = (da, db)
    return out


def energy(v) -> float:
    return float(sum((da ** 2).sum() + (db ** 2).sum() for da, db in v.values()))


def shifted(state, v, sign: float):
    return {k: ((a.double() + sign * v[k][0]).to(a.dtype), (b.double() + sign * v[k][1]).to(b.dtype))
            for k, (a, b) in state.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("out", type=Path)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--rounds", default="3,6,10,15,20")
    ap.add_argument("--sample", type=int, default=10)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--questions", type=int, default=512)
    args = ap.parse_args()
    at = sorted(int(x) for x in args.rounds.split(","))
    cfg = load_config(args.config, ["method=sample_full", f"train.rounds={at[-1]}", "train.target_accuracy=null",
                                    "eval.every_s=1e9", *args.overrides])
    rows = []
    close_round = loop.close_round

    def measuring(setup, method, clock, prog, t, state, rc, jobs, replies):
        mean = None
        if t in at:
            rng = np.random.default_rng(1000 + t)
            p = setup.data_share
            ids = sorted(replies.payloads)
            qs = rng.choice(len(setup.train), size=min(args.questions, len(setup.train)), replace=False)
            questions = [setup.train[i] for i in qs]
            scaling = setup.cfg.lora.alpha / setup.cfg.lora.rank

            def loss(s) -> float:
                return setup.engine.mean_loss(s, scaling=scaling, questions=questions,
                                              batch_size=setup.cfg.eval.batch_size)

            def along(v) -> tuple[float, float]:  # L(x + v), L(x - v)
                return loss(shifted(state, v, 1.0)), loss(shifted(state, v, -1.0))

            l0 = loss(state)
            mean = combine(state, replies.payloads, {i: p[i] for i in ids})
            mean_energy = energy(mean)
            up, down = along(mean)
            h_mean = (up + down - 2 * l0) / mean_energy
            rho = (up + down - 2 * l0) / (down - up)  # b / a along the mean update (8.4)
            q = args.sample / len(ids)
            h_noise, nu = [], []
            for _ in range(args.draws):
                pick = sorted(rng.choice(ids, size=args.sample, replace=False).tolist())
                xi = combine(state, replies.payloads, {i: p[i] / q for i in pick}, minus=mean)
                xi_energy = energy(xi)
                h_noise.append((sum(along(xi)) - 2 * l0) / xi_energy)
                nu.append(xi_energy / mean_energy)
            row = {"round": t, "loss": l0, "loss_after_mean": up, "rho": rho, "h_mean": h_mean,
                   "h_noise": h_noise, "nu": nu,
                   "kappa": float(np.mean(h_noise) / h_mean),
                   "kappa_se": float(np.std(h_noise, ddof=1) / np.sqrt(len(h_noise)) / abs(h_mean))}
            rows.append(row)
            print(f"round {t}: loss {l0:.4f} -> {up:.4f}  rho {rho:.3f}  h(D) {h_mean:.4g}  "
                  f"h(xi) {np.mean(h_noise):.4g} "
                  f"(+- {np.std(h_noise, ddof=1) / np.sqrt(len(h_noise)):.2g})  kappa {row['kappa']:.3f} "
                  f"+- {row['kappa_se']:.3f}  nu {np.mean(nu):.2f}", flush=True)
        new, out = close_round(setup, method, clock, prog, t, state, rc, jobs, replies)
        if t in at:  # D is what the server applied (full participation, weights p_i)
            flat_mean = torch.cat([torch.cat([mean[k][0].flatten(), mean[k][1].flatten()]) for k in sorted(state)])
            gap = float(((applied_update(state, new) - flat_mean) ** 2).sum())
            assert gap <= 1e-6 * energy(mean), f"D is not the applied update ({gap:.3g})"
        return new, out

    loop.close_round = measuring  # the loop looks it up at call time
    simulate.run(cfg, args.out, overwrite=True, progress=False)
    (args.out / "noise_curvature.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
