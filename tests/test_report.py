"""Report numbers from synthetic run folders equal hand-computed ones; plots; bad input; real compare."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedlora import report as rp
from fedlora.cli import app
from fedlora.config import InputError, RunConfig, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
A, B = "ARC-Easy", "social_i_qa"
runner = CliRunner()


def row(r, t, up=0, down=0, ev=None, mean=None):
    out = {"round": r, "sim_time_s": float(t), "round_time_s": 0.0, "participants": [], "upload_bytes": up,
           "download_bytes": down, "train_loss": None, "rejected": []}
    if ev is not None:
        out["eval"] = ev
        out["eval_mean"] = mean if mean is not None else sum(ev.values()) / len(ev)
    return out


def write_run(path: Path, rows, *, method="manual", seed=0, target=None, final=None, stop="max_rounds",
              finished=True, **cfg_changes):
    cfg = RunConfig(method=method, seed=seed)
    cfg.train.target_accuracy = target
    for k, v in cfg_changes.items():
        setattr(cfg.train, k, v)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(dump_config(cfg))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        final = final or rows[-1].get("eval") or {A: 0.5, B: 0.5}
        result = {"method": method, "seed": seed, "stop_reason": stop, "rounds": rows[-1]["round"],
                  "sim_time_s": rows[-1]["sim_time_s"], "upload_bytes": sum(r["upload_bytes"] for r in rows),
                  "download_bytes": sum(r["download_bytes"] for r in rows), "final_eval": final,
                  "final_eval_mean": sum(final.values()) / len(final), "time_to_target_s": None}
        (path / "result.json").write_text(json.dumps(result))
    return path


# Evaluated at rounds 0, 2, 4, 5; rounds 1 and 3 have no eval.
ROWS = [row(0, 0, ev={A: 0.25, B: 0.25}, mean=0.25),
        row(1, 10, 100, 50),
        row(2, 25, 100, 50, ev={A: 0.5, B: 0.7}, mean=0.6),
        row(3, 40, 120, 50),
        row(4, 55, 120, 50, ev={A: 0.65, B: 0.55}, mean=0.6),
        row(5, 70, 80, 50, ev={A: 0.8, B: 0.6}, mean=0.7)]


def test_time_to_target_first_evaluation_at_or_above():
    assert rp.time_to_target(ROWS, 0.6) == 25.0  # eval_mean 0.6 at round 2
    assert rp.time_to_target(ROWS, 0.6, A) == 55.0
    assert rp.time_to_target(ROWS, 0.6, B) == 25.0
    assert rp.time_to_target(ROWS, 0.61) == 70.0
    assert rp.time_to_target(ROWS, 0.75) is None  # not reached
    assert rp.time_to_target(ROWS, 0.2) == 0.0  # before training counts
    assert rp.time_to_target(ROWS, {A: 0.6, B: 0.6}) == 70.0  # all at once: round 4 fails on B
    assert rp.time_to_target(ROWS, {A: 0.6}) == 55.0
    assert rp.time_to_target(ROWS, None) is None


def test_rounds_to_target_split_the_clock_into_rounds_and_round_length(tmp_path):
    """By hand: seed 0 reaches eval_mean 0.6 at round 2 (25 s, 12.5 s a round) with 3 then 1
    participants (2.0 a round); seed 1's rows reach it only at round 5 (70 s, 14 s a round,
    participants 2, 2, 2, 2, 2); a third run never reaches it and is left out of the means."""
    def rows_with(participants):
        return [dict(r, participants=list(range(n))) for r, n in zip(ROWS, participants)]
    write_run(tmp_path / "m" / "seed0", rows_with([0, 3, 1, 5, 5, 5]), seed=0)
    late = rows_with([0, 2, 2, 2, 2, 2])
    for r in late[1:5]:
        r.pop("eval", None), r.pop("eval_mean", None)
    write_run(tmp_path / "m" / "seed1", late, seed=1)
    write_run(tmp_path / "m" / "seed2", [dict(r, eval_mean=0.3) if "eval_mean" in r else r for r in ROWS], seed=2)
    runs = [rp.load_run(p) for p in rp.find_runs([tmp_path])]
    summary = rp.summarize(runs, target={"mean": 0.6}, relative_to=tmp_path)
    d = summary["methods"]["manual"]["rounds_to_target"]["mean"]
    assert d["rounds"]["n"] == 2 and d["rounds"]["mean"] == pytest.approx(3.5)
    assert d["round_s"]["mean"] == pytest.approx((12.5 + 14.0) / 2)
    assert d["participants"]["mean"] == pytest.approx((2.0 + 2.0) / 2)
    assert {r["seed"]: r["rounds_to_target"]["mean"] for r in summary["runs"]} == {0: 2, 1: 5, 2: None}
    md = rp.render_markdown(summary)
    assert "## Rounds and round length to the target (mean)" in md
    assert "| manual | 3.5 ± 2.1 (2/3) | 13.2 ± 1.1 | 2.0 ± 0.0 |" in md
    # per seed: 25 s, 70 s, not reached; seeds 0 and 1 are each their seed's first (one method)
    assert "| manual | **25** | **70** | — |" in md


def test_per_seed_table_bolds_each_seeds_first_and_brackets_all_tasks(tmp_path):
    """ROWS by hand: mean 0.6 at 25 s, A and B both >= 0.6 at 70 s; the same rows 10 s later
    for the other method (delayed), which is never first."""
    late = [dict(r, sim_time_s=r["sim_time_s"] + 10.0 * (r["round"] > 0)) for r in ROWS]
    for seed in (0, 1):
        write_run(tmp_path / "fast" / f"seed{seed}", ROWS, method="manual", seed=seed)
        write_run(tmp_path / "slow" / f"seed{seed}", late, method="fslora", seed=seed)
    runs = [rp.load_run(p) for p in rp.find_runs([tmp_path])]
    md = rp.render_markdown(rp.summarize(runs, target={A: 0.6, B: 0.6, "mean": 0.6}))
    assert "## Per seed (mean)" in md and "| method | seed 0 | seed 1 |" in md
    assert "| manual | **25** (70) | **25** (70) |" in md
    assert "| fslora | 35 (80) | 35 (80) |" in md


def test_run_summary_float_target_from_config(tmp_path):
    write_run(tmp_path / "one", ROWS, target=0.6)
    s = rp.summarize([rp.load_run(tmp_path / "one")])
    assert s["target"] == 0.6 and s["target_keys"] == [A, B, "mean"] and s["primary_target"] == "mean"
    m = s["methods"]["manual"]
    assert m["n"] == 1 and m["finished"] == 1
    assert {k: v["mean"] for k, v in m["time_to_target_s"].items()} == {A: 55.0, B: 25.0, "mean": 25.0}
    assert m["time_to_target_s"]["mean"]["std"] == 0.0
    assert m["upload_to_target_bytes"]["mean"]["mean"] == 200  # rounds 1 + 2
    assert m["upload_to_target_bytes"][A]["mean"] == 440
    assert m["upload_bytes"]["mean"] == 520 and m["download_bytes"]["mean"] == 250
    assert m["rounds"]["mean"] == 5
    assert math.isclose(m["final_eval_mean"]["mean"], 0.7)
    assert m["final_eval"][A]["mean"] == 0.8
    assert m["speedup"]["mean"] is None  # nobody to compare with


def test_override_targets_and_per_task_dict(tmp_path):
    write_run(tmp_path / "r", ROWS, target={A: 0.6, B: 0.6})
    run = rp.load_run(tmp_path / "r")
    s = rp.summarize([run])  # dict from config.yaml: each task and all at once
    assert s["target_keys"] == [A, B, "all"] and s["primary_target"] == "all"
    t = s["methods"]["manual"]["time_to_target_s"]
    assert (t[A]["mean"], t[B]["mean"], t["all"]["mean"]) == (55.0, 25.0, 70.0)
    s = rp.summarize([run], target=rp.parse_target("ARC-Easy=0.8,social_i_qa=0.7"))
    t = s["methods"]["manual"]["time_to_target_s"]
    assert (t[A]["mean"], t[B]["mean"], t["all"]["mean"]) == (70.0, 25.0, None)
    assert t["all"]["reached"] == 0 and t["all"]["of"] == 1
    s = rp.summarize([run], target=0.65)
    t = s["methods"]["manual"]["time_to_target_s"]
    assert (t[A]["mean"], t[B]["mean"], t["mean"]["mean"]) == (55.0, 25.0, 70.0)
    assert rp.parse_target("0.6") == 0.6
    assert rp.parse_target(" openbookqa=0.6 ") == {"openbookqa": 0.6}
    for bad in ("abc", "1.5", "0", "A=", "A=x", "A=0.5,,B=0.4", "A=2"):
        with pytest.raises(InputError):
            rp.parse_target(bad)
    with pytest.raises(InputError, match="openbookqa"):
        rp.summarize([run], target={"openbookqa": 0.6})


def seed_rows(seed, t_reach, final_mean):
    """Evaluations at rounds 0, 2, 4; reaches mean 0.6 at round 2 when t_reach is given."""
    up = 1000 * (seed + 1)
    second = 0.6 if t_reach is not None else 0.4
    return [row(0, 0, ev={A: 0.3, B: 0.3}),
            row(1, 5, up, 10),
            row(2, t_reach or 50, up, 10, ev={A: second, B: second}),
            row(3, 90, up, 10),
            row(4, 100, up, 10, ev={A: final_mean, B: final_mean})]


def make_three_methods(root: Path):
    # a: 3 seeds, all reach 0.6 (at 30, 40, 60 s); b: 2 of 3 reach (20, 50); c: 1 seed, 65 s.
    for seed, t, fin in ((0, 30, 0.6), (1, 40, 0.7), (2, 60, 0.8)):
        write_run(root / "a" / f"seed{seed}", seed_rows(seed, t, fin), method="a", seed=seed, target=0.6,
                  final={A: fin, B: fin})
    for seed, t in ((0, 20), (1, None), (2, 50)):
        write_run(root / "b" / f"seed{seed}", seed_rows(seed, t, 0.55), method="b", seed=seed, target=0.6,
                  final={A: 0.5, B: 0.6})
    write_run(root / "c", seed_rows(0, 65, 0.62), method="c", seed=0, target=0.6, final={A: 0.6, B: 0.64})


def test_mean_std_over_seeds_and_speedup(tmp_path):
    make_three_methods(tmp_path)
    runs = [rp.load_run(p) for p in rp.find_runs([tmp_path])]
    assert len(runs) == 7
    s = rp.summarize(runs)
    a, b, c = (s["methods"][k] for k in "abc")
    ta = a["time_to_target_s"]["mean"]
    mean_a = (30 + 40 + 60) / 3
    std_a = math.sqrt(((30 - mean_a) ** 2 + (40 - mean_a) ** 2 + (60 - mean_a) ** 2) / 2)
    assert ta["n"] == 3 and ta["reached"] == 3 and ta["of"] == 3
    assert math.isclose(ta["mean"], mean_a) and math.isclose(ta["std"], std_a)
    assert (ta["min"], ta["max"]) == (30.0, 60.0)
    tb = b["time_to_target_s"]["mean"]
    assert tb["reached"] == 2 and tb["of"] == 3 and tb["values"] == [20.0, None, 50.0]
    assert math.isclose(tb["mean"], 35.0) and math.isclose(tb["std"], math.sqrt(2 * 15 ** 2))
    # final accuracy over seeds: 0.6, 0.7, 0.8
    assert math.isclose(a["final_eval_mean"]["mean"], 0.7) and math.isclose(a["final_eval_mean"]["std"], 0.1)
    assert math.isclose(b["final_eval"][B]["mean"], 0.6) and b["final_eval"][B]["std"] == 0.0
    # bytes: 4 rounds x 1000 (seed + 1) -> 4000, 8000, 12000
    assert a["upload_bytes"]["mean"] == 8000 and math.isclose(a["upload_bytes"]["std"], 4000)
    assert a["download_bytes"]["mean"] == 40 and a["rounds"]["mean"] == 4
    assert a["seeds"] == [0, 1, 2] and a["stop_reasons"] == {"max_rounds": 3}
    # speedup: only groups whose every run reached count; a vs c and c vs a
    assert a["speedup"]["mean"] == {"value": pytest.approx(65 / mean_a), "vs": "c"}
    assert c["speedup"]["mean"] == {"value": pytest.approx(mean_a / 65), "vs": "a"}
    assert b["speedup"]["mean"] is None
    s = rp.summarize(runs, baseline="c")
    assert s["methods"]["a"]["speedup"]["mean"]["value"] == pytest.approx(65 / mean_a)
    assert s["methods"]["c"]["speedup"]["mean"] == {"value": 1.0, "vs": "c"}
    md = rp.render_markdown(s)
    assert "| b | 3 | 35.0 ± 21.2 (2/3) |" in md
    assert f"| a | 3 | {mean_a:.1f} ± {std_a:.1f} |" in md
    assert "1.50× vs c" in md


def test_report_writes_files_and_plots(tmp_path):
    make_three_methods(tmp_path / "cmp")
    write_run(tmp_path / "cmp" / "d", seed_rows(0, None, 0.5), method="d", target=0.6, finished=False)
    result = runner.invoke(app, ["report", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "| method |" in result.stdout and "not reached" in result.stdout
    assert "| d | 1 (1 unfinished) |" in result.stdout
    for name in ("summary.json", "summary.md", *rp.PLOTS):
        f = tmp_path / "cmp" / name
        assert f.exists() and f.stat().st_size > 0, name
    for name in rp.PLOTS:
        data = (tmp_path / "cmp" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert set(summary["methods"]) == {"a", "b", "c", "d"}
    assert summary["methods"]["d"]["finished"] == 0 and summary["methods"]["d"]["final_eval_mean"]["n"] == 0
    assert "a/seed0" in summary["methods"]["a"]["runs"][0]
    # several paths, --out elsewhere, --target override
    other = tmp_path / "elsewhere"
    result = runner.invoke(app, ["report", str(tmp_path / "cmp" / "a"), str(tmp_path / "cmp" / "c"),
                                 "--out", str(other), "--target", "0.3"])
    assert result.exit_code == 0, result.output
    summary = json.loads((other / "summary.json").read_text())
    assert summary["target"] == 0.3 and set(summary["methods"]) == {"a", "c"}
    assert summary["methods"]["a"]["time_to_target_s"]["mean"]["mean"] == 0.0
    assert (other / "accuracy_vs_time.png").stat().st_size > 0


def test_clients_view_per_client_q_rank_and_participation(tmp_path):
    """q and rank averaged over rounds with the plan in force each round, the share of rounds
    taken part in, the upload alone on the band: hand-computed; the planned method's table
    is the one in summary.md; clients.png is written."""
    clients = [{"id": 0, "data_share": 0.75, "compute_time_s": 2.0, "upload_bits": 800.0, "bits_per_s_per_hz": 2.0},
               {"id": 1, "data_share": 0.25, "compute_time_s": 8.0, "upload_bits": 800.0, "bits_per_s_per_hz": 0.5}]
    rows = [row(0, 0, ev={A: 0.2, B: 0.2}), row(1, 10), row(2, 20), row(3, 30), row(4, 40, ev={A: 0.4, B: 0.4})]
    for r, who in zip(rows[1:], ([0, 1], [0], [0], [1])):
        r["participants"] = who
    rows[1]["plan"] = {"participation_prob": [1.0, 0.5], "ranks": [8, 4]}
    rows[3]["plan"] = {"participation_prob": [0.8, 0.1], "ranks": [8, 2]}  # in force in rounds 3 and 4
    final = {"participation_prob": [0.8, 0.1], "ranks": [8, 2], "bandwidth_hz": 100.0}
    for name, plan_rows in (("planned", rows), ("fixed", [{k: v for k, v in r.items() if k != "plan"} for r in rows])):
        folder = write_run(tmp_path / "cmp" / name, plan_rows, method=name, target=0.3)
        (folder / "clients.json").write_text(json.dumps(clients))
        (folder / "plan.json").write_text(json.dumps(final if name == "planned" else
                                                     {"participation_prob": [0.5, 0.5], "ranks": [4, 4],
                                                      "bandwidth_hz": 100.0}))
    summary = rp.report([tmp_path / "cmp"])
    planned = {r["id"]: r for r in summary["clients"]["planned"]["rows"]}
    assert planned[0]["participation_prob"] == pytest.approx((1.0 + 1.0 + 0.8 + 0.8) / 4)
    assert planned[1]["participation_prob"] == pytest.approx((0.5 + 0.5 + 0.1 + 0.1) / 4)
    assert planned[1]["rank"] == pytest.approx(3.0) and planned[0]["rank"] == 8.0
    assert planned[0]["participation_rate"] == 0.75 and planned[1]["participation_rate"] == 0.5
    assert planned[0]["upload_alone_s"] == pytest.approx(800 / (2.0 * 100)) and planned[1]["upload_alone_s"] == 16.0
    fixed = {r["id"]: r for r in summary["clients"]["fixed"]["rows"]}
    assert fixed[1]["participation_prob"] == 0.5 and fixed[1]["rank"] == 4.0  # plan.json throughout
    md = (tmp_path / "cmp" / "summary.md").read_text()
    assert "## Clients of planned (seed 0)" in md and "| 1 | 0.250 | 8.0 | 16.0 | 0.30 | 0.50 | 3.0 |" in md
    assert (tmp_path / "cmp" / "clients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "cmp" / "fixed" / "clients.json").write_text("[{")  # damaged: named, not skipped
    with pytest.raises(InputError, match=r"fixed/clients.json: not valid JSON"):
        rp.report([tmp_path / "cmp"])


def test_same_method_two_configs_gets_two_groups(tmp_path):
    write_run(tmp_path / "x", ROWS, lr=0.01)
    write_run(tmp_path / "y", ROWS, lr=0.02)
    runs = [rp.load_run(p) for p in rp.find_runs([tmp_path])]
    assert set(rp.summarize(runs)["methods"]) == {"manual@x", "manual@y"}


def _set_planner(path: Path, constants: dict | None, pilot: bool):
    cfg = load_config(path / "config.yaml")
    cfg.planner.constants = {**constants, "source": "pilots" if pilot else "given"}
    (path / "config.yaml").write_text(dump_config(cfg))


def test_times_count_planning_before_the_run_and_the_training_clock_apart(tmp_path):
    """A run whose constants cost 100 s of pilots: its time to target is 100 s + its clock
    (what a user waits for), the training-only time is its clock; the speedup uses the first."""
    write_run(tmp_path / "plain" / "seed0", ROWS, method="manual", seed=0)
    planned = write_run(tmp_path / "planned" / "seed0", ROWS, method="proposed", seed=0)
    cfg = load_config(planned / "config.yaml")
    cfg.planner.constants = {"alpha": 1.0, "beta": 1.0, "gamma": 0.1, "delta": 1.0, "planning_time_s": 100.0,
                             "source": "pilots"}
    (planned / "config.yaml").write_text(dump_config(cfg))
    runs = [rp.load_run(p) for p in rp.find_runs([tmp_path])]
    summary = rp.summarize(runs, target=0.6, focus="manual")
    reach = rp.time_to_target(ROWS, 0.6)
    m = summary["methods"]
    assert m["manual"]["time_to_target_s"]["mean"]["mean"] == pytest.approx(reach)
    assert m["proposed"]["time_to_target_s"]["mean"]["mean"] == pytest.approx(100.0 + reach)
    assert m["proposed"]["training_time_to_target_s"]["mean"]["mean"] == pytest.approx(reach)
    assert m["proposed"]["planning_time_s"]["mean"] == pytest.approx(100.0)
    assert summary["focus"]["speedup_over"]["proposed"]["mean"]["value"] == pytest.approx((100.0 + reach) / reach)
    md = rp.render_markdown(summary)
    assert "planning (s)" in md and "run's own clock" in md


def test_pilot_estimated_constants_do_not_split_seeds_but_hand_set_ones_do(tmp_path):
    c0 = {"alpha": 20.0, "beta": 1.0, "gamma": 0.6, "delta": 6.0}
    c1 = {"alpha": 18.0, "beta": 1.0, "gamma": 1.1, "delta": 1e-6}
    for pilot in (True, False):
        root = tmp_path / str(pilot)
        for seed, c in ((0, c0), (1, c1)):
            _set_planner(write_run(root / "proposed" / f"seed{seed}", ROWS, method="proposed", seed=seed), c, pilot)
        groups = rp.group_runs([rp.load_run(p) for p in rp.find_runs([root])])
        if pilot:  # the study's case: each seed's constants come from its own pilots -> one method, 2 seeds
            assert list(groups) == ["proposed"] and len(groups["proposed"]) == 2
        else:  # constants set by hand differ: two configurations of the method
            assert len(groups) == 2 and all(len(g) == 1 for g in groups.values())


def test_matched_expected_participants_do_not_split_a_study_entry_but_entries_stay_apart(tmp_path):
    """A study sets a matched baseline's expected participants from the matched run of each
    seed: seeds 0 and 1 of one entry are one method; two entries stay two groups."""
    for entry, values in (("sample_uniform", (40.0, 44.8)), ("sample_uniform_small", (5.0, 5.0))):
        for seed, e in enumerate(values):
            path = write_run(tmp_path / entry / f"seed{seed}", ROWS, method="sample_uniform", seed=seed)
            cfg = load_config(path / "config.yaml")
            cfg.sampling.expected_participants = e
            (path / "config.yaml").write_text(dump_config(cfg))
    groups = rp.group_runs([rp.load_run(p) for p in rp.find_runs([tmp_path])])
    assert sorted(groups) == ["sample_uniform@sample_uniform", "sample_uniform@sample_uniform_small"]
    assert all(len(g) == 2 for g in groups.values())


def test_per_task_target_with_a_mean_entry_times_the_mean_apart_from_all(tmp_path):
    write_run(tmp_path / "m", ROWS)
    summary = rp.summarize([rp.load_run(tmp_path / "m")], target={A: 0.6, B: 0.6, "mean": 0.6})
    assert summary["target_keys"] == [A, B, rp.ALL, rp.MEAN] and summary["primary_target"] == rp.ALL
    ttt = summary["runs"][0]["time_to_target_s"]
    # by hand from ROWS: A >= 0.6 first at round 4 (55 s), B at round 2 (25 s), both at once
    # only at round 5 (70 s; 'mean' is not a task of 'all'), eval_mean >= 0.6 at round 2 (25 s)
    assert ttt == {A: 55.0, B: 25.0, rp.ALL: 70.0, rp.MEAN: 25.0}
    assert "mean over tasks ≥ 0.6" in rp.render_markdown(summary)
    assert rp.parse_target("ARC-Easy=0.5,mean=0.4") == {"ARC-Easy": 0.5, "mean": 0.4}


def test_step_band():
    grid, mean, lo, hi = rp.step_band([([0, 10, 20], [0.0, 0.5, 0.7]), ([0, 15], [0.1, 0.6])])
    np.testing.assert_allclose(grid, [0, 10, 15, 20])
    np.testing.assert_allclose(mean, [0.05, 0.3, 0.55, 0.65])
    np.testing.assert_allclose(lo, [0.0, 0.1, 0.5, 0.6])
    np.testing.assert_allclose(hi, [0.1, 0.5, 0.6, 0.7])


def test_different_config_targets_need_override(tmp_path):
    write_run(tmp_path / "p", ROWS, target=0.6, method="a")
    write_run(tmp_path / "q", ROWS, target=0.7, method="b")
    write_run(tmp_path / "n", ROWS, target=None, method="c")
    runs = [rp.load_run(p) for p in rp.find_runs([tmp_path])]
    with pytest.raises(InputError, match="--target"):
        rp.summarize(runs)
    assert rp.summarize(runs, target=0.65)["target"] == 0.65
    no_target = [r for r in runs if r.method == "c"]
    assert rp.summarize(no_target)["target"] is None  # no target: no time-to-target columns
    md = rp.render_markdown(rp.summarize(no_target))
    assert "No target accuracy" in md and "time to" not in md


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_input_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(runner.invoke(app, ["report", str(tmp_path / "empty")]), "no run folders")
    one_line_error(runner.invoke(app, ["report", str(tmp_path / "missing")]), "not found")
    bad = write_run(tmp_path / "bad", ROWS)
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    lines[2] = '{"round": 2, "sim_time_s": 25.0, '  # truncated line 3
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    one_line_error(runner.invoke(app, ["report", str(bad)]), "metrics.jsonl", "line 3")
    lines[2] = '{"sim_time_s": 25.0}'
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    one_line_error(runner.invoke(app, ["report", str(bad)]), "line 3", "round")
    good = write_run(tmp_path / "good", ROWS)
    one_line_error(runner.invoke(app, ["report", str(good), "--target", "1.5"]), "--target")
    one_line_error(runner.invoke(app, ["report", str(good), "--target", "nope=0.5"]), "nope")
    one_line_error(runner.invoke(app, ["report", str(good), "--baseline", "zzz"]), "zzz", "manual")
    one_line_error(runner.invoke(app, ["report", str(good), "--at", "60,x"]), "--at", "60,x")
    one_line_error(runner.invoke(app, ["report", str(good), "--at", "-5"]), "positive seconds")
    (good / "result.json").write_text("{not json")
    one_line_error(runner.invoke(app, ["report", str(good)]), "result.json")
    # compare: unknown method, bad seeds -> exit 2, nothing written
    out = tmp_path / "cmp"
    one_line_error(runner.invoke(app, ["compare", str(SMOKE), "-o", str(out), "--methods", "manual,nosuch"]),
                   "nosuch", "manual")
    one_line_error(runner.invoke(app, ["compare", str(SMOKE), "-o", str(out), "--seeds", "0,x"]), "--seeds")
    one_line_error(runner.invoke(app, ["compare", str(SMOKE), "-o", str(out), "--baseline", "nosuch"]), "nosuch")
    one_line_error(runner.invoke(app, ["compare", str(SMOKE), "-o", str(out), "--target", "2"]), "--target")
    assert not out.exists()


def test_compare_two_methods_then_skip(tmp_path):
    from fedlora.compare import compare
    from fedlora.methods import METHODS

    preferred = ["sample_uniform", "sample_fixed", "sample_full", "rank_full", "fslora", "hetlora", "flexlora",
                 "flora", "soft"]
    others = [m for m in preferred if m in METHODS] + sorted(m for m in METHODS if m not in preferred + ["manual"])
    overrides = ["train.rounds=2", "train.local_steps=1", "train.batch_size=2", "eval.every=2",
                 "eval.max_examples=8", "eval.final_max_examples=8", "data.max_train_per_task=60"]
    cfg = load_config(SMOKE, overrides)
    out = tmp_path / "cmp"
    if others:
        methods, seeds = ["manual", others[0]], None
        folders = [out / "manual", out / others[0]]
        args = ["--methods", ",".join(methods)]
    else:
        methods, seeds = ["manual"], [0, 1]
        folders = [out / "manual" / "seed0", out / "manual" / "seed1"]
        args = ["--methods", "manual", "--seeds", "0,1"]
    lines = []
    paths = compare(cfg, out, methods, seeds, progress=False, log=lines.append)
    assert paths == folders
    assert sum("running" in ln for ln in lines) == 2, lines
    mtimes = {}
    for f in folders:
        res = json.loads((f / "result.json").read_text())
        assert res["rounds"] == 2 and res["method"] == f.relative_to(out).parts[0]
        mtimes[f] = (f / "result.json").stat().st_mtime_ns
    if seeds is None:  # same clients for every method: identical client profiles and data split
        assert (folders[0] / "clients.json").read_text() == (folders[1] / "clients.json").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"][methods[0]]["n"] == (2 if seeds else 1)
    assert (out / "accuracy_vs_time.png").stat().st_size > 0 and (out / "clients.png").stat().st_size > 0
    # `tensorboard --logdir OUT` sees every method: each run folder's events hold its accuracy
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(out))
    mux.Reload()
    assert {str(Path(f.relative_to(out)) / "tensorboard") for f in folders} <= set(mux.Runs())
    for f in folders:
        evals = [json.loads(ln)["eval_mean"] for ln in (f / "metrics.jsonl").read_text().splitlines()
                 if "eval_mean" in json.loads(ln)]
        got = [e.value for e in mux.Scalars(str(Path(f.relative_to(out)) / "tensorboard"), "accuracy/mean")]
        assert got == pytest.approx(evals)

    result = runner.invoke(app, ["compare", str(SMOKE), "-o", str(out), *args, *overrides])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("skipped") == 2, result.stderr
    assert "| method |" in result.stdout
    for f in folders:
        assert (f / "result.json").stat().st_mtime_ns == mtimes[f]  # not rerun
    # a changed config does not silently reuse the finished runs
    result = runner.invoke(app, ["compare", str(SMOKE), "-o", str(out), *args, *overrides, "train.lr=0.5"])
    one_line_error(result, "config.yaml", "train.lr")


def test_compare_over_seeds_pairs_the_first_method_with_each_other(tmp_path):
    out = tmp_path / "cmp"
    overrides = ["train.rounds=1", "train.local_steps=1", "train.batch_size=2", "eval.every=1",
                 "eval.max_examples=4", "eval.final_max_examples=4", "data.max_train_per_task=40"]
    result = runner.invoke(app, ["compare", str(SMOKE), "-o", str(out), "--methods", "manual,fslora",
                                 "--seeds", "0,1", "--target", "mean=0.99", "--quiet", *overrides])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["focus"]["method"] == "manual" and set(summary["focus"]["speedup_over"]) == {"fslora"}
    cell = summary["focus"]["speedup_over"]["fslora"]["mean"]
    assert cell["focus_missed"] and cell["test"] is None  # 0.99 is out of reach: no claim, no test
    md = (out / "summary.md").read_text()
    assert "## Speedup of manual over each method" in md and "Paired over seeds" in md
    # one seed: no pairing
    rp.report([out / "manual" / "seed0", out / "fslora" / "seed0"], out=tmp_path / "one", target=0.99)
    assert "focus" not in json.loads((tmp_path / "one" / "summary.json").read_text())


def test_compare_plans_skip_resume_restart(tmp_path):
    from fedlora.compare import parse_names, parse_seeds, plan_jobs

    cfg = RunConfig()
    out = tmp_path / "cmp"
    done = out / "manual" / "seed0"
    done.mkdir(parents=True)
    c0 = cfg.model_copy(deep=True)
    (done / "config.yaml").write_text(dump_config(c0))
    (done / "result.json").write_text("{}")
    stopped = out / "manual" / "seed1"
    (stopped / "checkpoint").mkdir(parents=True)
    (stopped / "checkpoint" / "progress.json").write_text("{}")
    c1 = cfg.model_copy(deep=True)
    c1.seed = 1
    (stopped / "config.yaml").write_text(dump_config(c1))
    early = out / "manual" / "seed2"
    early.mkdir()
    (early / "config.yaml").write_text("partial")
    jobs = plan_jobs(cfg, out, ["manual"], [0, 1, 2, 3])
    assert [j.state for j in jobs] == ["finished", "resume", "restart", "new"]
    assert [j.cfg.seed for j in jobs] == [0, 1, 2, 3] and all(j.cfg.method == "manual" for j in jobs)
    (early / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a run folder"):
        plan_jobs(cfg, out, ["manual"], [2])
    assert parse_seeds("0, 1,1") == [0, 1] and parse_names("all") is None and parse_names("a, b") == ["a", "b"]


def test_speedups_over_focus_paired_by_seed(tmp_path):
    # target A >= 0.6 only. focus "proposed": 20 s (seed 0), 40 s (seed 1).
    def curve(t_hit, end):  # reaches 0.6 on A at t_hit (None: never), runs until `end`
        rows = [row(0, 0, ev={A: 0.3}), row(1, end if t_hit is None else t_hit, ev={A: 0.3 if t_hit is None else 0.7})]
        return rows if t_hit is None or t_hit == end else rows + [row(2, end, ev={A: 0.7})]

    tgt = {A: 0.6}
    runs = {("proposed", 0): curve(20, 50), ("proposed", 1): curve(40, 60),
            ("fslora", 0): curve(60, 60), ("fslora", 1): curve(100, 100),
            ("hetlora", 0): curve(30, 30), ("hetlora", 1): curve(None, 90),  # seed 1 never: >= 90 s
            ("flora", 0): curve(10, 10), ("flora", 1): curve(30, 30)}
    for (m, sd), rows in runs.items():
        write_run(tmp_path / m / f"seed{sd}", rows, method=m, seed=sd, target=tgt)
    s = rp.summarize([rp.load_run(p) for p in rp.find_runs([tmp_path])], focus="proposed")
    sp = s["focus"]["speedup_over"]
    assert sp["fslora"][A]["value"] == pytest.approx((60 + 100) / 2 / ((20 + 40) / 2))
    assert {k: v["ratio"] for k, v in sp["fslora"][A]["per_seed"].items()} == pytest.approx({0: 3.0, 1: 2.5})
    assert not sp["fslora"][A]["at_least"]
    assert sp["hetlora"][A]["value"] == pytest.approx((30 + 90) / 60) and sp["hetlora"][A]["at_least"]
    assert sp["hetlora"][A]["per_seed"][1] == {"ratio": pytest.approx(90 / 40), "at_least": True}
    assert sp["flora"][A]["value"] == pytest.approx(40 / 60)  # slower than flora: speedup < 1
    # the paired test over the two seeds: fslora 3.0 and 2.5 (both faster: sign p = 2 * 0.5^2);
    # geometric mean sqrt(7.5); t on logs with 1 degree of freedom, by hand
    t = sp["fslora"][A]["test"]
    assert (t["seeds"], t["bounds"], t["faster"], t["slower"]) == (2, 0, 2, 0)
    assert t["sign_p"] == pytest.approx(0.5) and t["geometric_mean"] == pytest.approx(math.sqrt(7.5))
    logs = [math.log(3.0), math.log(2.5)]
    mean, se = sum(logs) / 2, abs(logs[0] - logs[1]) / 2  # sd / sqrt(2) with sd = |diff| / sqrt(2)
    t_stat, t975_df1 = mean / se, 12.706204736174705  # Student t, 1 df: 2 * atan(t) / pi two-sided
    assert t["t_p"] == pytest.approx(1 - 2 * math.atan(t_stat) / math.pi)
    assert t["interval"] == pytest.approx([math.exp(mean - t975_df1 * se), math.exp(mean + t975_df1 * se)])
    # hetlora: seed 0 faster (30 / 20), seed 1 a lower bound above 1 (90 / 40: direction known)
    h = sp["hetlora"][A]["test"]
    assert (h["bounds"], h["faster"], h["slower"]) == (1, 2, 0)
    f = sp["flora"][A]["test"]  # 10 / 20 and 30 / 40: slower in both
    assert (f["faster"], f["slower"], f["sign_p"]) == (0, 2, pytest.approx(0.5))
    md = rp.render_markdown(s)
    assert "## Speedup of proposed over each method" in md
    assert "| fslora | 2.67× [2.50–3.00] |" in md and "| hetlora | >2.00× [1.50–2.25] |" in md
    assert f"| fslora | {A} | 2 | 2 / 0 | 0.500 | {math.sqrt(7.5):.2f}× [" in md
    assert f"| hetlora | {A} | 2 (1 bounds) | 2 / 0 |" in md
    # a lower bound at or below 1 says nothing about the direction; one seed: no t
    u = rp.paired_test([0.8, 2.0, 0.5], [True, False, False])
    assert (u["faster"], u["slower"], u["bounds"]) == (1, 1, 1) and u["sign_p"] == pytest.approx(1.0)
    assert rp.paired_test([2.0])["t_p"] is None and rp.paired_test([2.0])["sign_p"] == pytest.approx(1.0)
    # focus missing a seed: no claim
    write_run(tmp_path / "proposed" / "seed2", curve(None, 80), method="proposed", seed=2, target=tgt)
    write_run(tmp_path / "fslora" / "seed2", curve(50, 50), method="fslora", seed=2, target=tgt)
    s = rp.summarize([rp.load_run(p) for p in rp.find_runs([tmp_path])], focus="proposed")
    assert s["focus"]["speedup_over"]["fslora"][A]["value"] is None
    assert s["focus"]["speedup_over"]["fslora"][A]["focus_missed"]
    with pytest.raises(InputError, match="focus method 'nope'"):
        rp.summarize([rp.load_run(p) for p in rp.find_runs([tmp_path])], focus="nope")


def test_accuracy_at_fixed_times_by_hand_and_paired_by_seed(tmp_path):
    """ROWS' mean accuracy: 0.25 at 0 s, 0.6 at 25 s and 55 s, 0.7 at 70 s."""
    run = rp.load_run(write_run(tmp_path / "a" / "seed0", ROWS, method="manual", seed=0))
    got = rp.runs.accuracy_at(run, [0.0, 10.0, 25.0, 40.0, 62.5, 70.0, 500.0])
    assert got == pytest.approx([0.25, 0.25 + 0.35 * 10 / 25, 0.6, 0.6, 0.65, 0.7, 0.7])  # held: finished
    unfinished = rp.load_run(write_run(tmp_path / "u" / "seed0", ROWS, method="manual", seed=0, finished=False))
    assert rp.runs.accuracy_at(unfinished, [70.0, 70.5]) == [pytest.approx(0.7), None]
    # 100 s of pilots before round 1: the initial accuracy until then, the curve shifted after
    piloted = write_run(tmp_path / "p" / "seed0", ROWS, method="proposed", seed=0)
    _set_planner(piloted, {"alpha": 1.0, "beta": 1.0, "gamma": 0.1, "delta": 1.0, "planning_time_s": 100.0}, True)
    assert rp.runs.accuracy_at(rp.load_run(piloted), [50.0, 100.0, 110.0, 125.0]) == pytest.approx(
        [0.25, 0.25, 0.25 + 0.35 * 10 / 25, 0.6])
    no_initial = rp.load_run(write_run(tmp_path / "n" / "seed0", ROWS[1:], method="manual", seed=0))
    assert rp.runs.accuracy_at(no_initial, [10.0, 25.0]) == [None, pytest.approx(0.6)]
    # paired by seed: focus "proposed" vs "fslora", constant accuracies per run
    def flat(acc):
        return [row(0, 0, ev={A: acc}), row(1, 100, ev={A: acc})]
    accs = {("proposed", 0): 0.5, ("proposed", 1): 0.6, ("proposed", 2): 0.55,
            ("fslora", 0): 0.45, ("fslora", 1): 0.58, ("fslora", 2): 0.56}
    for (m, sd), acc in accs.items():
        write_run(tmp_path / "pair" / m / f"seed{sd}", flat(acc), method=m, seed=sd)
    s = rp.summarize([rp.load_run(p) for p in rp.find_runs([tmp_path / "pair"])], focus="proposed", at_s=[50.0])
    assert s["methods"]["proposed"]["accuracy_at_s"]["50"]["mean"] == pytest.approx(0.55)
    cell = s["focus"]["accuracy_over"]["fslora"]["50"]
    d = np.array([0.05, 0.02, -0.01])
    assert cell["per_seed"] == pytest.approx({0: 0.05, 1: 0.02, 2: -0.01})
    assert (cell["ahead"], cell["behind"], cell["sign_p"]) == (2, 1, pytest.approx(1.0))
    se = d.std(ddof=1) / math.sqrt(3)
    t975_df2 = 4.302652729911275  # Student t, 2 df: two-sided p = 1 - t / sqrt(2 + t^2)
    assert cell["mean"] == pytest.approx(d.mean())
    assert cell["t_p"] == pytest.approx(1 - (d.mean() / se) / math.sqrt(2 + (d.mean() / se) ** 2))
    assert cell["interval"] == pytest.approx([d.mean() - t975_df2 * se, d.mean() + t975_df2 * se])
    md = rp.render_markdown(s)
    assert "## Mean accuracy at fixed times" in md and "| proposed | 0.550 ± 0.050 |" in md
    assert f"| fslora | 50 s | 3 | {d.mean():+.3f} [" in md
    with pytest.raises(InputError, match="positive seconds"):
        rp.summarize([run], at_s=[0.0])


def test_plan_trace_reads_a_kept_run():
    """experiments/plan_trace.py on a kept planned run: its counts are the metrics file's."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("plan_trace", root / "experiments" / "plan_trace.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    folder = root / "results" / "history" / "wave2" / "sota" / "proposed" / "seed4"
    rows = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    s = tool.summary(folder, target=0.2)
    assert s["rounds"] == len(rows) - 1 and s["sim_time_s"] == rows[-1]["sim_time_s"]
    assert s["participants_mean"] == pytest.approx(sum(len(r["participants"]) for r in rows[1:]) / (len(rows) - 1))
    assert s["time_to_mean_target_s"] == 0.0  # round 0's evaluation is already above 0.2
    plans = tool.plans(folder)
    assert [p["round"] for p in plans] == [r["round"] for r in rows if "plan" in r]
    assert plans[0]["clients_at_floor"] == 2  # two of the ten clients at q = 0.05 in the first plan


def test_overview_of_studies_pairs_each_study_focus_with_the_others(tmp_path):
    from fedlora.report.overview import OVERVIEW, write_overview

    def curve(t_hit, end):
        return [row(0, 0, ev={A: 0.3}), row(1, t_hit, ev={A: 0.7})] + ([row(2, end, ev={A: 0.7})] if end > t_hit else [])

    tgt = {A: 0.6}
    out = tmp_path / "studies"
    # study "one": proposed 20 / 40 s, fslora 60 / 100 s (speedups 3.0 and 2.5)
    for (m, sd), t in {("proposed", 0): 20, ("proposed", 1): 40, ("fslora", 0): 60, ("fslora", 1): 100}.items():
        write_run(out / "one" / m / f"seed{sd}", curve(t, 100), method=m, seed=sd, target=tgt)
    rp.report([out / "one"], focus="proposed", at_s=[10.0], plots=False)
    # study "two", variant "v": proposed slower in its one seed (50 s against 25 s)
    for m, t in {"proposed": 50, "fslora": 25}.items():
        write_run(out / "two" / "v" / m / "seed0", curve(t, 60), method=m, seed=0, target=tgt)
    rp.report([out / "two" / "v"], focus="proposed", plots=False)
    rp.report([out / "two" / "v"], out=out / "two" / "nofocus", plots=False)  # no focus: not in the overview
    assert write_overview(tmp_path / "empty") is None
    md = write_overview(out).read_text()
    assert write_overview(out) == out / OVERVIEW
    assert (out / "speedups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the forest plot beside it
    assert "## one: proposed" in md and "## two/v: proposed" in md and "nofocus" not in md
    logs = [math.log(3.0), math.log(2.5)]
    mean, se = sum(logs) / 2, abs(logs[0] - logs[1]) / 2
    t975_df1 = 12.706204736174705
    p = 1 - 2 * math.atan(mean / se) / math.pi
    lo, hi = math.exp(mean - t975_df1 * se), math.exp(mean + t975_df1 * se)
    assert f"| fslora | {math.sqrt(7.5):.2f}× [{lo:.2f}–{hi:.2f}] 2/0 p {p:.3f} |" in md
    assert "| fslora | 0.50× 0/1 |" in md  # one seed: no interval, no t
    from fedlora.report.overview import speedup_cell
    wide = {"seeds": 2, "bounds": 1, "faster": 2, "slower": 0, "geometric_mean": 4.4, "interval": [2e-5, 9.8e4],
            "t_p": 0.31}
    assert speedup_cell({"test": wide, "focus_missed": False}) == "≥4.40× [<0.01–>100] 2/0 p 0.310"
    assert speedup_cell({"test": None, "focus_missed": True}) == "first method missed a seed"
    # accuracy at 10 s: both at 0.3 + 0.4 * 10 / t_hit; proposed minus fslora per seed
    d = [0.4 * 10 / 20 - 0.4 * 10 / 60, 0.4 * 10 / 40 - 0.4 * 10 / 100]
    assert f"| fslora | {sum(d) / 2:+.3f} [" in md and "2/0 p " in md
    # at a glance: one row per pair (no mean or all-tasks target here: one task), the later fixed time's difference
    glance = md.split("## At a glance")[1].split("## one")[0]
    assert f"| one | proposed vs fslora | {sum(d) / 2:+.3f} [" in glance and "(10 s) |" in glance
    assert "| two/v | proposed vs fslora | — |" in glance  # no fixed times asked in that study
    (out / "three").mkdir()
    (out / "three" / "summary.json").write_text("{not json")
    with pytest.raises(InputError, match="three/summary.json"):
        write_overview(out)
