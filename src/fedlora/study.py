"""Studies: several methods, seeds and settings run against targets fixed before the runs.

A study file (YAML, see experiments/) names a base run config, overrides, the methods, the
seeds and optionally variants (name -> overrides, for sensitivity sweeps). A method is a name,
or {label, method, overrides} for a method run with its own settings (e.g. `proposed` planned
from pilots beside the online default), its runs in OUT/<study>/<label>/. For every distinct
setting (base + study overrides + variant overrides) the runner does, in this order:

1. Reference: `reference` (default `sample_full`: every client, every round, full rank) with
   seed 0, no target, `train.rounds` rounds. Its curve fixes, by a rule stated up front:
   * the target of each task: acc0 + target_fraction * (acc_ref - acc0), acc0 the accuracy
     before training, acc_ref the mean of the reference's last 3 evaluations; a task whose
     gain acc_ref - acc0 is below `min_gain` gets no target (it did not learn at this scale);
   * the same rule on the mean accuracy over tasks: a secondary column of the summaries
     (runs do not stop on it);
   * the pilot loss (for the planner's constants, seed 001 section V-A): the reference's
     probe loss (train loss where it measures none), 3-round mean, after two thirds of its
     rounds.
   Both go to <setting>/targets.json and into every later run's config.yaml, before any of
   those runs starts: nothing is tuned after seeing the compared methods.
2. Pilots and methods, seed by seed (every study's seed 0 first, so a cut-short call leaves
   whole seeds):
   * pilots, only for a method that plans with `planner.constants: pilots`: the 4 pilot
     settings of `planner.pilot.settings` per seed, each stopped at the pilot loss; their
     rounds give the constants (planner.estimate_constants), written to
     <setting>/pilot/seed<k>/constants.json with their cost: the pilots' simulated time plus
     the reference's (it set their stopping loss), which those runs count as planning time;
     such a method's run starts once its seed's pilots are done;
   * methods: every method and seed, with train.target_accuracy = the targets (the run stops
     once every target is reached), at most `rounds_cap` x the reference's rounds and
     `time_cap` x its simulated time (a method not there by then is "not reached");
   * a sampling baseline matched to a planned method (`sampling.match`) that the same study
     runs: it waits for that method's run of its seed, and its `sampling.expected_participants`
     is that run's mean participants per round (an online plan moves after its first round,
     so its starting plan is not what the baseline is compared with).

The summaries also read every method's mean accuracy at half the time the reference took to
the mean target and at that time, paired by seed against the study's first method.

Jobs run in parallel worker processes (`workers`, one pool for the call); finished run
folders are skipped, so an interrupted study resumes. A method run whose config is exactly
that of another run of the call or of a finished run under OUT (two studies on one setting
sharing a method) is trained once and copied (its folder says so in same_run_as.txt). Then
report.report writes summary.md, summary.json and the plots per study (and variant), and
report.overview OUT/summary.md: every study's first method against the others, paired by seed.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import (ConstantsConfig, InputError, RunConfig, dump_config, load_config, read_user_file, training_dump,
                     validate)
from .rundir import copy_run, has_checkpoint, read_rows, run_status, time_to_target, training_view, write_atomic

EVAL_WINDOW = 3  # reference evaluations averaged into acc_ref


class MethodEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # the run folder's name
    method: str
    overrides: list[str] = []  # dotted key=value on top of the study's


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    base: str  # run config, relative to the study file
    overrides: list[str] = []  # dotted key=value, as `fedlora run --set`
    methods: list[str | MethodEntry]
    seeds: list[int] = [0, 1, 2]
    reference: str = "sample_full"
    target_fraction: float = Field(0.8, gt=0, le=1)
    min_gain: float = Field(0.03, ge=0)
    targets: dict[str, float] | None = None  # fixed targets instead of the reference rule
    rounds_cap: float = Field(4.0, ge=1)  # method runs: at most this many times the reference's rounds ...
    time_cap: float = Field(1.5, ge=1)  # ... and this many times its simulated time
    variants: dict[str, list[str]] | None = None  # sensitivity: name -> overrides


@dataclass
class Setting:
    """One distinct run setting (data, model, system, training): its reference, targets, pilots."""
    key: str
    cfg: RunConfig  # method/seed as in the base; per job copies set them
    folder: Path
    needs_pilot: set[int] = field(default_factory=set)


@dataclass
class Job:
    kind: str  # "reference" | "pilot" | "method"
    cfg: RunConfig
    folder: Path
    stop_loss: float | None = None
    label: str = ""
    group: tuple[str, int] | None = None  # a pilot's (setting key, seed)


# ----------------------------------------------------------------------------- loading
def load_study(path: str | Path, extra_overrides: list[str] | None = None) -> tuple[StudySpec, list[tuple[str, RunConfig]]]:
    """The study spec and its (variant name, config) list; raises InputError on bad input."""
    from .methods import METHODS

    path = Path(path)
    raw = read_user_file(path, "YAML", missing="no such study file")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise InputError(f"{path}: field '{loc}': {err['msg']}") from None
    for m in [e.method for e in method_entries(spec)] + [spec.reference]:
        if m not in METHODS:
            raise InputError(f"{path}: field 'methods': unknown method '{m}' (known: {', '.join(sorted(METHODS))})")
    labels = [e.label for e in method_entries(spec)]
    if len(set(labels)) != len(labels):
        raise InputError(f"{path}: field 'methods': labels must differ ({', '.join(labels)})")
    if not spec.seeds or any(s < 0 for s in spec.seeds):
        raise InputError(f"{path}: field 'seeds': give one or more seeds >= 0")
    base = (path.parent / spec.base).resolve()
    variants = spec.variants or {"": []}
    out = []
    for name, vo in variants.items():
        cfg = load_config(base, list(spec.overrides) + list(vo) + list(extra_overrides or []))
        out.append((name, cfg))
    return spec, out


def setting_key(cfg: RunConfig) -> str:
    """What the reference, targets and pilots depend on: the config without method, seed,
    target and stopping knobs."""
    c = cfg.model_copy(deep=True)
    c.method, c.seed = "manual", 0
    c.train.target_accuracy = None
    c.train.max_sim_time_s = None
    c.planner.constants = "online"
    c.eval.probe_examples = None  # a measurement only: training is the same with or without it
    return hashlib.sha256(training_dump(c).encode()).hexdigest()[:12]  # nor what is recorded (track)


# ----------------------------------------------------------------------------- rules
def targets_from_reference(rows: list[dict], fraction: float, min_gain: float) -> dict:
    """Per-task targets from the reference's metric rows (see the module docstring)."""
    evals = [r for r in rows if isinstance(r.get("eval"), dict)]
    if len(evals) < EVAL_WINDOW + 1:
        raise InputError(f"reference: {len(evals)} evaluations; {EVAL_WINDOW + 1} or more are needed "
                         "(raise train.rounds or lower eval.every)")
    start, last = evals[0]["eval"], evals[-EVAL_WINDOW:]
    out: dict[str, Any] = {"targets": {}, "start": start, "reference": {}, "no_gain": []}
    for task in start:
        ref = sum(r["eval"][task] for r in last) / EVAL_WINDOW
        out["reference"][task] = ref
        gain = ref - start[task]
        if gain < min_gain:
            out["no_gain"].append(task)
        else:
            out["targets"][task] = round(start[task] + fraction * gain, 3)
    if not out["targets"]:
        raise InputError(f"reference: no task gained {min_gain} accuracy; no target can be set "
                         "(train longer or check the learning rate)")
    # the same rule on the mean over tasks: a secondary, less noisy column of the summaries
    # (its evaluation pools every task's questions); runs never stop on it
    mean_start = sum(start.values()) / len(start)
    mean_ref = sum(out["reference"].values()) / len(start)
    if mean_ref - mean_start >= min_gain:
        out["mean_target"] = round(mean_start + fraction * (mean_ref - mean_start), 3)
    return out


def pilot_loss_from_reference(rows: list[dict]) -> float:
    """The reference's loss (probe loss if measured, else train loss), mean of 3 rounds,
    after two thirds of its rounds. (Early on the loss is flat: a shallower pilot target is
    met by every pilot in its first rounds and the rounds then carry no information about q
    and s.)"""
    from .pilot import LOSS_WINDOW, loss_key

    key = loss_key(rows)
    trained = [r for r in rows if r.get("round", 1) > 0 and r.get(key) is not None]
    at = max(LOSS_WINDOW, math.ceil(2 * len(trained) / 3))
    window = trained[at - LOSS_WINDOW:at]
    return sum(r[key] for r in window) / LOSS_WINDOW


# ----------------------------------------------------------------------------- jobs
def _run_job(cfg_yaml: str, folder: str, stop_loss: float | None, threads: int) -> dict:
    """Worker: one run into `folder` (resumed if it has a checkpoint)."""
    import torch

    from . import simulate
    from .quiet import quiet_libraries
    from .setup import build_setup

    quiet_libraries()
    torch.set_num_threads(threads)
    cfg = validate(yaml.safe_load(cfg_yaml), folder)
    folder = Path(folder)
    from .pilot import loss_reached

    stop = None if stop_loss is None else functools.partial(loss_reached, target_loss=stop_loss)
    resume = has_checkpoint(folder)
    key = (_setup_key(cfg), cfg.seed)
    if _SETUP_CACHE.get("key") != key:  # same data, profiles and model: reuse the last setup of this process
        last = _SETUP_CACHE.pop("setup", None)  # another setting or seed: its frozen-block cache may serve
        caches = None if last is None else last.engine.scorer.caches()
        del last  # free its model before building the next
        _SETUP_CACHE.update(key=key, setup=build_setup(cfg, caches=caches))
    return simulate.run(cfg, folder, resume=resume, overwrite=not resume, progress=False, stop_when=stop,
                        setup=_SETUP_CACHE["setup"])


_SETUP_CACHE: dict = {}  # one per process: the model is the big part, keep only the latest


def _setup_key(cfg: RunConfig) -> str:
    """What setup.build_setup depends on: the setting without the evaluation schedule
    (pilots evaluate less often than the reference but share its data, model and caches)."""
    c = cfg.model_copy(deep=True)
    c.eval.every, c.eval.every_s = 1, None
    return setting_key(c)


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: stop when the study process dies (killed, not only Ctrl-C), so no
    orphan keeps writing into a run folder a restarted study also writes. The killed run
    resumes from its last checkpoint."""
    import threading
    import time

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class Runner:
    """Runs jobs in `workers` processes, one pool for all phases of a call: a worker keeps its
    last setup (and the frozen-block cache its next setup shares) from the pilots to the
    methods. close() ends the pool."""

    def __init__(self, workers: int, log: Callable[[str], None], progress: bool):
        self.workers, self.log, self.progress = max(1, workers), log, progress
        self.failures: list[tuple[str, str]] = []
        self._pool: cf.ProcessPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def run(self, jobs: list[Job], release: Callable[[Job], list[Job]] | None = None) -> None:
        """Run `jobs` by seed (a seed's pilots before its methods), `workers` at a time; a
        finished run folder is skipped. `release(job)`, called once a job is done or found
        finished, returns jobs that waited for it; they join the queue in their seed's place."""
        from tqdm.auto import tqdm

        def order(j: Job) -> tuple:
            return j.cfg.seed, j.kind != "pilot"

        def todo(js: list[Job]) -> int:  # refuses another config's run
            return sum(run_status(j.folder, dump_config(j.cfg)) != "finished" for j in js)

        queue = sorted(jobs, key=order)
        bar = tqdm(total=todo(queue), disable=not self.progress, unit="run", dynamic_ncols=True,
                   desc="references" if all(j.kind == "reference" for j in queue) else "runs")
        threads = max(1, (os.cpu_count() or 1) // self.workers)

        def done(j: Job) -> None:
            new = release(j) if release else []
            if new:
                bar.total += todo(new)
                bar.refresh()
                queue.extend(new)
                queue.sort(key=order)  # stable: released jobs keep their order within a seed

        in_flight: dict[cf.Future, Job] = {}
        while queue or in_flight:
            while queue and len(in_flight) < self.workers:
                j = queue.pop(0)
                if run_status(j.folder, dump_config(j.cfg)) == "finished":
                    done(j)
                elif self.workers == 1:
                    self._one(j, lambda: _run_job(dump_config(j.cfg), str(j.folder), j.stop_loss, threads))
                    bar.update(1)
                    done(j)
                else:
                    if self._pool is None:
                        self._pool = cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                                            initializer=_exit_with_parent, initargs=(os.getpid(),))
                    in_flight[self._pool.submit(_run_job, dump_config(j.cfg), str(j.folder), j.stop_loss, threads)] = j
            if in_flight:
                finished, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    j = in_flight.pop(f)
                    self._one(j, f.result)
                    bar.update(1)
                    if isinstance(f.exception(), cf.process.BrokenProcessPool) and self._pool is not None:
                        self._pool.shutdown(wait=False)  # a worker died (killed, out of memory): a new pool
                        self._pool = None
                    done(j)
        bar.close()

    def _one(self, job: Job, call) -> None:
        try:
            call()
        except Exception as e:  # recorded and reported at the end; the other runs go on
            msg = str(e) if isinstance(e, InputError) else "".join(traceback.format_exception(e))[-2000:]
            self.failures.append((job.label, msg))
            self.log(f"FAILED {job.label}: {msg.splitlines()[-1] if msg else type(e).__name__}")


# ----------------------------------------------------------------------------- the study
def run_studies(paths: list[str | Path], out: str | Path, *, workers: int = 1, seeds: list[int] | None = None,
                overrides: list[str] | None = None, methods: list[str] | None = None, progress: bool = True,
                log: Callable[[str], None] | None = None, report_only: bool = False) -> dict:
    """Run the study files into OUT (shared references and pilots under OUT/settings/);
    returns {study name: report summary}. `methods`: only the entries with these labels run
    (the others are left for a later call; the summaries cover every finished run).
    `report_only`: run nothing, write the summaries of what OUT holds now (its references
    must be done; runs still going are flagged unfinished), e.g. beside a running call.
    Raises InputError on bad input, RuntimeError when runs failed (after every other run is
    done and reported)."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    runner = Runner(workers, log, progress)  # its pool starts with the first job: none when report_only
    try:
        return _run_studies(runner, paths, Path(out), seeds=seeds, overrides=overrides, only=methods, log=log,
                            report_only=report_only)
    finally:
        runner.close()


def _run_studies(runner: Runner, paths: list[str | Path], out: Path, *, seeds: list[int] | None,
                 overrides: list[str] | None, only: list[str] | None, log: Callable[[str], None],
                 report_only: bool = False) -> dict:
    studies = []
    for p in paths:
        spec, variants = load_study(p, overrides)
        if seeds is not None:
            spec.seeds = list(seeds)
        studies.append((spec, variants))
    names = [s.name for s, _ in studies]
    if len(set(names)) != len(names):
        raise InputError(f"study names must differ: {', '.join(names)}")
    labels = {e.label for spec, _ in studies for e in method_entries(spec)}
    if only is not None and set(only) - labels:
        raise InputError(f"--methods: {', '.join(sorted(set(only) - labels))} not in the studies "
                         f"(their methods: {', '.join(sorted(labels))})")
    chosen = labels if only is None else set(only)
    if only is not None:  # a study with none of them is not run (nor its reference)
        studies = [(spec, v) for spec, v in studies if any(e.label in chosen for e in method_entries(spec))]
    settings: dict[str, Setting] = {}
    plan = []  # (spec, variant, setting, method folder root)
    for spec, variants in studies:
        for vname, cfg in variants:
            key = setting_key(cfg)
            st = settings.setdefault(key, Setting(key, cfg, out / "settings" / key))
            for e in method_entries(spec):
                if e.label in chosen and _uses_pilots(entry_config(cfg, e)):
                    st.needs_pilot |= set(spec.seeds)
            plan.append((spec, vname, st, out / spec.name / vname if vname else out / spec.name))

    # 1. references
    ref_specs = {}
    for spec, _v, st, _root in plan:
        first = ref_specs.setdefault(st.key, spec)
        if _rule_fields(first) != _rule_fields(spec):
            raise InputError(f"studies '{first.name}' and '{spec.name}' share a setting but not its target rule "
                             "(reference, target_fraction, min_gain, targets, rounds_cap, time_cap); run them apart")
    from .pilot import pilot_config, pilot_run_config

    jobs = []
    for key, st in settings.items():
        spec = ref_specs[key]
        c = st.cfg.model_copy(deep=True)
        c.method, c.seed = spec.reference, 0
        c.train.target_accuracy, c.train.max_sim_time_s = None, None
        c.eval.probe_examples = pilot_config(st.cfg).probe_examples  # the pilots' loss measure
        jobs.append(Job("reference", c, st.folder / "reference", label=f"reference {key}"))
    if report_only:
        missing = [str(j.folder) for j in jobs if not (j.folder / "result.json").exists()]
        if missing:
            raise InputError(f"--report-only: no finished reference in {', '.join(missing)}; run the study first")
    else:
        log(f"{len(settings)} setting(s): references")
        runner.run(jobs)
        _raise_failures(runner)
    rules = {}
    for key, st in settings.items():
        spec = ref_specs[key]
        rows = read_rows(st.folder / "reference")
        if spec.targets is None:
            rule = targets_from_reference(rows, spec.target_fraction, spec.min_gain)
        else:  # pre-registered targets replace the rule
            rule = {"targets": dict(spec.targets), "start": rows[0].get("eval"), "no_gain": []}
        rule["pilot_loss"] = pilot_loss_from_reference(rows)
        rule["reference_rounds"] = int(rows[-1]["round"])
        rule["reference_sim_time_s"] = float(rows[-1]["sim_time_s"])
        rule["rule"] = "fixed targets of the study file" if spec.targets is not None else (f"target = acc0 + {spec.target_fraction} (acc_ref - acc0), acc_ref = mean of the last "
                        f"{EVAL_WINDOW} evaluations of '{spec.reference}' seed 0; tasks gaining < {spec.min_gain}: "
                        "no target; pilot loss = reference probe loss (train loss where no probe), 3-round mean, "
                        "after two thirds of its rounds")
        if not report_only:
            _write_json(st.folder / "targets.json", rule)
            log(f"setting {key}: targets {rule['targets']}"
                + (f", no gain on {rule['no_gain']}" if rule["no_gain"] else ""))
        rules[key] = rule
    if report_only:
        return _write_summaries(plan, rules, out, runner.failures, log)

    # 2. pilots and methods, seed by seed (a cut-short call leaves whole seeds): a method
    # planned from pilots waits for its seed's pilots and their constants
    pilots = []
    for key, st in settings.items():
        cap = int(math.ceil(ref_specs[key].rounds_cap * rules[key]["reference_rounds"]))
        pc = pilot_config(st.cfg).model_copy(update={"target_loss": rules[key]["pilot_loss"], "target_accuracy": None,
                                                     "max_rounds": cap})
        for seed in sorted(st.needs_pilot):
            for k, (q, s) in enumerate(pc.settings):
                c = pilot_run_config(st.cfg, q, s, pc)
                c.seed = seed
                pilots.append(Job("pilot", c, st.folder / "pilot" / f"seed{seed}" / f"{k}_q{q:g}_s{s:g}",
                                  stop_loss=pc.target_loss, label=f"pilot {key} seed {seed} q={q:g} s={s:g}",
                                  group=(key, seed)))
    methods, waiting = [], {}
    after_run: dict[Path, list[Job]] = {}  # a run's folder -> the baselines matched to it
    for spec, vname, st, root in plan:
        rule = rules[st.key]
        for seed in spec.seeds:
            for e in method_entries(spec):
                if e.label not in chosen:
                    continue
                c = entry_config(st.cfg, e)
                c.seed = seed
                c.train.target_accuracy = dict(rule["targets"])
                c.train.rounds = int(math.ceil(spec.rounds_cap * rule["reference_rounds"]))
                c.train.max_sim_time_s = spec.time_cap * rule["reference_sim_time_s"]
                job = Job("method", c, root / e.label / f"seed{seed}",
                          label=f"{_study_label(spec.name, vname)} {e.label} seed {seed}")
                match = _matched_entry(spec, c)
                if match is not None:
                    after_run.setdefault(root / match / f"seed{seed}", []).append(job)
                elif _uses_pilots(c):
                    waiting.setdefault((st.key, seed), []).append(job)
                else:
                    methods.append(job)
    methods, copies = _same_runs(methods, out)
    left = collections.Counter(j.group for j in pilots)  # pilots still to finish per (setting, seed)

    copies_of: dict[Path, list[Job]] = {}
    for job, src in copies:
        copies_of.setdefault(src, []).append(job)

    def matched(folder: Path) -> list[Job]:
        """The baselines matched to the run in `folder`, with its mean participants."""
        jobs = after_run.pop(folder, [])
        if jobs:
            try:
                mean = _mean_participants(folder)
            except InputError as e:  # the matched run failed (recorded) or cannot be read
                runner.failures.extend((j.label, f"matched to {folder}, which has no result: {e}") for j in jobs)
                return []
            for j in jobs:
                j.cfg.sampling.expected_participants = mean
        return jobs

    def copy(src: Path) -> list[Job]:
        released = []
        for job in copies_of.pop(src, []):
            try:
                copy_run(src, job.folder)
                log(f"{job.label}: the same run as {src}, copied")
            except (InputError, OSError) as e:  # its source failed (recorded) or cannot be read
                runner.failures.append((job.label, f"the same run as {src}, which has no result: {e}"))
            released += matched(job.folder)
        return released

    def release(job: Job) -> list[Job]:
        """After a run: its copies and the baselines matched to it; after a seed's last
        pilot: its constants, then the methods planned from them."""
        released = copy(job.folder) + matched(job.folder)
        if job.group is None:
            return released
        left[job.group] -= 1
        if left[job.group]:
            return released
        key, seed = job.group
        try:
            found = _constants(settings[key], seed, rules[key])
        except InputError as e:  # the planning methods of this seed fail; the others still run
            runner.failures.append((f"constants {key} seed {seed}", str(e)))
            log(f"FAILED constants {key} seed {seed}: {e}")
            return released
        for j in waiting.get(job.group, []):
            j.cfg.planner.constants = ConstantsConfig(**found["constants"], source="pilots",
                                                      planning_time_s=found["planning_time_s"])
        return released + waiting.get(job.group, [])

    n_methods = len(methods) + sum(map(len, waiting.values())) + sum(map(len, after_run.values()))
    log(f"{len(pilots)} pilot run(s), {n_methods} method run(s)"
        + (f", {len(copies)} more the same as one of them or as a finished run" if copies else ""))
    for src in [p for p in copies_of if p not in {j.folder for j in methods}]:
        methods += copy(src)  # finished runs of an earlier call
    queued = {j.folder for j in methods} | {j.folder for js in [*waiting.values(), *copies_of.values()] for j in js}
    for folder in [f for f in after_run if f not in queued]:  # matched to a run this call does not make
        if (folder / "result.json").exists():
            methods += matched(folder)
        else:
            labels = ", ".join(j.label for j in after_run[folder])
            raise InputError(f"{labels}: matched to the run {folder}, which has not finished and is not "
                             "chosen (--methods): run its method too")
    runner.run(pilots + methods, release)
    summaries = _write_summaries(plan, rules, out, runner.failures, log)
    _raise_failures(runner)
    return summaries


def _write_summaries(plan: list, rules: dict, out: Path, failures: list[tuple[str, str]],
                     log: Callable[[str], None]) -> dict:
    """report.report per study (and variant) that has runs, then the overview of OUT."""
    from .report import MEAN, report
    from .report.overview import write_overview

    summaries = {}
    for spec, vname, st, root in plan:
        if root.exists():
            rule = rules[st.key]
            target = {**rule["targets"], **({MEAN: rule["mean_target"]} if "mean_target" in rule else {})}
            name = _study_label(spec.name, vname)
            failed = [_failure_line(label, msg) for label, msg in failures
                      if label.startswith(name + " ") or label.startswith(f"constants {st.key} ")]
            first = method_entries(spec)[0]
            ran = any((root / first.label).glob("*/metrics.jsonl"))
            focus = _group_label(spec, first) if ran else None  # None: it failed in every seed
            summaries[name] = report([root], target=target, baseline=None, focus=focus, failed=failed,
                                     at_s=_accuracy_times(st, rule))
    overview = write_overview(out)  # every study under OUT, not only this call's
    if overview is not None:
        log(f"overview of the studies under {out}: {overview}")
    return summaries


def _same_runs(jobs: list[Job], out: Path) -> tuple[list[Job], list[tuple[Job, Path]]]:
    """Jobs whose config trains exactly the run of another job or of a finished run under
    `out` (the online and state-of-the-art studies share `proposed` and `fslora` on one
    setting): (jobs to run, [(job, folder to copy once it has finished)]). Every run is
    deterministic in its config and seed, so the copy is what a second run would write."""
    def key(text: str) -> str:
        return json.dumps(training_view(text), sort_keys=True, default=str)

    source: dict[str, Path] = {}
    for res in sorted(out.rglob("result.json")):
        folder = res.parent
        if (folder / "config.yaml").exists() and not (folder / "same_run_as.txt").exists():
            source.setdefault(key((folder / "config.yaml").read_text()), folder)
    run, copies = [], []
    for j in jobs:
        text = dump_config(j.cfg)
        k = key(text)
        if run_status(j.folder, text) in ("new", "restart") and source.get(k, j.folder) != j.folder:
            copies.append((j, source[k]))
        else:
            source.setdefault(k, j.folder)
            run.append(j)
    return run, copies


def _rule_fields(spec: StudySpec) -> tuple:
    return (spec.reference, spec.target_fraction, spec.min_gain, spec.targets, spec.rounds_cap, spec.time_cap)


def method_entries(spec: StudySpec) -> list[MethodEntry]:
    return [MethodEntry(label=m, method=m) if isinstance(m, str) else m for m in spec.methods]


def entry_config(cfg: RunConfig, entry: MethodEntry) -> RunConfig:
    """The setting's config with the entry's method and overrides."""
    from .config import apply_overrides

    raw = apply_overrides(cfg.model_dump(mode="json"), list(entry.overrides) + [f"method={entry.method}"])
    return validate(raw, f"method '{entry.label}'")


def _accuracy_times(st: Setting, rule: dict) -> list[float]:
    """When the summaries read every method's mean accuracy: at half the time the reference
    took to the mean target and at that time (none without a mean target). Paired by seed,
    such a reading resolves differences that a time to a target on the curve's flat part
    does not (a first crossing there moves by rounds on noise of one evaluation)."""
    if "mean_target" not in rule:
        return []
    t = time_to_target(read_rows(st.folder / "reference"), rule["mean_target"])
    return [] if t is None else [round(0.5 * t), round(t)]


def _matched_entry(spec: StudySpec, cfg: RunConfig) -> str | None:
    """The label of the study's entry whose runs a sampling baseline matches: the entry
    named by `sampling.match`, unless the config gives `expected_participants` or the study
    has no such entry (then the baseline matches that method's starting plan)."""
    from .methods import METHODS

    if not METHODS[cfg.method].matches_participation or cfg.sampling.expected_participants is not None:
        return None
    return next((e.label for e in method_entries(spec) if e.label == cfg.sampling.match), None)


def _mean_participants(folder: Path) -> float:
    """A finished run's mean participants per round (its rounds 1, 2, ...)."""
    if not (folder / "result.json").exists():
        raise InputError(f"{folder}: the run did not finish")
    counts = [len(r["participants"]) for r in read_rows(folder) if r["round"] >= 1]
    if not counts:
        raise InputError(f"{folder}: the run has no rounds")
    return float(sum(counts)) / len(counts)


def _uses_pilots(cfg: RunConfig) -> bool:
    from .methods import METHODS

    return bool(METHODS[cfg.method].needs_constants) and cfg.planner.constants == "pilots"


def _group_label(spec: StudySpec, entry: MethodEntry) -> str:
    """The label report.group_runs gives the entry's runs: the method's name, or method@label
    when the study runs that method in several entries (several configs)."""
    same = [e for e in method_entries(spec) if e.method == entry.method]
    return entry.method if len(same) == 1 else f"{entry.method}@{entry.label}"


def _constants(st: Setting, seed: int, rule: dict) -> dict:
    from .pilot import constants_report, pilot_config
    from .planner import PilotObservation

    folder = st.folder / "pilot" / f"seed{seed}"
    saved = folder / "constants.json"
    if not folder.is_dir():
        raise InputError(f"{folder}: no pilot runs (they failed to start)")
    if saved.exists() and "planning_time_s" in (found := json.loads(saved.read_text())):
        return found
    obs, runs = [], []
    for run_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not (run_dir / "result.json").exists():
            raise InputError(f"{run_dir}: pilot run did not finish")
        res = json.loads((run_dir / "result.json").read_text())
        cfg = validate(yaml.safe_load((run_dir / "config.yaml").read_text()), str(run_dir / "config.yaml"))
        if res["stop_reason"] != "stop_when":
            raise InputError(f"{run_dir}: pilot did not reach the pilot loss {rule['pilot_loss']:.4f} within "
                             f"{cfg.train.rounds} rounds")
        q, s = float(cfg.sampling.participation_prob), float(cfg.sketch.ratio)
        obs.append(PilotObservation(participation_prob=q, sketch_ratio=s, rounds=float(res["rounds"])))
        runs.append({"participation_prob": q, "sketch_ratio": s, "rounds": res["rounds"], "folder": run_dir.name,
                     "sim_time_s": res["sim_time_s"]})
    clients = json.loads((run_dir / "clients.json").read_text())  # same partition in every pilot of a seed
    report = constants_report(obs, [row["data_share"] for row in clients], runs, str(folder),
                              fit=pilot_config(st.cfg).fit)
    report["pilot_loss"] = rule["pilot_loss"]
    # what a user waits for before the planned run: the pilots, and the reference run that set their loss
    report["pilot_time_s"] = float(sum(r["sim_time_s"] for r in runs))
    report["reference_sim_time_s"] = rule["reference_sim_time_s"]
    report["planning_time_s"] = report["pilot_time_s"] + rule["reference_sim_time_s"]
    _write_json(saved, report)
    return report


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=1))


def _study_label(name: str, variant: str | None) -> str:
    return f"{name}/{variant}" if variant else name


def _failure_line(label: str, msg: str) -> str:
    return f"{label}: {msg.splitlines()[-1] if msg else ''}"


def _raise_failures(runner: Runner) -> None:
    if runner.failures:
        lines = "\n".join(f"  {_failure_line(label, msg)}" for label, msg in runner.failures)
        raise RuntimeError(f"{len(runner.failures)} run(s) failed:\n{lines}")


__all__ = ["StudySpec", "load_study", "run_studies", "setting_key", "targets_from_reference",
           "pilot_loss_from_reference"]
