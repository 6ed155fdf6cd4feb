"""Per-round wall time: Flower simulation engine (Ray, via `flwr run`) vs the in-process simulator.

    .venv/bin/python bench/flower_overhead.py [--config configs/smoke.yaml] [--clients 10] [--rounds 4]
                                              [--client-cpus 1|2]

Both run the same config and seed (and produce the same metrics). Per-round time is the
mean of the rows' `cpu_time_s` (wall seconds of one round: sampling, local training of
every participant, aggregation, eval); for Flower it includes the messaging. The query
round and Ray start-up are reported apart (`startup`). Prints the ratio flower/in-process
(goal: <= 1.1 at 10 clients). With `--client-cpus 1` (the default, as flower_app's
local-simulation federation) every ClientApp actor gets one core, so on a 2-core machine
two clients train at once, each on one thread; `--client-cpus 2` runs one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def per_round(out: Path, skip_first: bool) -> float:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()][1:]
    if skip_first and len(rows) > 1:
        rows = rows[1:]
    return sum(r["cpu_time_s"] for r in rows) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--keep", default=None, help="folder for the two run folders (default: temporary)")
    ap.add_argument("--client-cpus", type=int, default=1, help="CPUs per ClientApp actor in the simulation")
    args = ap.parse_args()

    from fedlora import simulate
    from fedlora.config import load_config
    from fedlora.flower.deploy import LocalFlower, check_result

    overrides = [f"data.num_clients={args.clients}", f"train.rounds={args.rounds}", "data.min_client_samples=4"]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedlora-bench-"))
    cfg = load_config(args.config, overrides)

    t0 = time.perf_counter()
    simulate.run(cfg, work / "inprocess", overwrite=True, progress=False)
    t_in = time.perf_counter() - t0

    flower = LocalFlower(work / "flower", nodes=args.clients, simulation=True, client_cpus=args.client_cpus)
    t0 = time.perf_counter()
    try:
        flower.start()
        done = flower.run(Path(args.config), work / "flower_out", overrides=overrides, round_timeout=600,
                          timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"flwr run failed:\n{done.stdout[-3000:]}")
        check_result(work / "flower_out", flower.logs)
    finally:
        flower.stop()
    t_fl = time.perf_counter() - t0
    # the machine may be shared: time the in-process run again after Flower, use the mean
    simulate.run(cfg, work / "inprocess2", overwrite=True, progress=False)

    a_all = (per_round(work / "inprocess", False) + per_round(work / "inprocess2", False)) / 2
    a = (per_round(work / "inprocess", True) + per_round(work / "inprocess2", True)) / 2
    b_all, b = per_round(work / "flower_out", False), per_round(work / "flower_out", True)
    spread = (per_round(work / "inprocess", False), per_round(work / "inprocess2", False))
    rows_a = [json.loads(x) for x in (work / "inprocess" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (work / "flower_out" / "metrics.jsonl").read_text().splitlines()]
    # docs/flower.md tolerances: participants and bytes exact, train loss relative 1e-4 (a
    # different torch thread count per ClientApp changes float reductions in the last bits)
    loss_diff = max((abs(a_["train_loss"] - b_["train_loss"]) / abs(a_["train_loss"])
                     for a_, b_ in zip(rows_a, rows_b) if a_.get("train_loss") is not None), default=0.0)
    same = [(r["participants"], r["upload_bytes"]) for r in rows_a] == \
        [(r["participants"], r["upload_bytes"]) for r in rows_b] and loss_diff <= 1e-4
    print(f"config {args.config}  clients {args.clients}  rounds {args.rounds}  cpus {os.cpu_count()}")
    print(f"participants per round: {[len(r['participants']) for r in rows_a[1:]]}  same metrics: {same} "
          f"(train loss max relative difference {loss_diff:.1e})")
    print(f"load average {os.getloadavg()[0]:.1f}; in-process before/after Flower: "
          f"{spread[0]:.2f} / {spread[1]:.2f} s/round (mean used below)")
    print(f"in-process : {a_all:7.2f} s/round (all)  {a:7.2f} s/round (rounds 2+)  total {t_in:6.1f} s")
    print(f"flower sim : {b_all:7.2f} s/round (all)  {b:7.2f} s/round (rounds 2+)  total {t_fl:6.1f} s "
          f"(startup incl. Ray and query round: {t_fl - sum(r['cpu_time_s'] for r in rows_b[1:]):.1f} s)")
    print(f"ratio flower/in-process per round: {b_all / a_all:.2f} (all)  {b / a:.2f} (rounds 2+)")


if __name__ == "__main__":
    main()
