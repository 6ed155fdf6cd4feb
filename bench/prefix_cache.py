"""Per-step training time with LoRA in the top block only, with and without the engine's
cache of the frozen blocks below it, against LoRA in every block (the default).

Three engines on the same batches, interleaved reps, medians per step:
  all      LoRA in all six blocks: the full forward and backward pass
  top      LoRA in block 5 only, the cache switched off (Engine.frozen_prefix = 0)
  top+cache  LoRA in block 5 only, blocks 0-4 read from the cache (the study setting)
Prints the ratios all/top+cache and top/top+cache, and checks that cached and uncached
training give the same adapter (max abs difference).

    python bench/prefix_cache.py [--rank 8] [--batch-size 8] [--steps 5] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from fedlora.data import load_tasks
from fedlora.model import EMBEDDED_MODEL, Engine, ModelSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tasks = load_tasks(None, ["ARC-Easy", "social_i_qa"])
    train = list(tasks["ARC-Easy"].train) + list(tasks["social_i_qa"].train)
    random.Random(0).shuffle(train)
    bs = args.batch_size
    batches = [train[i * bs:(i + 1) * bs] for i in range(args.steps)]
    engines = {"all": Engine(ModelSpec(EMBEDDED_MODEL, max_length=64), rank=args.rank, seed=0),
               "top": Engine(ModelSpec(EMBEDDED_MODEL, max_length=64, lora_layers=(5,)), rank=args.rank, seed=0),
               "top+cache": Engine(ModelSpec(EMBEDDED_MODEL, max_length=64, lora_layers=(5,)), rank=args.rank, seed=0)}
    engines["top"].frozen_prefix = 0
    starts = {name: e.init_state(0) for name, e in engines.items()}
    results = {}
    for name, e in engines.items():  # warm up: tokenization, adapters, the cache
        results[name] = e.train_local(starts[name], scaling=2.0, batches=batches, lr=1e-3, optimizer="adamw")
    diff = max(float((results["top"].state[n][i] - results["top+cache"].state[n][i]).abs().max())
               for n in results["top"].state for i in (0, 1))
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.reps):
        for name, e in engines.items():
            res = e.train_local(starts[name], scaling=2.0, batches=batches, lr=1e-3, optimizer="adamw")
            times[name].append(res.compute_s / res.num_steps)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"model {EMBEDDED_MODEL}, r = {args.rank}, batch {bs} questions, {args.steps} steps x {args.reps} reps, "
          f"{args.threads} thread(s)")
    for name, t in med.items():
        print(f"  {name:<10} {t * 1e3:8.1f} ms/step")
    print(f"ratio all / top+cache = {med['all'] / med['top+cache']:.2f}   "
          f"top / top+cache = {med['top'] / med['top+cache']:.2f}")
    print(f"cached vs uncached adapter after {args.steps} steps: max |diff| = {diff:.2e}")


if __name__ == "__main__":
    main()
