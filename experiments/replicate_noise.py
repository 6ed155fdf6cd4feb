"""How far a time to target moves within one setting: the same methods and seeds run again with
fresh training draws (`train.replicate=k`, docs/report.md), against how far it moves between
seeds. A scouting measurement of the comparison's noise, not a compared run:

    for k in 1 2; do fedlora compare configs/demo.yaml --seeds 0,1,2,3,4 --methods proposed,fslora \\
        --target mean=0.344 --baseline fslora -o runs/demo-rep$k train.replicate=$k; done
    python experiments/replicate_noise.py fslora proposed runs/demo-compare/summary.json \\
        runs/demo-rep1/summary.json runs/demo-rep2/summary.json

Arguments: the baseline, the method, then one compare summary.json per draw (the first is
replicate 0, the seed's own draw). A run that missed the target counts at its last time (a
lower bound, marked *). Prints per seed each draw's times and BASELINE / METHOD, the geometric
mean ratio of each draw over the seeds, the paired test of fedlora's summaries
(`report.paired_test`: sign test, t-test and interval) over the seeds' mean log ratios, and per
method the standard deviation of log time within a seed (pooled over seeds) and between the
seeds' means.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np

from fedlora.report import paired_test


def times(summary: dict, label: str) -> dict[int, tuple[float, bool]]:
    """seed -> (time to the report's primary target or the run's last time, reached)."""
    out = {}
    for r in summary["runs"]:
        if r["label"] == label:
            t = (r["time_to_target_s"] or {}).get(summary["primary_target"])
            out[r["seed"]] = (t, True) if t is not None else (r["sim_time_s"], False)
    return out


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    base, method, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    draws = [json.load(open(f)) for f in files]
    by = {m: [times(d, m) for d in draws] for m in (base, method)}
    seeds = sorted(set.intersection(*(set(t) for m in by for t in by[m])))
    cell = lambda tr: f"{tr[0]:.0f}" + ("" if tr[1] else "*")  # noqa: E731
    print(f"| seed | {base} (s), draws 0-{len(draws) - 1} | {method} (s) | {base} / {method} |")
    print("|--:|--:|--:|--:|")
    log_ratio = np.zeros((len(seeds), len(draws)))
    for a, s in enumerate(seeds):
        b, m = [t[s] for t in by[base]], [t[s] for t in by[method]]
        log_ratio[a] = [math.log(x[0] / y[0]) for x, y in zip(b, m)]
        print(f"| {s} | {', '.join(map(cell, b))} | {', '.join(map(cell, m))} | "
              + ", ".join(f"{math.exp(v):.2f}x" for v in log_ratio[a]) + " |")
    print()
    for k in range(len(draws)):
        print(f"draw {k}: geometric mean {base} / {method} over seeds {math.exp(log_ratio[:, k].mean()):.2f}x")
    print(f"all draws: {math.exp(log_ratio.mean()):.2f}x; per seed, geometric mean over draws: "
          + ", ".join(f"{math.exp(v):.2f}x" for v in log_ratio.mean(axis=1))
          + f"; pairs at >= 2x: {int((log_ratio >= math.log(2)).sum())} of {log_ratio.size}")
    # the seed is the unit: its draws share data and clients
    test = paired_test(np.exp(log_ratio.mean(axis=1)))
    print(f"paired over seeds: {test['faster']} faster / {test['slower']} slower (sign p = {test['sign_p']:.3f}); "
          f"t-test of the seeds' mean log ratio against 0 (df {len(seeds) - 1}): p = {test['t_p']:.3f}, "
          f"95% interval of the geometric mean {test['interval'][0]:.2f}-{test['interval'][1]:.2f}x")
    for m in (base, method):
        logs = np.array([[math.log(t[s][0]) for t in by[m]] for s in seeds])
        between = math.sqrt(logs.mean(axis=1).var(ddof=1))
        within = f"{math.sqrt(logs.var(axis=1, ddof=1).mean()):.2f}" if len(draws) > 1 else "- (one draw)"
        print(f"{m}: sd of log time within a seed {within}, between seeds' means {between:.2f}")


if __name__ == "__main__":
    main()
