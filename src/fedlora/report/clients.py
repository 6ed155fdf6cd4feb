"""Who took part, at which rank, and why: per-client view of runs (clients.json, plan.json,
metrics.jsonl in; rows, a markdown table and clients.png out).

For each client of a run: its data share p_i, compute time, the time its full-rank upload
takes alone on the whole band (its link), the participation probability q_i averaged over
the rounds (a planned method re-plans: each plan counts for the rounds it was in force),
the share of rounds it actually took part in, and its rank k_i (averaged over rounds the
same way). Reading the columns side by side is the plan's "why": q rises with data share
and falls with compute and upload time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .runs import Run, read_json_file

CLIENTS_PLOT = "clients.png"


def _plans_per_round(run: Run, final: dict) -> list[dict]:
    """The plan in force in each training round: a row's `plan` holds from its round on; a
    method that never re-plans has plan.json's throughout."""
    rounds = [r for r in run.rows if int(r.get("round", 0)) >= 1]
    current, out = None, []
    for r in rounds:
        if isinstance(r.get("plan"), dict):
            current = r["plan"]
        out.append(current or final)
    return out


def client_rows(run: Run) -> list[dict] | None:
    """One row per client (see the module docstring); None when the run folder lacks
    clients.json or a plan.json with q (an old or foreign run); InputError when one cannot
    be read."""
    clients = read_json_file(run.path / "clients.json")
    final = read_json_file(run.path / "plan.json")
    if not isinstance(clients, list) or not isinstance(final, dict) or "participation_prob" not in final:
        return None
    band_hz = float(final.get("bandwidth_hz") or (run.config.get("system") or {}).get("bandwidth_hz") or 0.0)
    plans = _plans_per_round(run, final)
    n_rounds = max(len(plans), 1)
    taken = [0] * len(clients)
    for r in run.rows:
        if int(r.get("round", 0)) >= 1:
            for i in r.get("participants") or []:
                taken[int(i)] += 1
    rows = []
    for i, c in enumerate(clients):
        q = [float(p["participation_prob"][i]) for p in plans if "participation_prob" in p] or \
            [float(final["participation_prob"][i])]
        k = [float(p["ranks"][i]) for p in plans if "ranks" in p] or [float(final["ranks"][i])]
        rate = float(c.get("bits_per_s_per_hz") or 0.0) * band_hz
        rows.append({"id": c.get("id", i), "data_share": float(c["data_share"]),
                     "compute_time_s": float(c["compute_time_s"]),
                     "upload_alone_s": float(c["upload_bits"]) / rate if rate > 0 else float("inf"),
                     "participation_prob": sum(q) / len(q), "participation_rate": taken[i] / n_rounds,
                     "rank": sum(k) / len(k)})
    return rows


def clients_markdown(method: str, seed, rows: Sequence[dict]) -> list[str]:
    """The table of client_rows for one run, with a line that says how to read it."""
    out = [f"## Clients of {method}" + (f" (seed {seed})" if seed is not None else ""), "",
           "q: participation probability, mean over rounds (the plan in force each round); taken: share of "
           "rounds the client took part in; upload alone: its full-rank upload on the whole band (its link). "
           "A planner gives more q to a large data share and less to slow compute or a slow link.", "",
           "| client | data share | compute (s) | upload alone (s) | q | taken | rank |",
           "|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        out.append(f"| {r['id']} | {r['data_share']:.3f} | {r['compute_time_s']:.1f} | {r['upload_alone_s']:.1f} | "
                   f"{r['participation_prob']:.2f} | {r['participation_rate']:.2f} | {r['rank']:.1f} |")
    return out


def write_clients_plot(views: dict[str, list[dict]], out_dir: Path) -> Path | None:
    """clients.png: one panel per method, each client at (compute time, upload time alone),
    its color the share of rounds it took part in, its size its data share, its label its rank."""
    if not views:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(4, len(views))
    nrows = -(-len(views) // ncols)
    fig = Figure(figsize=(4.0 * ncols + 1.0, 3.4 * nrows + 0.4), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel()
    points = None
    for ax, (label, rows) in zip(axes, views.items()):
        x = [r["compute_time_s"] for r in rows]
        y = [r["upload_alone_s"] for r in rows]
        size = [40 + 1500 * r["data_share"] for r in rows]
        points = ax.scatter(x, y, s=size, c=[r["participation_rate"] for r in rows], cmap="viridis", vmin=0, vmax=1,
                            edgecolors="black", linewidths=0.5)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"{r['id']}: r{r['rank']:.0f}", (xi, yi), textcoords="offset points", xytext=(6, 4),
                        fontsize="x-small")
        ax.set_title(label)
        ax.set_xlabel("compute time (s)")
        ax.grid(alpha=0.3)
    for ax in axes[len(views):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("full-rank upload alone on the band (s)")
    fig.colorbar(points, ax=list(axes), label="share of rounds taken part in")
    fig.suptitle("Clients: who took part (color), data share (size), rank (label)")
    path = out_dir / CLIENTS_PLOT
    fig.savefig(path, dpi=110)
    return path
