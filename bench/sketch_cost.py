"""What a rank sketch costs with the configured local training (docs/theory.md section 8.3).

For two clients of a config, from the initial adapter: the full-rank update Delta (tau local
steps) and, for each k < r, `--draws` rank-k sketches of the same local training (same
batches, a fresh random rank subset each), scattered back to the rank-r factor space. Prints
per k:
  c = <E u, Delta> / ||Delta||^2      retention (the seed's ideal sketch: 1)
  e = E||u||^2 / ||Delta||^2          energy ratio (local SGD: r/k; a local Adam: k/r)
  phi = e / c^2                       variance per unit of retained signal (the seed's: r/k)
and theta of the fit phi = (r/k)^theta (least squares in log-log; the seed's theta is 1), the
value `planner.online.sketch_exponent` takes.

Run: .venv/bin/python bench/sketch_cost.py [CONFIG] [--draws 24] [--clients 0,1]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fedlora import setup as setup_mod
from fedlora import streams
from fedlora.aggregation import SketchedUpdate, scatter_sum
from fedlora.config import load_config
from fedlora.methods.manual import sketch_job


def flat(state) -> torch.Tensor:
    return torch.cat([torch.cat([a.flatten(), b.flatten()]) for a, b in state.values()]).double()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="experiments/base.yaml")
    ap.add_argument("--draws", type=int, default=24)
    ap.add_argument("--clients", default="0,1")
    args = ap.parse_args()
    cfg = load_config(args.config)
    setup = setup_mod.build_setup(cfg)
    ctx = setup.method_context()
    state = setup.engine.init_state(setup_mod.derived_seed(cfg.seed, streams.STREAM_INIT))
    r = cfg.lora.rank

    def update(client: int, k: int, draw: int) -> torch.Tensor:
        job = sketch_job(ctx, state, draw, client, k)  # the draw picks the rank subset
        res = setup_mod.local_train(setup, job, 1)  # the same batches for every draw
        delta = {n: (a - job.start[n][0], b - job.start[n][1]) for n, (a, b) in res.state.items()}
        return flat(scatter_sum(state, [SketchedUpdate(client_id=client, rank_indices=job.rank_indices,
                                                       delta=delta, weight=1.0)]))

    print(f"{args.config}: r = {r}, optimizer {cfg.train.optimizer}, lr {cfg.train.lr}, tau {cfg.train.local_steps}")
    print(f"{'client':>6} {'k':>3} {'c':>7} {'e':>7} {'phi':>8} {'seed r/k':>8}")
    xs, ys = [], []
    for client in (int(c) for c in args.clients.split(",")):
        full = update(client, r, 0)
        norm2 = float(full @ full)
        for k in sorted({k for k in (r // 2, r // 4, r // 8, 1) if 1 <= k < r}, reverse=True):
            us = torch.stack([update(client, k, d) for d in range(1, args.draws + 1)])
            c = float(us.mean(0) @ full) / norm2
            e = float((us * us).sum(1).mean()) / norm2
            phi = e / c ** 2
            xs.append(np.log(r / k))
            ys.append(np.log(phi))
            print(f"{client:>6} {k:>3} {c:>7.3f} {e:>7.3f} {phi:>8.2f} {r / k:>8.1f}", flush=True)
    xs, ys = np.array(xs), np.array(ys)
    theta = float(xs @ ys / (xs @ xs))
    print(f"fit phi = (r/k)^theta: theta = {theta:.2f} (the seed's sketch: 1.00)")


if __name__ == "__main__":
    main()
