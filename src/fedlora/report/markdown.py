"""summary.md: the summary as readable tables."""

from __future__ import annotations

import math

from ..config import MEAN
from .runs import ALL, Target
from .clients import clients_markdown

# ------------------------------------------------------------------ markdown


def _fmt_stat(s: dict, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    if not s or s["n"] == 0:
        return "—"
    mean = fmt.format(s["mean"] / scale)
    return mean if s["n"] == 1 else f"{mean} ± {fmt.format(s['std'] / scale)}"


def _fmt_time(t: dict) -> str:
    if t["reached"] == 0:
        return "not reached"
    cell = _fmt_stat(t, "{:.1f}")
    return cell if t["reached"] == t["of"] else f"{cell} ({t['reached']}/{t['of']})"


def _fmt_speedup(s: dict | None) -> str:
    if not s:
        return "—"
    v = "∞" if math.isinf(s["value"]) else f"{s['value']:.2f}"
    return f"{v}× vs {s['vs']}"


def _fmt_pair_speedup(cell: dict) -> str:
    if cell["value"] is None:
        return "—"
    ratios = [v["ratio"] for v in cell["per_seed"].values()]
    text = f"{'>' if cell['at_least'] else ''}{cell['value']:.2f}×"
    if len(ratios) > 1:
        text += f" [{min(ratios):.2f}–{max(ratios):.2f}]"
    return text


def _fmt_test(t: dict | None) -> list[str]:
    if t is None:
        return ["—"] * 5
    seeds = f"{t['seeds']}" + (f" ({t['bounds']} bounds)" if t["bounds"] else "")
    sign_p = "—" if t["sign_p"] is None else f"{t['sign_p']:.3f}"
    gm = "—" if t["geometric_mean"] is None else f"{t['geometric_mean']:.2f}×"
    if t["interval"] is not None:
        gm += f" [{t['interval'][0]:.2f}–{t['interval'][1]:.2f}]"
    return [seeds, f"{t['faster']} / {t['slower']}", sign_p, gm, "—" if t["t_p"] is None else f"{t['t_p']:.3f}"]


def _fmt_stat_of(s: dict, n: int) -> str:
    return _fmt_stat(s) + ("" if s["n"] == n else f" ({s['n']}/{n})")


def _fmt_diff(cell: dict) -> list[str]:
    """seeds, difference [95%], t p, ahead / behind, sign p."""
    def p(x):
        return "—" if x is None else f"{x:.3f}"
    n = len(cell["per_seed"])
    if not n:
        return ["0", "—", "—", "—", "—"]
    iv = cell["interval"]
    diff = f"{cell['mean']:+.3f}" + (f" [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else "")
    return [str(n), diff, p(cell["t_p"]), f"{cell['ahead']} / {cell['behind']}", p(cell["sign_p"])]


def _rounds_cell(s: dict) -> str:
    if s["n"] and s["min"] == s["max"]:
        return str(int(s["min"]))
    return _fmt_stat(s, "{:.1f}")


def _target_text(target: Target) -> str:
    if target is None:
        return ("No target accuracy (set train.target_accuracy or pass --target): "
                "time-to-target columns are left out.")
    if isinstance(target, dict):
        per_task = {t: v for t, v in target.items() if t != MEAN}
        parts = ", ".join(f"{t} ≥ {v:g}" for t, v in per_task.items())
        extra = " and all of them at once (column 'all')" if len(per_task) > 1 else ""
        mean = f"; mean over tasks ≥ {target[MEAN]:g} (column 'mean')" if MEAN in target else ""
        return f"Target accuracy per task: {parts}{extra}{mean}."
    return f"Target accuracy {target:g} on the mean over tasks and on each task."


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(a for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _per_seed_times(summary: dict, key: str, key_name) -> list[str]:
    """Each method's time to the target per seed (all tasks at once in brackets when that is
    a different key), the first of each seed in bold: what the means, ranges and paired tests
    are made of."""
    both = ALL in summary["target_keys"] and key != ALL
    seeds = sorted({r["seed"] for r in summary["runs"]})
    first = {sd: min((r["time_to_target_s"][key] for r in summary["runs"]
                      if r["seed"] == sd and r["time_to_target_s"][key] is not None), default=None)
             for sd in seeds}

    def fmt(v):
        return "—" if v is None else f"{v:,.0f}"
    cells: dict[str, dict[int, str]] = {}
    for r in summary["runs"]:
        t, sd = r["time_to_target_s"], r["seed"]
        cell = f"**{fmt(t[key])}**" if t[key] is not None and t[key] == first[sd] else fmt(t[key])
        cells.setdefault(r["label"], {})[sd] = cell + (f" ({fmt(t[ALL])})" if both else "")
    text = f"Time to the {key_name(key)} target per seed, simulated seconds as in the first table"
    text += (" (all task targets at once in brackets)" if both else "") + "; the first of each seed in bold; "
    text += "'—': not reached."
    rows = [[label] + [by_seed.get(sd, "") for sd in seeds] for label, by_seed in cells.items()]
    return ["", f"## Per seed ({key_name(key)})", "", text, ""] + _table(
        ["method"] + [f"seed {sd}" for sd in seeds], [":--"] + ["--:"] * len(seeds), rows)


def _rounds_to_target(methods: dict, key: str, key_name) -> list[str]:
    """The run's clock to the target split into rounds x round length, with the participants a
    round: whether a method gains on fewer rounds or on shorter ones."""
    out = ["", f"## Rounds and round length to the target ({key_name(key)})", "",
           "The run's own clock to the target = rounds x mean round length (the server's time, in-run "
           "planning included, is in the rounds); participants: mean per round up to the target. Over the "
           "runs that reached it in a round (not before training), mean ± std.", ""]
    rows = []
    for label, m in methods.items():
        d = m["rounds_to_target"][key]
        reached = "" if d["rounds"]["n"] == m["n"] else f" ({d['rounds']['n']}/{m['n']})"
        rows.append([label, _fmt_stat(d["rounds"], "{:.1f}") + reached,
                     _fmt_stat(d["round_s"], "{:.1f}"), _fmt_stat(d["participants"], "{:.1f}")])
    return out + _table(["method", "rounds", "s per round", "participants per round"],
                        [":--", "--:", "--:", "--:"], rows)


def render_markdown(summary: dict, title: str = "fedlora comparison") -> str:
    keys, primary = summary["target_keys"], summary["primary_target"]
    methods, tasks = summary["methods"], summary["tasks"]
    target = summary["target"]

    def key_name(k: str) -> str:
        if k == ALL:
            return "all tasks"
        return "mean" if k == MEAN else k

    header = ["method", "runs"]
    for k in keys:
        tv = target if not isinstance(target, dict) else (target.get(k) if k != ALL else None)
        header.append(f"time to {tv:g}: {key_name(k)} (s)" if tv is not None else f"time to target: {key_name(k)} (s)")
    if primary is not None:
        header.append(f"speedup ({key_name(primary)})")
    header += ["planning (s)", "final acc", "rounds", "MB up", "MB down"]
    rows = []
    for label, m in methods.items():
        row = [label, str(m["n"]) + ("" if m["finished"] == m["n"] else f" ({m['n'] - m['finished']} unfinished)")]
        row += [_fmt_time(m["time_to_target_s"][k]) for k in keys]
        if primary is not None:
            row.append(_fmt_speedup(m["speedup"].get(primary)))
        row += [_fmt_stat(m["planning_time_s"], "{:.1f}"), _fmt_stat(m["final_eval_mean"]), _rounds_cell(m["rounds"]),
                _fmt_stat(m["upload_bytes"], "{:.2f}", 1e6), _fmt_stat(m["download_bytes"], "{:.2f}", 1e6)]
        rows.append(row)
    align = [":--", "--:"] + ["--:"] * (len(header) - 2)
    times = ("Times are simulated seconds at the first evaluation at or above the target, counting what a user "
             "waits for: planning before round 1 (pilot runs and the reference run that set their loss) plus the "
             "run's own clock (which holds the planner's server time); the training-only times are in the table "
             "after. With several seeds, mean ± std over the seeds that reached it, and (k/n) when only k of n did. "
             "Planning: all planning time of a run (before and during it). ") if keys else ""
    out = [f"# {title}", "", _target_text(target),
           times + "Final accuracy: mean over tasks on the final evaluation (result.json), mean ± std over seeds. "
           "MB = 10^6 bytes, whole run.", ""]
    if summary.get("baseline"):
        out += [f"Speedup: baseline mean time / method mean time (baseline {summary['baseline']}).", ""]
    elif primary is not None:
        out += ["Speedup: mean time of the fastest other method / this method's (only methods whose every run "
                "reached the target).", ""]
    out += _table(header, align, rows)
    if keys:
        out += ["", "## Time to target on the run's own clock (planning before round 1 not counted)", ""]
        rows_t = [[label] + [_fmt_time(m["training_time_to_target_s"][k]) for k in keys] for label, m in methods.items()]
        out += _table(["method"] + [key_name(k) for k in keys], [":--"] + ["--:"] * len(keys), rows_t)
        out += _per_seed_times(summary, MEAN if MEAN in keys else primary, key_name)
        out += _rounds_to_target(methods, MEAN if MEAN in keys else primary, key_name)
    out += ["", "## Final accuracy per task", ""]
    header2 = ["method"] + tasks + ["mean", "stop reasons"]
    rows2 = []
    for label, m in methods.items():
        reasons = ", ".join(f"{k} ×{v}" for k, v in sorted(m["stop_reasons"].items()))
        rows2.append([label] + [_fmt_stat(m["final_eval"][t]) for t in tasks] + [_fmt_stat(m["final_eval_mean"]),
                                                                                  reasons])
    out += _table(header2, [":--"] + ["--:"] * (len(tasks) + 1) + [":--"], rows2)
    if summary.get("focus") and keys:  # without a target there is no time to pair
        focus = summary["focus"]["method"]
        out += ["", f"## Speedup of {focus} over each method", "",
                f"Mean time to target of the method / mean time of {focus}, over the seeds (per-seed range in "
                "brackets). '>' marks a lower bound: the method missed the target in some seed and its "
                f"capped run length stands in for its time. '—': {focus} missed the target in some seed.", ""]
        rows3 = []
        for label, per_key in summary["focus"]["speedup_over"].items():
            rows3.append([label] + [_fmt_pair_speedup(per_key[k]) for k in keys])
        out += _table(["vs"] + [key_name(k) for k in keys], [":--"] + ["--:"] * len(keys), rows3)
        out += ["", f"Paired over seeds (the seed is the unit): seeds where {focus} was faster / slower and the "
                    "exact two-sided sign-test p; the geometric mean of the per-seed ratios with its 95% t "
                    "interval and the t-test p on their logs. A lower-bound ratio enters at its bound (counted in "
                    "'bounds'), which can only understate the speedup. With five seeds the sign test cannot go "
                    "below p = 0.0625.", ""]
        rows4 = [[label, key_name(k)] + _fmt_test(per_key[k]["test"])
                 for label, per_key in summary["focus"]["speedup_over"].items() for k in keys]
        out += _table(["vs", "target", "seeds", "faster / slower", "sign p", "geometric mean [95%]", "t p"],
                      [":--", ":--"] + ["--:"] * 5, rows4)
    at = summary.get("accuracy_at_s") or []
    if at:
        out += ["", "## Mean accuracy at fixed times", "",
                "Mean accuracy over tasks a user has at each time (simulated seconds, planning before round 1 "
                "included: the initial accuracy until round 1 starts), linear between consecutive evaluations "
                "and held after a finished run's last one; mean ± std over seeds, (k/n) when only k of n runs "
                "cover the time.", ""]
        rows5 = [[label] + [_fmt_stat_of(m["accuracy_at_s"][t], m["n"]) for t in at] for label, m in methods.items()]
        out += _table(["method"] + [f"at {t} s" for t in at], [":--"] + ["--:"] * len(at), rows5)
        if summary.get("focus"):
            focus = summary["focus"]["method"]
            out += ["", f"{focus}'s mean accuracy minus each method's, paired by seed: the mean difference with "
                        "its 95% t interval and t-test p, and the seeds where it was ahead / behind with the exact "
                        "two-sided sign-test p.", ""]
            rows6 = [[label, f"{t} s"] + _fmt_diff(per_t[t])
                     for label, per_t in summary["focus"]["accuracy_over"].items() for t in at]
            out += _table(["vs", "at", "seeds", "difference [95%]", "t p", "ahead / behind", "sign p"],
                          [":--", "--:"] + ["--:"] * 5, rows6)
    views = summary.get("clients") or {}
    shown = (summary.get("focus") or {}).get("method") or \
        next((m for m, v in views.items() if v["planned"]), next(iter(views), None))  # the planned method's table
    if shown in views:
        out += [""] + clients_markdown(shown, views[shown]["seed"], views[shown]["rows"])
    if summary.get("failed"):
        out += ["", "## Runs that failed (not in the tables)", ""] + [f"- {line}" for line in summary["failed"]]
    out += ["", "Plots: accuracy_vs_time.png (accuracy per task and mean vs simulated time on each run's own "
                "clock: planning before round 1 is not drawn, the tables above count it), "
                "bytes_vs_accuracy.png (mean accuracy vs cumulative upload bytes)" +
            (", clients.png (each method's clients by compute and upload time: who took part, data share, "
             "rank)." if views else "."), ""]
    return "\n".join(out)
