"""Pilot runs that estimate the bound constants (alpha, beta, gamma, delta) (docs/theory.md section 5).

`planner.constants: pilots`. Each pilot is a real, short run of Algorithm 1 (method `manual`)
with one uniform (q, s) for every client, stopped at a pilot loss or accuracy; the rounds it
took, with X = sum p^2/q and Y = sum p^2/(q s), give one row of the seed's 4x4 system, solved
by SVD in `planner.estimate_constants`. Pilot folders are ordinary run folders (resumable;
finished ones are reused). constants.json records the config it belongs to (a hash) and the
pilots' simulated time, which a planned run counts as planning time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import ConstantsConfig, InputError, PilotConfig, RunConfig, training_dump
from .planner import (BoundConstants, ConstantEstimationError, PilotObservation, estimate_constants,
                      fit_constants_constrained, rounds_factor)

LOSS_WINDOW = 3  # rounds averaged before comparing train loss with the pilot target


def pilot_config(cfg: RunConfig) -> PilotConfig:
    return cfg.planner.pilot


def pilot_key(cfg: RunConfig) -> str:
    """What a pilot folder belongs to: the config without the planned method's own knobs
    (method, targets, time cap, planner switch) and without what is only recorded (track)."""
    c = cfg.model_copy(deep=True)
    c.method = "manual"
    c.train.target_accuracy, c.train.max_sim_time_s = None, None
    c.planner.constants = "pilots"
    return hashlib.sha256(training_dump(c).encode()).hexdigest()[:12]


def loss_key(rows: list[dict]) -> str:
    """'probe_loss' when the rows measure it (eval.probe_examples), else 'train_loss'."""
    return "probe_loss" if any(r.get("probe_loss") is not None for r in rows) else "train_loss"


def loss_reached(rows: list[dict], target_loss: float) -> bool:
    """Mean loss (probe loss if measured, else the participants' train loss) over the last
    LOSS_WINDOW rounds with one is at or below the target."""
    key = loss_key(rows)
    losses = [r[key] for r in rows if r.get("round", 1) > 0 and r.get(key) is not None]
    return len(losses) >= LOSS_WINDOW and sum(losses[-LOSS_WINDOW:]) / LOSS_WINDOW <= target_loss


def check_planner_inputs(cfg: RunConfig) -> None:
    """Cheap checks before anything is written: with `planner.constants: pilots`, a usable
    pilot setup (online planning and given numbers need nothing)."""
    if cfg.planner.constants != "pilots":
        return
    pc = pilot_config(cfg)
    if pc.target_loss is None and pc.target_accuracy is None:
        raise InputError("planner.pilot: give target_loss or target_accuracy (the pilot runs stop there)")
    if len(pc.settings) < 4:
        raise InputError(f"planner.pilot.settings: {len(pc.settings)} settings; 4 or more are needed")


def pilot_run_config(cfg: RunConfig, q: float, s: float, pc: PilotConfig) -> RunConfig:
    """The config of one pilot: Algorithm 1 (`manual`) with one uniform (q, s), pilot stopping rule."""
    pcfg = cfg.model_copy(deep=True)
    pcfg.method = "manual"
    pcfg.sampling.participation_prob = float(q)
    pcfg.sketch.ratio = float(s)
    pcfg.train.rounds = pc.max_rounds
    pcfg.train.target_accuracy = pc.target_accuracy
    pcfg.train.max_sim_time_s = None
    pcfg.planner.constants = "online"  # unused by `manual`; keeps the pilot configs free of the switch
    pcfg.eval.probe_examples = pc.probe_examples
    if pc.target_accuracy is None:  # stopped by loss: periodic evaluations would only cost time
        pcfg.eval.every, pcfg.eval.every_s = pc.max_rounds, None
    return pcfg


def run_pilots(cfg: RunConfig, out: Path, *, setup=None, progress: bool = True, log=print) -> dict:
    """Run the pilot settings into out/<k>_q<q>_s<s>/, estimate the constants, write
    out/constants.json and return it. Raises InputError with the reason when it cannot."""
    from . import loop
    from .setup import build_setup

    pc = pilot_config(cfg)
    check_planner_inputs(cfg.model_copy(update={"planner": cfg.planner.model_copy(update={"constants": "pilots"})}))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    setup = setup or build_setup(cfg)
    observations, runs = [], []
    for k, (q, s) in enumerate(pc.settings):
        pcfg = pilot_run_config(cfg, q, s, pc)
        folder = out / f"{k}_q{q:g}_s{s:g}"
        stop = (lambda rows: loss_reached(rows, pc.target_loss)) if pc.target_loss is not None else None
        log(f"pilot {k + 1}/{len(pc.settings)}: q={q:g} s={s:g} -> {folder}")
        result = loop.run(pcfg, folder, resume=folder.exists(), setup=setup, progress=progress, stop_when=stop)
        if result["stop_reason"] not in ("target_accuracy", "stop_when"):
            raise InputError(f"planner.pilot: pilot q={q:g} s={s:g} did not reach the pilot target within "
                             f"{pc.max_rounds} rounds (planner.pilot.max_rounds); raise it or ease the target")
        observations.append(PilotObservation(participation_prob=float(q), sketch_ratio=float(s),
                                             rounds=float(result["rounds"])))
        runs.append({"participation_prob": q, "sketch_ratio": s, "rounds": result["rounds"], "folder": str(folder),
                     "sim_time_s": result["sim_time_s"]})
    report = constants_report(observations, setup.data_share, runs, "planner.pilot", fit=pc.fit)
    report["config_key"] = pilot_key(cfg)
    report["planning_time_s"] = float(sum(r["sim_time_s"] for r in runs))
    from .rundir import write_atomic

    write_atomic(out / "constants.json", json.dumps(report, indent=1))
    return report


def constants_report(observations: list[PilotObservation], data_share, runs: list[dict], where: str,
                     fit: str = "svd") -> dict:
    """Estimate the constants from the pilots' rounds: the constants.json content, with the
    rounds the constants predict for each pilot. `fit` as planner.pilot.fit. Raises
    InputError (prefixed with `where`) when the chosen fit cannot give positive constants."""
    import numpy as np

    report: dict = {}
    consts = None
    if fit in ("svd", "svd_else_constrained"):
        try:
            est = estimate_constants(observations, data_share)
            consts = est.constants
            report.update(fit="svd", condition_number=est.condition_number, residual=est.residual,
                          singular_values=[float(x) for x in est.singular_values])
        except ConstantEstimationError as e:
            if fit == "svd":
                raise InputError(f"{where}: {e}") from None
            report["svd_rejected"] = str(e)
    if consts is None:
        try:
            consts, rms = fit_constants_constrained(observations, data_share)
        except ConstantEstimationError as e:
            raise InputError(f"{where}: {e}") from None
        report.update(fit="constrained", rms_relative_residual=rms)
    n = len(np.asarray(data_share))
    for run, o in zip(runs, observations):
        run["predicted_rounds"] = rounds_factor(np.full(n, o.participation_prob), np.full(n, o.sketch_ratio),
                                                data_share, consts)
    return {"constants": consts.to_dict(), **report, "pilots": runs}


def resolve_constants(cfg: RunConfig, out: Path, *, setup=None,
                      progress: bool = True) -> tuple[BoundConstants | None, float]:
    """(constants, planning time in simulated seconds spent to get them) before a run:
    (None, 0) for online planning; the given numbers and their recorded cost; or the
    constants of pilot runs in out/pilot (run now, or reused when constants.json belongs to
    this config; one that belongs to another config is refused)."""
    check_planner_inputs(cfg)
    given = cfg.planner.constants
    if given == "online":
        return None, 0.0
    if isinstance(given, ConstantsConfig):
        from .setup import constants_from_config

        return constants_from_config(cfg), given.planning_time_s
    saved = Path(out) / "pilot" / "constants.json"
    if saved.exists():
        report = json.loads(saved.read_text())
        if report.get("config_key") != pilot_key(cfg):
            raise InputError(f"{saved}: pilot constants of another config (key {report.get('config_key')}, this "
                             f"config {pilot_key(cfg)}); remove {saved.parent} to run new pilots or use another -o")
    else:
        report = run_pilots(cfg, Path(out) / "pilot", setup=setup, progress=progress)
    return BoundConstants(**report["constants"]), float(report["planning_time_s"])
