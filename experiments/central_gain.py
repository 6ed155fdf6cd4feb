"""How much there is to learn: one adapter trained centrally on the pooled train questions,
scored on the full test sets, gain per task in standard errors of one evaluation.

A scouting measurement for choosing a study setting (docs/results.md, "Scouting the 50-client setting"), not
a compared run: the federated reference of a setting gains at most about this much.

    python experiments/central_gain.py --layers 5 --targets query,value --lr 3e-3 \\
        --train-per-task 1000 --out central.json
"""

from __future__ import annotations

import argparse
import json
import math
import random

from fedlora.data import load_tasks
from fedlora.model import EMBEDDED_MODEL, Engine, ModelSpec

TASKS = ["ARC-Easy", "ARC-Challenge", "openbookqa", "social_i_qa"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="5", help="blocks with LoRA, comma-separated")
    ap.add_argument("--targets", default="query,value", help="LoRA target modules, comma-separated")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", default="0,250,500,1000,1500,2000", help="evaluate after these steps")
    ap.add_argument("--plateau-from", type=int, default=1000, help="gain: mean of the evaluations from this step on")
    ap.add_argument("--train-per-task", type=int, default=None, help="cap on train questions per task (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    tasks = load_tasks(None, TASKS)
    train = []
    for task in tasks.values():
        questions = list(task.train)
        rng.shuffle(questions)
        train += questions[:args.train_per_task]
    rng.shuffle(train)
    test = [q for task in tasks.values() for q in task.test]
    spec = ModelSpec(EMBEDDED_MODEL, max_length=64, lora_layers=tuple(int(x) for x in args.layers.split(",")),
                     target_modules=tuple(args.targets.split(",")))
    engine = Engine(spec, rank=args.rank, seed=args.seed)
    state, scaling = engine.init_state(args.seed), spec.lora_alpha / args.rank

    log, step, pos = [], 0, 0
    for mark in (int(x) for x in args.steps.split(",")):
        while step < mark:  # chunks of 50 steps, one AdamW per chunk (as a client's round)
            batches = []
            for _ in range(min(50, mark - step)):
                if pos + args.batch_size > len(train):
                    rng.shuffle(train)
                    pos = 0
                batches.append(train[pos:pos + args.batch_size])
                pos += args.batch_size
            state = engine.train_local(state, scaling=scaling, batches=batches, lr=args.lr, optimizer="adamw").state
            step += len(batches)
        row = {"step": step, **engine.evaluate(state, scaling=scaling, questions=test, batch_size=64)}
        print(json.dumps(row), flush=True)
        log.append(row)

    plateau = [r for r in log if r["step"] >= args.plateau_from] or log[-1:]
    gains = {}
    for name, task in tasks.items():
        start, n = log[0][name], len(task.test)
        ref = sum(r[name] for r in plateau) / len(plateau)
        gain, se = ref - start, math.sqrt(ref * (1 - ref) / n)
        gains[name] = {"start": start, "plateau": ref, "gain": gain, "gain_in_se": gain / se, "test_questions": n}
        print(f"{name:<14} {start:.3f} -> {ref:.3f}  gain {gain:+.3f} ({gain / se:.1f} SE of {n} questions)")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "log": log, "gains": gains}, f, indent=1)


if __name__ == "__main__":
    main()
