"""Studies (fedlora.study): the target and pilot-loss rules by hand, bad study files, and the
smallest study (experiments/smoke.yaml) end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fedlora.config import InputError, load_config
from fedlora.study import load_study, pilot_loss_from_reference, run_studies, setting_key, targets_from_reference

ROOT = Path(__file__).resolve().parents[1]


def _rows(evals, losses):
    rows = [{"round": 0, "train_loss": None, "eval": evals[0], "sim_time_s": 0.0}]
    for t, loss in enumerate(losses, 1):
        row = {"round": t, "train_loss": loss, "sim_time_s": 10.0 * t}
        if t < len(evals):
            row["eval"] = evals[t]
        rows.append(row)
    return rows


def test_targets_from_reference_by_hand():
    evals = [{"a": 0.25, "b": 0.30}, {"a": 0.30, "b": 0.30}, {"a": 0.40, "b": 0.31},
             {"a": 0.45, "b": 0.29}, {"a": 0.50, "b": 0.32}]
    rule = targets_from_reference(_rows(evals, [1.0] * 4), fraction=0.8, min_gain=0.03)
    ref_a = (0.40 + 0.45 + 0.50) / 3  # mean of the last 3 evaluations
    assert rule["reference"]["a"] == pytest.approx(ref_a)
    assert rule["targets"] == {"a": round(0.25 + 0.8 * (ref_a - 0.25), 3)}
    assert rule["no_gain"] == ["b"]  # (0.31 + 0.29 + 0.32) / 3 - 0.30 = 0.007 < 0.03
    ref_mean = (ref_a + (0.31 + 0.29 + 0.32) / 3) / 2  # the same rule on the mean over tasks
    assert rule["mean_target"] == round(0.275 + 0.8 * (ref_mean - 0.275), 3)


def test_accuracy_times_are_half_and_all_of_the_references_time_to_the_mean_target(tmp_path):
    from fedlora.study import Setting, _accuracy_times

    means = [0.25, 0.30, 0.36, 0.41, 0.40]  # eval_mean at 0, 10, 20, 30, 40 s
    rows = [{"round": t, "sim_time_s": 10.0 * t, "eval": {"ARC-Easy": m}, "eval_mean": m} for t, m in enumerate(means)]
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    st = Setting("k", load_config(ROOT / "configs" / "smoke.yaml"), tmp_path)
    assert _accuracy_times(st, {"mean_target": 0.36}) == [10, 20]  # first reached at 20 s
    assert _accuracy_times(st, {"mean_target": 0.5}) == [] and _accuracy_times(st, {"targets": {}}) == []


def test_targets_need_evaluations_and_some_gain():
    flat = [{"a": 0.3}] * 5
    with pytest.raises(InputError, match="no task gained"):
        targets_from_reference(_rows(flat, [1.0] * 4), 0.8, 0.03)
    with pytest.raises(InputError, match="evaluations"):
        targets_from_reference(_rows([{"a": 0.3}, {"a": 0.5}], [1.0] * 4), 0.8, 0.03)


def test_pilot_loss_is_the_three_round_mean_after_two_thirds():
    losses = [1.4, 1.3, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01]
    # 16 trained rounds: two thirds is round 11 (ceil 10.67), the window rounds 9..11
    assert pilot_loss_from_reference(_rows([{"a": 0.3}], losses)) == pytest.approx((0.6 + 0.5 + 0.4) / 3)
    # 4 trained rounds: two thirds is round 3, the window rounds 1..3
    assert pilot_loss_from_reference(_rows([{"a": 0.3}], losses[:4])) == pytest.approx((1.4 + 1.3 + 1.2) / 3)


def test_pilot_loss_and_stop_prefer_the_probe_loss():
    from fedlora.pilot import loss_reached

    losses = [1.4, 1.3, 1.2, 1.1, 1.0, 0.9]
    rows = _rows([{"a": 0.3}], losses)
    for r in rows:  # the probe measures f(x) on fixed questions; the train loss is the participants'
        r["probe_loss"] = 2.0 - 0.1 * r["round"]
    # 6 trained rounds: two thirds is round 4, the window rounds 2..4 of the probe (round 0 not counted)
    assert pilot_loss_from_reference(rows) == pytest.approx((1.8 + 1.7 + 1.6) / 3)
    # rounds 1..3: probe mean 1.8 (the train loss, mean 1.3, would already be below 1.75)
    assert loss_reached(rows[:4], 1.85) and not loss_reached(rows[:4], 1.75)
    assert not loss_reached(rows[:3], 5.0)  # two rounds: the 3-round window is not full


def test_bad_study_files(tmp_path):
    def write(obj):
        p = tmp_path / "s.yaml"
        p.write_text(yaml.safe_dump(obj))
        return p

    base = str(ROOT / "configs" / "smoke.yaml")
    with pytest.raises(InputError, match="unknown method 'nope'"):
        load_study(write({"name": "x", "base": base, "methods": ["nope"]}))
    with pytest.raises(InputError, match="field 'target_fraction'"):
        load_study(write({"name": "x", "base": base, "methods": ["fslora"], "target_fraction": 1.5}))
    with pytest.raises(InputError, match="field 'colour'"):
        load_study(write({"name": "x", "base": base, "methods": ["fslora"], "colour": 1}))
    with pytest.raises(InputError, match="no such study file"):
        load_study(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="config file not found"):
        load_study(write({"name": "x", "base": "nowhere.yaml", "methods": ["fslora"]}))


def test_a_study_worker_stops_a_pilot_at_its_loss(tmp_path):
    from fedlora.config import dump_config, load_config
    from fedlora.study import _run_job

    cfg = load_config(ROOT / "configs" / "smoke.yaml",
                      ["train.rounds=6", "train.local_steps=1", "train.batch_size=2", "eval.every=6",
                       "eval.max_examples=4", "eval.final_max_examples=4", "data.max_train_per_task=40"])
    _run_job(dump_config(cfg), str(tmp_path / "pilot"), 1e9, 1)  # any loss is below 1e9
    rows = [json.loads(ln) for ln in (tmp_path / "pilot" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 3  # stopped once the 3-round loss window was full
    _run_job(dump_config(cfg), str(tmp_path / "full"), None, 1)
    assert json.loads((tmp_path / "full" / "result.json").read_text())["rounds"] == 6


def test_run_studies_script_runs_every_shipped_study():
    import re

    script = (ROOT / "experiments" / "run_studies.sh").read_text()
    named = set(re.findall(r"experiments/(\w+)\.yaml", script))
    shipped = {p.stem for p in (ROOT / "experiments").glob("*.yaml")} - {"base", "smoke"}
    assert named == shipped


def test_keep_results_keeps_finished_runs_and_targets(tmp_path):
    """experiments/keep_results.sh: a finished run's small files (a copied run's note too),
    every targets.json; not checkpoints nor unfinished runs."""
    import subprocess

    src, dst = tmp_path / "runs", tmp_path / "kept"
    done, copied, running = src / "s" / "a" / "seed0", src / "s" / "b" / "seed0", src / "s" / "c" / "seed0"
    for d in (done, copied, running):
        (d / "checkpoint").mkdir(parents=True)
        for n in ("config.yaml", "metrics.jsonl", "checkpoint/progress.json"):
            (d / n).write_text("x")
    for d in (done, copied):
        (d / "result.json").write_text("{}")
    (copied / "same_run_as.txt").write_text("../../a/seed0\n")
    (src / "settings" / "k").mkdir(parents=True)
    (src / "settings" / "k" / "targets.json").write_text("{}")
    res = subprocess.run(["bash", str(ROOT / "experiments" / "keep_results.sh"), str(src), str(dst)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    kept = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert kept == ["s/a/seed0/config.yaml", "s/a/seed0/metrics.jsonl", "s/a/seed0/result.json",
                    "s/b/seed0/config.yaml", "s/b/seed0/metrics.jsonl", "s/b/seed0/result.json",
                    "s/b/seed0/same_run_as.txt", "settings/k/targets.json"]


def test_shipped_studies_load_and_share_one_setting():
    keys = set()
    for name in ("online", "sampling", "rank", "sota"):
        spec, variants = load_study(ROOT / "experiments" / f"{name}.yaml")
        assert len(spec.seeds) >= 3
        keys |= {setting_key(cfg) for _, cfg in variants}
    assert len(keys) == 1  # one reference, one set of targets and pilots for the four studies
    spec, variants = load_study(ROOT / "experiments" / "sensitivity.yaml")
    assert len({setting_key(cfg) for _, cfg in variants}) == len(variants)


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path, monkeypatch):
    out = tmp_path / "study"
    spec, _ = load_study(ROOT / "experiments" / "smoke.yaml")
    with pytest.raises(InputError, match="--methods: nope not in the studies"):
        run_studies([ROOT / "experiments" / "smoke.yaml"], out, workers=1, methods=["fslora", "nope"], progress=False)
    assert not out.exists()
    # --methods: only those run; a later call adds the others
    run_studies([ROOT / "experiments" / "smoke.yaml"], out, workers=1, methods=["fslora"], progress=False,
                log=lambda m: None)
    assert (out / "smoke" / "fslora" / "seed0" / "result.json").exists() and not (out / "smoke" / "proposed").exists()
    assert "fslora" in (out / "smoke" / "summary.md").read_text()
    # --report-only: the summaries of what OUT holds, nothing trained or started
    (out / "smoke" / "summary.md").unlink()
    files = sorted(p for p in out.rglob("*") if p.name != "summary.md")
    run_studies([ROOT / "experiments" / "smoke.yaml"], out, report_only=True, progress=False, log=lambda m: None)
    assert "fslora" in (out / "smoke" / "summary.md").read_text() and not (out / "smoke" / "proposed").exists()
    assert sorted(p for p in out.rglob("*") if p.name != "summary.md") == files
    summaries = run_studies([ROOT / "experiments" / "smoke.yaml"], out, workers=1, progress=False, log=lambda m: None)
    (setting,) = list((out / "settings").iterdir())
    rule = json.loads((setting / "targets.json").read_text())
    assert rule["targets"] == spec.targets
    ref_rows = [json.loads(ln) for ln in (setting / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert rule["reference_rounds"] == ref_rows[-1]["round"]
    for m in spec.methods:
        run = out / "smoke" / m / "seed0"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["method"] == m
        assert cfg["train"]["target_accuracy"] == spec.targets  # written before the run
        assert cfg["train"]["max_sim_time_s"] == pytest.approx(spec.time_cap * rule["reference_sim_time_s"])
        res = json.loads((run / "result.json").read_text())
        assert res["stop_reason"] in ("target_accuracy", "max_sim_time", "max_rounds")
    assert (out / "smoke" / "summary.md").exists()
    assert set(summaries) == {"smoke"}
    overview = (out / "summary.md").read_text()
    assert "## smoke: " in overview  # the overview of every study under OUT
    assert "| study | pair | all tasks |" in overview and "| smoke | proposed vs fslora | " in overview  # at a glance
    # a second call finds every run finished and trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    run_studies([ROOT / "experiments" / "smoke.yaml"], out, workers=1, progress=False, log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps
    # another study on the same setting with the same methods trains nothing either: its runs
    # are copies of the finished ones, byte for byte, and say so
    twin = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    twin.update(name="twin", base=str(ROOT / "configs" / "smoke.yaml"))
    (tmp_path / "twin.yaml").write_text(yaml.safe_dump(twin))
    lines = []
    run_studies([tmp_path / "twin.yaml"], out, workers=1, progress=False, log=lines.append)
    assert {p: p.stat().st_mtime_ns for p in (out / "smoke").rglob("result.json")} == {
        p: t for p, t in stamps.items() if (out / "smoke") in p.parents}
    for m in spec.methods:
        mine, theirs = out / "twin" / m / "seed0", out / "smoke" / m / "seed0"
        for name in ("result.json", "metrics.jsonl", "config.yaml"):
            assert (mine / name).read_bytes() == (theirs / name).read_bytes()
        assert (mine / (mine / "same_run_as.txt").read_text().strip()).resolve() == theirs.resolve()
        assert not (mine / "checkpoint").exists()
    assert any("the same run as" in ln for ln in lines)
    # a sampling baseline matched to a planned method of its study takes that run's mean
    # participants per round (here the planned run is a copy of smoke's, made in this call)
    matched = dict(twin, name="matched", methods=["sample_uniform", "proposed"])
    (tmp_path / "matched.yaml").write_text(yaml.safe_dump(matched))
    with pytest.raises(InputError, match="matched to the run .*proposed.* run its method too"):
        run_studies([tmp_path / "matched.yaml"], out, workers=1, methods=["sample_uniform"], progress=False,
                    log=lambda m: None)
    run_studies([tmp_path / "matched.yaml"], out, workers=1, progress=False, log=lambda m: None)
    planned = [json.loads(ln) for ln in (out / "smoke" / "proposed" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    counts = [len(r["participants"]) for r in planned if r["round"] >= 1]
    base_run = out / "matched" / "sample_uniform" / "seed0"
    got = yaml.safe_load((base_run / "config.yaml").read_text())["sampling"]["expected_participants"]
    assert got == pytest.approx(sum(counts) / len(counts))
    n = len(json.loads((base_run / "clients.json").read_text()))
    assert json.loads((base_run / "plan.json").read_text())["participation_prob"] == pytest.approx([got / n] * n)
    # a method planned from pilots starts once its seed's pilots are done, with their constants
    # (the pilots are not trained here: at this scale their fit is noise)
    from fedlora import study as study_mod

    real_run, pilots = study_mod._run_job, []

    def pilots_skipped(cfg_yaml, folder, stop_loss, threads):
        if stop_loss is not None:
            pilots.append(folder)
            return {}
        assert len(pilots) == 4
        return real_run(cfg_yaml, folder, stop_loss, threads)
    monkeypatch.setattr(study_mod, "_run_job", pilots_skipped)
    given = {"constants": {"alpha": 2.0, "beta": 1.0, "gamma": 0.1, "delta": 0.5}, "planning_time_s": 123.0}
    monkeypatch.setattr(study_mod, "_constants", lambda st, seed, rule: given)
    # (and two entries of one config within a call: one trains, the other is its copy)
    other_lr = {"method": "fslora", "overrides": ["train.lr=0.0123"]}
    twin.update(name="piloted", methods=[{"label": "planned", "method": "proposed",
                                         "overrides": ["planner.constants=pilots"]},
                                        {"label": "lr_a", **other_lr}, {"label": "lr_b", **other_lr}])
    (tmp_path / "piloted.yaml").write_text(yaml.safe_dump(twin))
    run_studies([tmp_path / "piloted.yaml"], out, workers=1, progress=False, log=lambda m: None)
    used = yaml.safe_load((out / "piloted" / "planned" / "seed0" / "config.yaml").read_text())["planner"]["constants"]
    assert used["source"] == "pilots" and used["planning_time_s"] == 123.0
    assert {k: used[k] for k in given["constants"]} == given["constants"]
    assert len(pilots) == 4 and (out / "piloted" / "planned" / "seed0" / "result.json").exists()
    a, b = out / "piloted" / "lr_a" / "seed0", out / "piloted" / "lr_b" / "seed0"
    assert (b / "result.json").read_bytes() == (a / "result.json").read_bytes()
    assert (b / (b / "same_run_as.txt").read_text().strip()).resolve() == a.resolve()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}

    # a method that cannot plan fails alone (workers=1 runs in this process, so the planner can
    # be made to refuse here): the study raises after the summaries, which name the failed run
    from fedlora.methods import planned_ablations
    from fedlora.planner import InfeasiblePlan

    def refuse(*a, **k):
        raise InfeasiblePlan("refused by the test")
    monkeypatch.setattr(planned_ablations, "plan_ranks", refuse)
    study = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    study["base"] = str(ROOT / "configs" / "smoke.yaml")
    study["methods"] = ["proposed_s", *spec.methods]
    (tmp_path / "failing.yaml").write_text(yaml.safe_dump(study))
    with pytest.raises(RuntimeError, match="smoke proposed_s seed 0"):
        run_studies([tmp_path / "failing.yaml"], out, workers=1, progress=False, log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps  # the others were kept
    md = (out / "smoke" / "summary.md").read_text()
    assert "Runs that failed" in md and "smoke proposed_s seed 0: " in md and "refused by the test" in md
    assert json.loads((out / "smoke" / "summary.json").read_text())["failed"][0].startswith("smoke proposed_s seed 0: ")


def test_same_runs_train_once(tmp_path):
    from fedlora.config import dump_config
    from fedlora.study import Job, _same_runs

    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    other = cfg.model_copy(deep=True)
    other.seed = cfg.seed + 1
    a, b, c = (Job("method", x, tmp_path / name) for x, name in ((cfg, "a"), (cfg.model_copy(deep=True), "b"),
                                                                   (other, "c")))
    run, copies = _same_runs([a, b, c], tmp_path)
    assert run == [a, c] and copies == [(b, tmp_path / "a")]
    # a finished run elsewhere under OUT is the source for every job of its config
    done = tmp_path / "old" / "run"
    done.mkdir(parents=True)
    (done / "config.yaml").write_text(dump_config(cfg))
    (done / "result.json").write_text("{}")
    run, copies = _same_runs([a, b, c], tmp_path)
    assert run == [c] and copies == [(a, done), (b, done)]
    # a job whose own folder holds a run of its config keeps it
    b.folder.mkdir()
    (b.folder / "config.yaml").write_text(dump_config(cfg))
    (b.folder / "result.json").write_text("{}")
    run, copies = _same_runs([a, b, c], tmp_path)
    assert run == [b, c] and [j for j, _ in copies] == [a] and copies[0][1] in (done, b.folder)


def test_runner_goes_seed_by_seed_and_releases_waiting_runs(tmp_path, monkeypatch):
    """A seed's pilots, then its methods, then what waited for its pilots, before the next
    seed; a finished run is skipped but still releases what waited for it."""
    from fedlora import study
    from fedlora.config import dump_config
    from fedlora.study import Job, Runner

    ran = []
    monkeypatch.setattr(study, "_run_job", lambda cfg_yaml, folder, *a: ran.append(Path(folder).name))
    base = load_config(ROOT / "configs" / "smoke.yaml")

    def job(kind, seed, name, group=None):
        c = base.model_copy(deep=True)
        c.seed = seed
        return Job(kind, c, tmp_path / name, label=name, group=group)

    jobs = [job("method", 1, "m1"), job("method", 0, "m0"), *(job("pilot", s, f"p{s}{x}", ("k", s))
                                                              for s in (1, 0) for x in "ab")]
    waiting = {("k", s): [job("method", s, f"w{s}")] for s in (0, 1)}
    left = {("k", 0): 2, ("k", 1): 2}

    def release(j):
        if j.group is None:
            return []
        left[j.group] -= 1
        return [] if left[j.group] else waiting[j.group]

    done = jobs[2].folder  # p1a ran before (a finished folder of its config)
    done.mkdir()
    (done / "config.yaml").write_text(dump_config(jobs[2].cfg))
    (done / "result.json").write_text("{}")
    Runner(1, log=lambda m: None, progress=False).run(jobs, release)
    assert ran == ["p0a", "p0b", "m0", "w0", "p1b", "m1", "w1"]


def test_cli_study_bad_input_exits_2(tmp_path):
    from typer.testing import CliRunner

    from fedlora.cli import app

    res = CliRunner().invoke(app, ["study", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no such study file" in res.output
    res = CliRunner().invoke(app, ["study", str(ROOT / "experiments" / "smoke.yaml"), "--workers", "0"])
    assert res.exit_code == 2 and "--workers" in res.output
    res = CliRunner().invoke(app, ["study", str(ROOT / "experiments" / "smoke.yaml"), "-o", str(tmp_path / "o"),
                                   "--report-only"])
    assert res.exit_code == 2 and "no finished reference" in res.output and "run the study first" in res.output
    assert not (tmp_path / "o").exists()


def test_constants_from_pilot_folders_recover_the_model(tmp_path):
    """The study's pilot step reads each pilot's config, rounds and the clients' data shares
    and recovers constants that generated those rounds (Theorem-1 rounds factor)."""
    import numpy as np

    from fedlora.config import PilotConfig, dump_config, load_config
    from fedlora.pilot import pilot_run_config
    from fedlora.planner import BoundConstants, rounds_factor
    from fedlora.study import Setting, _constants

    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    truth = BoundConstants(3.0, 1.5, 0.2, 0.9)
    share = np.array([0.1, 0.2, 0.3, 0.4])
    pc = PilotConfig(target_loss=1.0, max_rounds=100)
    folder = tmp_path / "setting"
    for k, (q, s) in enumerate([(1.0, 1.0), (0.5, 1.0), (1.0, 0.5), (0.5, 0.5)]):
        run = folder / "pilot" / "seed0" / f"{k}_q{q:g}_s{s:g}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(dump_config(pilot_run_config(cfg, q, s, pc)))
        rounds = rounds_factor(np.full(4, q), np.full(4, s), share, truth)
        (run / "result.json").write_text(json.dumps({"stop_reason": "stop_when", "rounds": rounds,
                                                     "sim_time_s": 10.0 * (k + 1)}))
        (run / "clients.json").write_text(json.dumps([{"id": i, "data_share": float(p)} for i, p in enumerate(share)]))
    report = _constants(Setting("k", cfg, folder), 0, {"pilot_loss": 1.0, "reference_sim_time_s": 500.0})
    assert report["planning_time_s"] == pytest.approx(10 + 20 + 30 + 40 + 500.0)  # the pilots and the reference
    got = report["constants"]
    want = np.array([truth.alpha, truth.beta, truth.gamma, truth.delta]) / truth.beta
    np.testing.assert_allclose([got[n] / got["beta"] for n in ("alpha", "beta", "gamma", "delta")], want, rtol=1e-6)
    assert (folder / "pilot" / "seed0" / "constants.json").exists()
    # a pilot that did not reach the pilot loss is an input error, not a silent estimate
    (folder / "pilot" / "seed0" / "constants.json").unlink()
    (folder / "pilot" / "seed0" / "0_q1_s1" / "result.json").write_text(
        json.dumps({"stop_reason": "max_rounds", "rounds": 100}))
    with pytest.raises(InputError, match="did not reach the pilot loss"):
        _constants(Setting("k", cfg, folder), 0, {"pilot_loss": 1.0, "reference_sim_time_s": 500.0})


_ORPHAN_SCRIPT = """
import concurrent.futures as cf, multiprocessing as mp, os, sys, time
from fedlora.study import _exit_with_parent

def job(path):
    open(path, "w").write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_exit_with_parent,
                                  initargs=(os.getpid(),))
    pool.submit(job, sys.argv[1])
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.1)
    time.sleep(0.5)
    os._exit(0)  # the study process dies without any cleanup (as under kill -9)
"""


def test_workers_exit_when_the_study_process_dies(tmp_path):
    import os
    import subprocess
    import sys
    import time

    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT)
    pid_file = tmp_path / "worker.pid"
    subprocess.run([sys.executable, str(script), str(pid_file)], check=True, timeout=120)
    pid = int(pid_file.read_text())

    def alive():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # an exited child of a dead parent is reaped by init; a zombie counts as gone
        stat = Path(f"/proc/{pid}/stat")
        return not (stat.exists() and stat.read_text().split()[2] == "Z")

    deadline = time.time() + 20
    while alive() and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(), "the worker outlived the study process"


def test_constants_report_fit_modes():
    """planner.pilot.fit: 'svd' refuses pilots that contradict the model; 'svd_else_constrained'
    then records the rejection and the positive fit, with the rounds it predicts per pilot."""
    from fedlora.pilot import constants_report
    from fedlora.planner import PilotObservation

    share = [0.1, 0.2, 0.3, 0.4]
    obs = [PilotObservation(1, 1, 21), PilotObservation(0.5, 1, 38), PilotObservation(1, 0.5, 40),
           PilotObservation(0.5, 0.5, 43)]
    runs = [{"participation_prob": o.participation_prob, "sketch_ratio": o.sketch_ratio, "rounds": o.rounds}
            for o in obs]
    with pytest.raises(InputError, match="^where: "):
        constants_report(obs, share, [dict(r) for r in runs], "where", fit="svd")
    rep = constants_report(obs, share, [dict(r) for r in runs], "where", fit="svd_else_constrained")
    assert rep["fit"] == "constrained" and rep["svd_rejected"]
    assert all(v > 0 for v in rep["constants"].values())
    pred = [r["predicted_rounds"] for r in rep["pilots"]]
    assert pred[0] < pred[1] and pred[0] < pred[2] and max(pred) == pred[3]  # the model's order
    assert rep["rms_relative_residual"] > 0.01  # these pilots do not fit exactly
