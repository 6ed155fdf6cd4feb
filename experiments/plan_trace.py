"""What a run's rounds looked like and, for a planned method, what its plans expected: one line
per run folder (rounds, participants, round time, time to the mean target) and, with
--plans, every plan (expected participants, sum p_i^2 omega_i, rho, predicted rounds factor,
expected round time) and, with --replan, what the current planner (docs/theory.md 8.7: the
trust region and the exposed-upload share) would have planned from each recorded estimate,
the plan before it taken as the plan in force. Reads run folders only (metrics.jsonl,
clients.json, config.yaml).

A scouting tool for the analysis on docs/results.md (e.g. why a method is slower on one
variant than on another), not a compared run:

    python experiments/plan_trace.py runs/experiments/sota/proposed/seed0 \\
        runs/experiments/sensitivity/alpha-1.0/proposed/seed0 --target 0.366 --plans
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from fedlora.config import load_config
from fedlora.methods.base import compute_model
from fedlora.methods.proposed import online_guards
from fedlora.online import fixed_step_model
from fedlora.planner import PlanProblem, monte_carlo_round_time_s, plan
from fedlora.rundir import read_rows, time_to_target
from fedlora.setup import link_times


def summary(folder: Path, target: float | None) -> dict:
    rows = [r for r in read_rows(folder) if r["round"] > 0]
    parts = [len(r["participants"]) for r in rows]
    times = [r["round_time_s"] for r in rows]
    return {"run": str(folder), "rounds": len(rows), "participants_mean": float(np.mean(parts)) if parts else 0.0,
            "round_time_s_mean": float(np.mean(times)) if times else 0.0,
            "round_time_s_median": float(np.median(times)) if times else 0.0,
            "sim_time_s": rows[-1]["sim_time_s"] if rows else 0.0,
            "time_to_mean_target_s": time_to_target(read_rows(folder), target) if target is not None else None}


def plans(folder: Path) -> list[dict]:
    shares = np.array([c["data_share"] for c in json.loads((folder / "clients.json").read_text())])
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    floor = ((cfg.get("planner") or {}).get("online") or {}).get("min_participation", 0.05)
    out = []
    for r in read_rows(folder):
        p = r.get("plan")
        if not p:
            continue
        omega = np.array(p.get("relative_energy", [np.nan] * len(shares)))
        out.append({"round": p["round"], "expected_participants": p["expected_participants"],
                    "sum_p2_omega": float((shares ** 2 * omega).sum()), "step_ratio": p.get("step_ratio"),
                    "rounds_factor": p["rounds_factor"], "expected_round_time_s": p["expected_round_time_s"],
                    "clients_at_floor": int(np.sum(np.isclose(p["participation_prob"], floor))),
                    "mean_rank": float(np.mean(p["ranks"]))})
    return out


def replans(folder: Path) -> list[dict]:
    """Each recorded online plan re-made by the current planner from the same estimates (relative
    energies, rho), the previous recorded plan in force (q = s = 1 before the first)."""
    cfg = load_config(folder / "config.yaml")
    clients = json.loads((folder / "clients.json").read_text())
    share = np.array([c["data_share"] for c in clients])
    upload_s_hz, download_s = link_times(cfg, [c["bits_per_s_per_hz"] for c in clients],
                                         np.array([c["upload_bits"] for c in clients]))

    def problem(model, floor=1e-6, exposed=1.0) -> PlanProblem:
        return PlanProblem(data_share=share, compute_time_s=np.array([c["compute_time_s"] for c in clients]),
                           upload_s_hz=upload_s_hz, bandwidth_hz=cfg.system.bandwidth_hz, rank=cfg.lora.rank,
                           compute_model=compute_model(cfg), constants=model, pin_large_clients=True,
                           min_participation=floor, download_s=download_s, upload_exposed_fraction=exposed)

    out, q_now, k_now = [], np.ones(share.size), np.full(share.size, cfg.lora.rank)
    first = True
    for r in read_rows(folder):
        p = r.get("plan")
        if not p or "relative_energy" not in p:
            continue
        model = fixed_step_model(share, p["relative_energy"], p["step_ratio"], cfg.planner.online.sketch_exponent)
        floor, exposed = online_guards(problem(model), q_now, k_now / cfg.lora.rank,
                                       cfg.planner.online.min_participation)
        pr = problem(model, floor, exposed)
        new = plan(pr) if first else plan(pr, start=(q_now, k_now), grid_points=0)
        true_t = monte_carlo_round_time_s(new.participation_prob, new.sketch_ratio, pr, rounds=400, seed=1)[0]
        out.append({"round": p["round"], "recorded_participants": p["expected_participants"],
                    "replanned_participants": float(new.participation_prob.sum()),
                    "upload_exposed_fraction": pr.upload_exposed_fraction,
                    "replanned_round_time_s": new.expected_round_time_s, "true_round_time_s": true_t,
                    "replanned_mean_rank": float(new.ranks.mean())})
        q_now, k_now, first = np.asarray(p["participation_prob"]), np.asarray(p["ranks"]), False
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--target", type=float, help="mean-accuracy target")
    ap.add_argument("--plans", action="store_true", help="also every plan of a planned run")
    ap.add_argument("--replan", action="store_true", help="also each online plan re-made by the current planner")
    args = ap.parse_args()
    for folder in args.runs:
        s = summary(folder, args.target)
        ttt = s["time_to_mean_target_s"]
        print(f"{s['run']}: {s['rounds']} rounds, {s['participants_mean']:.1f} participants/round, round time "
              f"mean {s['round_time_s_mean']:.1f} s (median {s['round_time_s_median']:.1f}), "
              f"{s['sim_time_s']:.0f} s in all" + (f", mean target at {ttt:.0f} s" if ttt is not None else
                                                   ", mean target not reached" if args.target else ""))
        if args.plans:
            for p in plans(folder):
                rho = "-" if p["step_ratio"] is None else f"{p['step_ratio']:.3f}"
                print(f"  plan @ round {p['round']:3d}: E[participants] {p['expected_participants']:5.1f}, "
                      f"sum p^2 omega {p['sum_p2_omega']:6.2f}, rho {rho}, R {p['rounds_factor']:.2f}, "
                      f"E[round] {p['expected_round_time_s']:5.1f} s, at the q floor {p['clients_at_floor']}, "
                      f"mean rank {p['mean_rank']:.1f}")
        if args.replan:
            for p in replans(folder):
                print(f"  re-plan @ round {p['round']:3d}: E[participants] {p['recorded_participants']:5.1f} -> "
                      f"{p['replanned_participants']:5.1f}, exposed upload share {p['upload_exposed_fraction']:.2f}, "
                      f"E[round] {p['replanned_round_time_s']:5.1f} s (Monte Carlo {p['true_round_time_s']:5.1f} s), "
                      f"mean rank {p['replanned_mean_rank']:.1f}")


if __name__ == "__main__":
    main()
