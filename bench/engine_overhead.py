"""Local step time: Engine.train_local vs a plain PEFT training loop (target ratio <= 1.10).

Both train the same rank-r LoRA (query/value + the score head) of the embedded
all-MiniLM-L6-v2 on the same ARC-Easy batches with a fresh AdamW each call, with the same
cross-encoder scorer (encode "[CLS] question [SEP] option [SEP]", mean of the token
logits of the one-label token-classification head, cross-entropy over the options). The plain loop is written out below on a `get_peft_model`
of a second copy of the base: its batches are tokenized, length-grouped (the same rule as
the engine's CPU path) and padded *before* timing, so it is the pure compute lower bound
and the ratio is everything the engine adds (tokenization cache, padding, adapter switch
and copy in/out, finite checks, optimizer creation).
Measured interleaved (engine, plain, engine, plain, ...); medians of per-step times.

    python bench/engine_overhead.py [--rank 8] [--batch-size 8] [--steps 10] [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from fedlora.data import load_tasks
from fedlora.model import EMBEDDED_MODEL, SCORE_HEAD, Engine, ModelSpec, load_base_model


def groups(lengths: list[int]) -> list[list[int]]:
    """Sort by length, cut where the length grows by > 25% (groups of >= 8)."""
    if len(lengths) <= 8:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = [[]]
    for i in order:
        if len(out[-1]) >= 8 and lengths[i] > 1.25 * lengths[out[-1][0]]:
            out.append([])
        out[-1].append(i)
    return out


def prepare(tokenizer, batch, max_length: int):
    """Pre-padded (input_ids, attention_mask, token_type_ids, positions) per length group."""
    enc = tokenizer([q.text for q in batch for _ in q.options], [o for q in batch for o in q.options],
                    truncation="longest_first", max_length=max_length)
    parts = []
    for g in groups([len(x) for x in enc["input_ids"]]):
        padded = tokenizer.pad({k: [enc[k][i] for i in g] for k in ("input_ids", "token_type_ids")},
                               return_tensors="pt")
        parts.append((padded["input_ids"], padded["attention_mask"], padded["token_type_ids"], torch.tensor(g)))
    owner = torch.tensor([i for i, q in enumerate(batch) for _ in q.options])
    slot = torch.tensor([j for q in batch for j in range(len(q.options))])
    return parts, owner, slot, max(len(q.options) for q in batch), torch.tensor([q.label for q in batch])


def plain_batches(tokenizer, batches, max_length):
    return [prepare(tokenizer, batch, max_length) for batch in batches]


def mean_logit(logits, mask):
    """A pair's score: its token logits [G, L, 1] averaged over the attention mask."""
    return (logits[..., 0] * mask).sum(1) / mask.sum(1)


def plain_train(peft_model, lora_params, start, prepared, lr):
    with torch.no_grad():
        for (pa, pb), (a, b) in zip(lora_params, start.values()):
            pa.copy_(a)
            pb.copy_(b)
    opt = torch.optim.AdamW([p for pair in lora_params for p in pair], lr=lr)
    for parts, owner, slot, width, labels in prepared:
        vals = torch.empty(len(owner))
        vals = vals.index_put((torch.cat([g for *_, g in parts]),),
                              torch.cat([mean_logit(peft_model(input_ids=i, attention_mask=m, token_type_ids=t).logits, m)
                                         for i, m, t, _ in parts]))
        scores = torch.full((len(labels), width), float("-inf")).index_put((owner, slot), vals)
        loss = F.cross_entropy(scores, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = stable timings on a busy machine)")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    train = list(load_tasks(None, ["ARC-Easy"])["ARC-Easy"].train)
    random.Random(0).shuffle(train)
    bs, steps, r = args.batch_size, args.steps, args.rank
    batches = [train[i * bs:(i + 1) * bs] for i in range(steps)]
    spec = ModelSpec(EMBEDDED_MODEL, max_length=64)
    engine = Engine(spec, rank=r, seed=0)
    start = engine.init_state(0)
    scaling = spec.lora_alpha / r

    base, _ = load_base_model(engine.path, "encoder")
    plain = get_peft_model(base, LoraConfig(r=r, lora_alpha=spec.lora_alpha,
                                            target_modules=["query", "value", SCORE_HEAD]))
    plain.eval()  # no dropout anywhere, as in the engine
    layers = {n: m for n, m in sorted(plain.get_base_model().named_modules()) if hasattr(m, "lora_A")}
    assert list(layers) == list(start)
    lora_params = [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in layers.values()]
    prepared = plain_batches(engine.tokenizer, batches, spec.max_length)

    engine.train_local(start, scaling=scaling, batches=batches[:2], lr=args.lr, optimizer="adamw")  # warm caches
    plain_train(plain, lora_params, start, prepared[:2], args.lr)
    res = engine.train_local(start, scaling=scaling, batches=batches, lr=args.lr, optimizer="adamw")
    plain_train(plain, lora_params, start, prepared, args.lr)
    diff = max(max((res.state[n][0] - pa).abs().max().item(), (res.state[n][1] - pb).abs().max().item())
               for n, (pa, pb) in zip(layers, lora_params))
    print(f"same math: max |engine - plain| over all LoRA factors after {steps} steps = {diff:.1e}")
    t_engine, t_plain, c_engine, c_plain = [], [], [], []
    for _ in range(args.reps):
        w, c = time.perf_counter(), time.process_time()
        engine.train_local(start, scaling=scaling, batches=batches, lr=args.lr, optimizer="adamw")
        t_engine.append((time.perf_counter() - w) / steps)
        c_engine.append((time.process_time() - c) / steps)
        w, c = time.perf_counter(), time.process_time()
        plain_train(plain, lora_params, start, prepared, args.lr)
        t_plain.append((time.perf_counter() - w) / steps)
        c_plain.append((time.process_time() - c) / steps)

    me, mp = statistics.median(t_engine), statistics.median(t_plain)
    ce, cp = statistics.median(c_engine), statistics.median(c_plain)
    print(f"model {EMBEDDED_MODEL}, rank {r}, batch {bs}, {steps} steps x {args.reps} reps, {args.threads} thread(s)")
    print(f"engine.train_local : {me * 1e3:8.1f} ms/step wall  {ce * 1e3:8.1f} ms/step cpu")
    print(f"plain PEFT loop    : {mp * 1e3:8.1f} ms/step wall  {cp * 1e3:8.1f} ms/step cpu")
    print(f"ratio engine/plain : {me / mp:.3f} wall  {ce / cp:.3f} cpu   (medians; target <= 1.10)")
    print(f"ratio of best reps : {min(t_engine) / min(t_plain):.3f} wall  {min(c_engine) / min(c_plain):.3f} cpu"
          "   (least disturbed on a busy machine)")


if __name__ == "__main__":
    main()
