"""The round loop end to end on the smoke config: run folder, resume, rejected updates, bad input."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedlora import setup as setup_mod
from fedlora import streams
from fedlora import simulate
from fedlora.config import InputError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def setup():
    return setup_mod.build_setup(load_config(SMOKE))


@pytest.fixture(scope="module")
def smoke_run(setup, tmp_path_factory):
    """(folder, result) of the smoke config's run, made once for the module; tests only read it
    (or copy it)."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    return out, simulate.run(setup.cfg, out, setup=setup, progress=False)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_cpu_time(rs):
    return [{k: v for k, v in r.items() if k != "cpu_time_s"} for r in rs]


def test_final_evaluation_reuses_the_last_rounds_when_the_questions_are_the_same(tmp_path, monkeypatch):
    """With final_max_examples = max_examples the final questions are the evaluation's (same
    subsample): the last round already scored them on the final state, so finish() takes that
    evaluation instead of scoring them again; with more final questions it scores them."""
    from fedlora import loop

    calls = []
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda s, state, qs: calls.append(len(qs)) or real(s, state, qs))
    for final, extra in ((24, 0), (48, 1)):
        cfg = load_config(SMOKE, [f"eval.final_max_examples={final}"])
        calls.clear()
        result = simulate.run(cfg, tmp_path / str(final), progress=False)
        rs = rows(tmp_path / str(final))
        assert len(calls) == len(rs) + extra  # round 0 and every round (eval.every 1), plus the final one
        if extra == 0:
            assert result["final_eval"] == rs[-1]["eval"] and result["final_eval_mean"] == rs[-1]["eval_mean"]
        else:
            assert calls[-1] == 2 * 48 and result["final_eval_examples"] == 96


def test_run_folder_contract(setup, smoke_run):
    out, result = smoke_run
    for name in ("config.yaml", "clients.json", "plan.json", "metrics.jsonl", "data.json", "result.json",
                 "adapter/adapter_config.json", "checkpoint/progress.json"):
        assert (out / name).exists(), name
    rs = rows(out)
    assert [r["round"] for r in rs] == [0, 1, 2, 3]
    for r in rs[1:]:
        for key in ("round", "sim_time_s", "round_time_s", "participants", "upload_bytes", "download_bytes",
                    "train_loss", "eval", "eval_mean"):
            assert key in r, key
    # the clock adds up and never runs backwards
    assert math.isclose(rs[-1]["sim_time_s"], sum(r["round_time_s"] for r in rs), rel_tol=1e-9)
    clients = json.loads((out / "clients.json").read_text())
    assert len(clients) == 4 and math.isclose(sum(c["data_share"] for c in clients), 1.0)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["participation_prob"] == [0.75] * 4 and plan["ranks"] == [2] * 4
    # upload bytes = what was sent: each participant sends rank-2 slices of every module
    per_client = sum(2 * (i + o) for i, o in setup.engine.module_shapes.values()) * 4
    for r in rs[1:]:
        assert r["upload_bytes"] == per_client * len(r["participants"])
    assert result["rounds"] == 3 and set(result["final_eval"]) == {"ARC-Easy", "social_i_qa"}
    # live tracking: TensorBoard events hold the same numbers, on the simulated clock
    ev = tensorboard_events(out)
    evals = [r for r in rs if "eval_mean" in r]
    assert [e.step for e in ev.Scalars("accuracy/mean")] == [r["round"] for r in evals]
    assert [e.value for e in ev.Scalars("accuracy/mean")] == pytest.approx([r["eval_mean"] for r in evals])
    assert [e.wall_time for e in ev.Scalars("time/simulated_s")] == pytest.approx([r["sim_time_s"] for r in rs])
    assert ev.Scalars("bytes/upload_total")[-1].value == pytest.approx(result["upload_bytes"])
    assert [e.step for e in ev.Scalars("loss/train")] == [1, 2, 3]
    assert [h.step for h in ev.Histograms("plan/participation_prob")] == [0]
    # turning TensorBoard off is not another run: the finished folder is taken as it is
    again = simulate.run(setup.cfg.model_copy(update={"track": setup.cfg.track.model_copy(
        update={"tensorboard": False})}), out, setup=setup, progress=False, resume=True)
    assert again == result


def tensorboard_events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    ev.Reload()
    return ev


def test_resume_equals_uninterrupted(setup, smoke_run, tmp_path, killed_then_resumed):
    full = smoke_run[0]

    killed = tmp_path / "killed"
    left = killed_then_resumed(setup.cfg, killed, setup, at_round=3)
    assert [r["round"] for r in left] == [0, 1, 2]

    assert without_cpu_time(rows(killed)) == without_cpu_time(rows(full))
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run's TensorBoard events: one point per round, as the uninterrupted run's
    full_ev, killed_ev = tensorboard_events(full), tensorboard_events(killed)
    for tag in ("loss/train", "accuracy/mean"):
        assert [(e.step, e.value) for e in killed_ev.Scalars(tag)] == [(e.step, e.value) for e in full_ev.Scalars(tag)]


def test_nan_update_is_rejected_and_run_goes_on(setup, tmp_path, monkeypatch):
    engine = setup.engine
    real = engine.train_local
    cfg = setup.cfg.model_copy(deep=True)
    cfg.sampling.participation_prob = 1.0
    cfg.train.rounds = 2
    cfg.track.tensorboard = False

    def poisoned(start, **kw):
        res = real(start, **kw)
        first = next(iter(res.state))
        a, b = res.state[first]
        res.state[first] = (a, torch.full_like(b, float("nan")))
        return res

    calls = {"n": 0}

    def sometimes_poisoned(start, **kw):
        calls["n"] += 1
        return poisoned(start, **kw) if calls["n"] == 2 else real(start, **kw)

    monkeypatch.setattr(engine, "train_local", sometimes_poisoned)
    out = tmp_path / "nan"
    simulate.run(cfg, out, setup=simulate.Setup(**{**setup.__dict__, "cfg": cfg}), progress=False)
    rs = rows(out)
    assert rs[1]["rejected"] == [rs[1]["participants"][1]]
    assert rs[2]["rejected"] == []
    state = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())
    assert not (out / "tensorboard").exists()  # track.tensorboard: false


def test_same_seed_same_numbers_and_the_probe_only_measures(setup, smoke_run, tmp_path):
    """Same seed, same numbers. The second run also sets eval.probe_examples: every row gains
    the global model's loss on fixed training questions (equal to the cross-entropy of the
    engine's scores, computed here by hand) and every other number stays the same."""
    import dataclasses

    cfg = setup.cfg.model_copy(deep=True)
    cfg.eval.probe_examples = 12
    a, b = smoke_run[0], tmp_path / "b"  # a: the module's run of the same config
    simulate.run(cfg, b, setup=dataclasses.replace(setup, cfg=cfg), progress=False)
    ra, rb = without_cpu_time(rows(a)), without_cpu_time(rows(b))
    assert all("probe_loss" not in r for r in ra) and all("probe_loss" in r for r in rb)
    assert [{k: v for k, v in r.items() if k != "probe_loss"} for r in rb] == ra
    idx = setup_mod.subsample(len(setup.train), 12, seed=setup_mod.derived_seed(cfg.seed, streams.STREAM_PROBE))
    qs = [setup.train[i] for i in idx]
    state = setup.engine.init_state(setup_mod.derived_seed(cfg.seed, streams.STREAM_INIT))
    scores = setup.engine.scores(state, scaling=cfg.lora.alpha / cfg.lora.rank, questions=qs)
    by_hand = sum(-torch.log_softmax(scores[j, :len(q.options)], 0)[q.label].item() for j, q in enumerate(qs)) / len(qs)
    assert rb[0]["probe_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert rb[-1]["probe_loss"] != pytest.approx(rb[0]["probe_loss"], rel=1e-6)  # it follows training


def test_a_runs_numbers_do_not_depend_on_what_ran_before_it(tmp_path):
    """With LoRA in the top block only, the frozen blocks' output is cached per (question, option)
    and shared by every run on a setup (a compare, a study's worker). Each question's pairs are
    computed in a pass of their own, so FSLoRA after another method gives exactly the numbers it
    gives alone (filled by whichever batch first needed a pair, the last bits followed the
    earlier run: this test failed so)."""
    cfg = load_config(SMOKE, ["lora.layers=[5]", "train.rounds=4", "method=fslora"])
    first = setup_mod.build_setup(load_config(SMOKE, ["lora.layers=[5]", "train.rounds=4", "method=sample_full"]))
    assert first.engine.frozen_prefix > 0
    simulate.run(first.cfg, tmp_path / "other", setup=first, progress=False)
    simulate.run(cfg, tmp_path / "after", setup=first, progress=False)
    simulate.run(cfg, tmp_path / "alone", progress=False)
    assert without_cpu_time(rows(tmp_path / "after")) == without_cpu_time(rows(tmp_path / "alone"))
    # nor on a setup of its own that took the caches the two runs before filled (a study
    # worker's next setup; tests/test_model.py checks the scores across seeds)
    adopted = setup_mod.build_setup(cfg, caches=first.engine.scorer.caches())
    assert adopted.engine.scorer.prefix_cache is first.engine.scorer.prefix_cache
    simulate.run(cfg, tmp_path / "adopted", setup=adopted, progress=False)
    assert without_cpu_time(rows(tmp_path / "adopted")) == without_cpu_time(rows(tmp_path / "alone"))


def test_a_replicate_redraws_the_training_and_keeps_the_setting(setup, tmp_path):
    """train.replicate = 0 draws what every run drew before the field existed ([seed, stream,
    ...]); replicate 1 draws the minibatches, participation and sketches anew on the same data
    split, client profiles and evaluation questions."""
    import dataclasses

    base = setup.cfg.model_copy(deep=True)
    base.train.rounds = 2
    cfg = base.model_copy(deep=True)
    cfg.train.replicate = 1
    own_draw, rep = dataclasses.replace(setup, cfg=base), dataclasses.replace(setup, cfg=cfg)
    seed, tau = setup.cfg.seed, setup.cfg.train.local_steps
    own = setup.client_indices[0]
    size = min(setup.cfg.train.batch_size, len(own))
    rng = np.random.default_rng([seed, streams.STREAM_BATCH, 1, 0])  # the draw as it was written before
    before = [[setup.train[j].text for j in rng.choice(own, size=size, replace=False)] for _ in range(tau)]
    ids = lambda s: [[q.text for q in b] for b in setup_mod.client_batches(s, 0, 1)]  # noqa: E731
    assert ids(setup) == before
    assert ids(rep) != before and sorted(sum(ids(rep), [])) != sorted(sum(before, []))
    a, b = tmp_path / "a", tmp_path / "b"
    simulate.run(base, a, setup=own_draw, progress=False)
    simulate.run(cfg, b, setup=rep, progress=False)
    for f in ("data.json", "clients.json"):
        assert (a / f).read_text() == (b / f).read_text()
    assert setup_mod.build_setup(cfg).eval_questions == setup.eval_questions
    ra, rb = rows(a), rows(b)
    assert ra[0]["eval"] == rb[0]["eval"]  # same questions; B = 0, so a fresh A leaves the scores as they were
    assert [r["participants"] for r in ra] != [r["participants"] for r in rb]
    assert "replicate: 1" in (b / "config.yaml").read_text() and "replicate" not in (a / "config.yaml").read_text()


def test_a_method_that_cannot_plan_leaves_no_folder(setup, tmp_path):
    # gamma this large leaves no feasible ranks at the fixed q = 0.5 (proposed_s plans s only)
    cfg = load_config(SMOKE, ["method=proposed_s", "sampling.participation_prob=0.5",
                              "planner.constants={alpha: 1.0, beta: 1.0, gamma: 2.0, delta: 1.0}"])
    out = tmp_path / "run"
    with pytest.raises(InputError, match="planner.constants / sampling.participation_prob"):
        simulate.run(cfg, out, setup=setup, progress=False)
    assert not out.exists()


def test_resume_with_more_rounds_continues_a_finished_run(setup, smoke_run, tmp_path):
    """--resume train.rounds=N (larger) continues from the last checkpoint: the same training
    as one longer run; the shorter run's last round was evaluated as its final round."""
    cfg = setup.cfg
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"rounds": cfg.train.rounds + 2})})
    full = tmp_path / "full"
    simulate.run(longer, full, setup=setup, progress=False)
    ext = tmp_path / "extended"
    shutil.copytree(smoke_run[0], ext)  # the finished 3-round run
    result = simulate.run(longer, ext, setup=setup, progress=False, resume=True)
    assert result["rounds"] == cfg.train.rounds + 2 and result["stop_reason"] == "max_rounds"
    assert (ext / "config.yaml").read_text() == (full / "config.yaml").read_text()

    def training(rs):
        return [{k: v for k, v in r.items() if k not in ("cpu_time_s", "eval", "eval_mean")} for r in rs]

    assert training(rows(ext)) == training(rows(full))
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ext / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # fewer rounds, or any other change, is refused and leaves the finished run as it was
    before = (ext / "result.json").read_text()
    for other in (cfg, longer.model_copy(update={"seed": 7})):
        with pytest.raises(InputError, match="train.rounds|seed"):
            simulate.run(other, ext, setup=setup, progress=False, resume=True)
    assert (ext / "result.json").read_text() == before


def test_existing_folder_needs_resume_or_overwrite(setup, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "something").write_text("keep me")
    with pytest.raises(InputError, match="--resume"):
        simulate.run(setup.cfg, out, setup=setup, progress=False)
    assert (out / "something").read_text() == "keep me"


# ------------------------------------------------------------ CLI, exit code 2


def cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "fedlora.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def bad_input_cases(tmp_path):
    bad_profiles = tmp_path / "profiles.json"
    bad_profiles.write_text('[{"compute_time_s": 1, "bits_per_s_per_hz": 2}]')
    unreadable = tmp_path / "garbled.json"
    unreadable.write_text("{not json")
    bad_task = tmp_path / "tasks" / "broken"
    bad_task.mkdir(parents=True)
    (bad_task / "test.json").write_text(json.dumps([{"instruction": "Q?\n\nAnswer1: a Answer2: b\n\n"
                                                     "Answer format: answer1/answer2", "answer": "answer9"}]))
    return [
        (["data.num_clients=4", "trian.rounds=3"], ["unknown key", "trian"]),
        (["sampling.participation_prob=1.5"], ["sampling.participation_prob", "1.5"]),
        (["sketch.ratio=0"], ["sketch.ratio", "0"]),
        (["lora.rank=0"], ["lora.rank", "0"]),
        ([f"data.dir={tmp_path / 'missing'}"], ["missing"]),
        ([f"data.dir={tmp_path / 'tasks'}", "data.tasks=[broken]"], ["test.json", "record 0", "answer9"]),
        (["system.profiles.source=file", f"system.profiles.file={bad_profiles}"], ["profiles.json", "1 profiles"]),
        (["system.profiles.source=file", f"system.profiles.file={unreadable}"], ["garbled.json"]),
        (["system.profiles.source=file", f"system.profiles.file={tmp_path / 'nofile.json'}"], ["nofile.json"]),
        (["model.name_or_path=/no/such/model"], ["model.name_or_path", "/no/such/model"]),
        (["model.name_or_path=nobody/no-such-model"], ["hub model 'nobody/no-such-model'", "model.name_or_path=DIR"]),
    ]


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    """Each bad input: exit code 2, one line on stderr naming the field, file or value, nothing
    written. In process through the CLI app (typer's CliRunner: the same command and error
    path a shell runs, without a process start per case); the hub-model case, which needs
    HF_HUB_OFFLINE at import, and a missing config file run as real processes."""
    from concurrent.futures import ThreadPoolExecutor

    from typer.testing import CliRunner

    from fedlora.cli import app

    cases = bad_input_cases(tmp_path)
    hub = [i for i, (overrides, _) in enumerate(cases) if overrides[0].startswith("model.name_or_path=nobody")]
    with ThreadPoolExecutor(max_workers=2) as pool:  # the two process starts, while the in-process cases run
        procs = [pool.submit(cli, "run", SMOKE, "-o", tmp_path / f"out{i}", "--quiet", *cases[i][0]) for i in hub]
        missing = pool.submit(cli, "run", tmp_path / "none.yaml")
        runner = CliRunner()
        results = {i: runner.invoke(app, ["run", str(SMOKE), "-o", str(tmp_path / f"out{i}"), "--quiet", *ov])
                   for i, (ov, _) in enumerate(cases) if i not in hub}
        for i, fut in zip(hub, procs):
            results[i] = fut.result()
        missing = missing.result()
    for i, (overrides, needles) in enumerate(cases):
        res = results[i]
        code = res.returncode if hasattr(res, "returncode") else res.exit_code
        assert code == 2, (overrides, res.stderr[-2000:], getattr(res, "exception", None))
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        for n in needles:
            assert n in lines[0], (n, lines[0])
        assert not (tmp_path / f"out{i}").exists(), "nothing may be written on bad input"
    assert missing.returncode == 2 and "config file not found" in missing.stderr and "Traceback" not in missing.stderr


def test_eval_schedule_by_rounds_and_by_simulated_time():
    from fedlora.config import load_config
    from fedlora.loop import eval_due

    cfg = load_config(None, ["train.rounds=10", "eval.every=3"])
    assert [t for t in range(1, 11) if eval_due(cfg, t, 0.0, 1.0)] == [3, 6, 9, 10]
    cfg = load_config(None, ["train.rounds=100", "eval.every_s=60", "eval.every=1"])
    # rounds of 25 s: the clock crosses 60, 120, 180 s in rounds 3, 5, 8 (ends 75, 125, 200)
    ends = [25.0 * t for t in range(0, 9)]
    due = [t for t in range(1, 9) if eval_due(cfg, t, ends[t - 1], ends[t])]
    assert due == [3, 5, 8]
    cfg = load_config(None, ["train.rounds=100", "eval.every_s=60", "train.max_sim_time_s=70"])
    assert eval_due(cfg, 3, 50.0, 75.0) and eval_due(cfg, 4, 75.0, 100.0)  # the stopping round is evaluated


def test_dirichlet_draw_reaches_the_partition():
    """data.dirichlet_draw is what build_setup partitions with: 50 clients on the smoke data
    fail the per-task draw (InputError naming the way out) and get data with per_client."""
    cfg = load_config(SMOKE, ["data.num_clients=50", "data.max_train_per_task=null"])
    with pytest.raises(InputError, match="dirichlet_draw=per_client"):
        setup_mod.build_setup(cfg)
    s = setup_mod.build_setup(load_config(SMOKE, ["data.num_clients=50", "data.max_train_per_task=null",
                                                  "data.dirichlet_draw=per_client"]))
    sizes = [sum(c.values()) for c in s.data_report["clients"]]
    assert len(sizes) == 50 and min(sizes) >= s.cfg.data.min_client_samples
