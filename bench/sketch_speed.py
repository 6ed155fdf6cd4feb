"""Per-step time of Engine.train_local at sketch ratios s = 1, 1/2, 1/4, 1/8 of rank r.

Fits t(s) = c0 + c1 * s by least squares and reports whether the paper's linear compute
model (c0 ~ 0) or the affine one (fixed_fraction f = c0 / (c0 + c1)) describes the real
model: the frozen base model's forward/backward does not shrink with s, so expect affine.
Ratios are measured interleaved (each rep runs every s once); medians per step.

    python bench/sketch_speed.py [--rank 32] [--batch-size 8] [--steps 6] [--reps 5] [--threads 1]
        [--targets query,key,value,dense] [--layers 5]

--layers puts LoRA in those blocks only (the study setting, experiments/base.yaml: 5); the
frozen blocks below are then cached by the engine and warmed up before timing.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import numpy as np
import torch

from fedlora.data import load_tasks
from fedlora.model import EMBEDDED_MODEL, Engine, ModelSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--targets", default="query,value")
    ap.add_argument("--layers", default=None, help="e.g. 5 or 4,5 (default: every block)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train = list(load_tasks(None, ["ARC-Easy"])["ARC-Easy"].train)
    random.Random(0).shuffle(train)
    bs, r = args.batch_size, args.rank
    batches = [train[i * bs:(i + 1) * bs] for i in range(args.steps)]
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    spec = ModelSpec(EMBEDDED_MODEL, max_length=64, target_modules=tuple(args.targets.split(",")), lora_layers=layers)
    engine = Engine(spec, rank=r, seed=0)
    full = engine.init_state(0)
    ratios = [1.0, 0.5, 0.25, 0.125]
    ks = [max(1, math.ceil(s * r)) for s in ratios]
    starts = {k: {n: (a[:k].clone(), b[:, :k].clone()) for n, (a, b) in full.items()} for k in ks}
    for k in ks:  # warm up: tokenization cache, adapters built
        engine.train_local(starts[k], scaling=spec.lora_alpha / k, batches=batches[:1], lr=1e-3, optimizer="adamw")
    times: dict[int, list[float]] = {k: [] for k in ks}
    cpu: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(args.reps):
        for k in ks:
            c = time.process_time()
            res = engine.train_local(starts[k], scaling=spec.lora_alpha / k, batches=batches, lr=1e-3, optimizer="adamw")
            times[k].append(res.compute_s / res.num_steps)
            cpu[k].append((time.process_time() - c) / res.num_steps)
    t = np.array([statistics.median(times[k]) for k in ks])  # wall (LocalResult.compute_s)
    tc = np.array([statistics.median(cpu[k]) for k in ks])
    s = np.array(ratios)
    c1, c0 = np.polyfit(s, t, 1)
    lin = float(np.sum(s * t) / np.sum(s * s))  # best t = c * s
    rms_aff = float(np.sqrt(np.mean((c0 + c1 * s - t) ** 2)))
    rms_lin = float(np.sqrt(np.mean((lin * s - t) ** 2)))
    print(f"model {EMBEDDED_MODEL}, targets {args.targets}, blocks {args.layers or 'all'} "
          f"(cached below: {engine.frozen_prefix}), r = {r}, batch {bs}, "
          f"{args.steps} steps x {args.reps} reps, {args.threads} thread(s)")
    for si, k, ti, tci in zip(ratios, ks, t, tc):
        print(f"  s = {si:<6} k = {k:<3} {ti * 1e3:8.1f} ms/step wall   t(s)/t(1) = {ti / t[0]:.3f}"
              f"   (cpu {tci * 1e3:8.1f} ms/step, ratio {tci / tc[0]:.3f})")
    f = c0 / (c0 + c1)
    print(f"affine fit  t(s) = {c0 * 1e3:.1f} ms + {c1 * 1e3:.1f} ms * s   (rms {rms_aff * 1e3:.2f} ms)")
    print(f"linear fit  t(s) = {lin * 1e3:.1f} ms * s              (rms {rms_lin * 1e3:.2f} ms)")
    kind = "affine" if f > 0.1 else "linear"
    print(f"verdict: {kind}; fixed_fraction f = c0 / (c0 + c1) = {f:.3f}  "
          f"(config: system.compute_model = {{kind: {kind}{', fixed_fraction: %.2f' % f if kind == 'affine' else ''}}})")


if __name__ == "__main__":
    main()
