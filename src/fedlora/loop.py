"""The round loop on a simulated wireless clock, with atomic checkpoints and resume: one
loop for every way of running clients.

Every round: the method configures its client jobs; an executor runs them (in this process,
`InProcessExecutor`, or on Flower nodes, fedlora.flower.strategy.FlowerExecutor) and returns
the payloads; the method aggregates; the loop applies what the aggregation returns (new
state, a merge into the base weights, server time) and the clock adds what the round would
have cost on the network (download, the slowest of compute + upload under the bandwidth
allocation, server work). Real CPU time is reported beside it, never mixed in.

Constants for a planned method are resolved before the loop starts, by the `planning`
callable the caller passes (fedlora.simulate passes fedlora.pilot.resolve_constants).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import InputError, RunConfig, dump_config, validate
from .methods import get_method
from .methods.base import (ClientJob, Method, Payload, client_payload, compute_model, factors_payload, payload_values,
                           split_payload)
from .model import Engine
from .rundir import (load_checkpoint, read_rows, same_training, save_checkpoint, target_reached, time_to_target,
                     write_atomic)
from .data import subsample
from .setup import Setup, build_setup, clients_json, derived_seed, local_train
from .streams import STREAM_FADING, STREAM_INIT, STREAM_PROBE, training_entropy
from .system import downlink_time_s, equal_finish_allocation, equal_split_allocation, rayleigh_fading
from .tracking import RunLog


# ------------------------------------------------------------------ loop


class RoundClock:
    """Simulated seconds of one round: download + (compute, upload) under the allocation + server."""

    def __init__(self, setup: Setup):
        cfg = setup.cfg
        self.cfg = cfg
        self.compute_model = compute_model(cfg)
        self.compute_time_s = np.array([p.compute_time_s for p in setup.profiles])
        self.eff = np.array([p.bits_per_s_per_hz for p in setup.profiles])
        self.allocate = equal_finish_allocation if cfg.system.allocation == "equal_finish" else equal_split_allocation

    def round_time(self, round_idx: int, ids: list[int], ratios: list[float], upload_bits: list[float],
                   broadcast_bits: float, unicast_bits: list[float], server_s: float) -> dict:
        sys = self.cfg.system
        eff = self.eff[ids]
        if sys.profiles.fading and ids:
            rng = np.random.default_rng([*training_entropy(self.cfg), STREAM_FADING, round_idx])
            eff = rayleigh_fading(rng, self.eff, 2.0 ** self.eff - 1.0)[ids]
        t_cp = self.compute_model.time_s(self.compute_time_s[ids], np.asarray(ratios))
        t_cm = np.asarray(upload_bits) / eff
        if ids:
            t_train, _ = self.allocate(np.asarray(t_cp, float), t_cm, sys.bandwidth_hz)
        else:
            t_train = 0.0
        eff_dl = eff if sys.downlink_bits_per_s_per_hz is None else np.full(len(ids), sys.downlink_bits_per_s_per_hz)
        download_s = downlink_time_s(broadcast_bits, unicast_bits, eff_dl, sys.downlink_band_hz)
        return {"round_time_s": float(download_s + t_train + server_s), "download_time_s": float(download_s),
                "train_upload_time_s": float(t_train), "server_time_s": float(server_s),
                "max_compute_time_s": float(np.max(t_cp)) if ids else 0.0}


def evaluate(setup: Setup, state, questions) -> tuple[dict[str, float], float]:
    acc = setup.engine.evaluate(state, scaling=setup.cfg.lora.alpha / setup.cfg.lora.rank,
                                questions=questions, batch_size=setup.cfg.eval.batch_size)
    return acc, float(np.mean(list(acc.values())))


def probe_loss(setup: Setup, state) -> float | None:
    """Loss of the global model on eval.probe_examples training questions (None when off)."""
    n = setup.cfg.eval.probe_examples
    if n is None:
        return None
    idx = subsample(len(setup.train), n, seed=derived_seed(setup.cfg.seed, STREAM_PROBE))
    return setup.engine.mean_loss(state, scaling=setup.cfg.lora.alpha / setup.cfg.lora.rank,
                                  questions=[setup.train[i] for i in idx], batch_size=setup.cfg.eval.batch_size)


def prepare_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if resume:
            return
        if not overwrite:
            raise InputError(f"{out}: run folder exists; use --resume to continue it or --overwrite to replace it")
        shutil.rmtree(out)
    elif resume:
        raise InputError(f"{out}: nothing to resume (no run folder)")
    out.mkdir(parents=True, exist_ok=True)


def start_run_folder(setup: Setup, method: Method, out: Path, pre_run_planning_s: float = 0.0):
    """Fresh run folder: config, clients, data, plan, round-0 eval row, first checkpoint.
    `pre_run_planning_s`: simulated seconds spent planning before round 1 (pilot runs).
    Returns (initial adapter state, progress dict)."""
    cfg = setup.cfg
    write_atomic(out / "config.yaml", dump_config(cfg))
    write_atomic(out / "clients.json", json.dumps(clients_json(setup), indent=1))
    write_atomic(out / "data.json", json.dumps(setup.data_report, indent=1))
    plan = method.plan()
    if plan is not None:
        write_atomic(out / "plan.json", json.dumps(plan, indent=1))
    setup.engine.load_base_delta({})  # a shared engine may carry another run's merges
    state = setup.engine.init_state(derived_seed(*training_entropy(cfg), STREAM_INIT))
    acc, mean = evaluate(setup, state, setup.eval_questions)
    row0 = {"round": 0, "sim_time_s": 0.0, "round_time_s": 0.0, "participants": [], "upload_bytes": 0,
            "download_bytes": 0, "train_loss": None, "eval": acc, "eval_mean": mean}
    if cfg.eval.probe_examples is not None:
        row0["probe_loss"] = probe_loss(setup, state)
    write_atomic(out / "metrics.jsonl", json.dumps(row0) + "\n")
    prog = {"next_round": 1, "sim_time_s": 0.0, "cpu_time_s": 0.0, "stop_reason": None,
            "upload_bytes": 0, "download_bytes": 0, "pre_run_planning_s": float(pre_run_planning_s),
            "planning_time_s": 0.0}
    if target_reached(cfg.train.target_accuracy, acc, mean):
        prog["stop_reason"] = "target_accuracy"
    checkpoint(out, state, method, setup.engine, prog)
    return state, prog


def eval_due(cfg: RunConfig, t: int, before_s: float, after_s: float) -> bool:
    """Evaluate after round t (which moved the clock from before_s to after_s)? Every
    eval.every rounds, or (eval.every_s) when the round crossed a multiple of every_s; always
    after the last round and the round that reaches max_sim_time_s."""
    if t == cfg.train.rounds or (cfg.train.max_sim_time_s is not None and after_s >= cfg.train.max_sim_time_s):
        return True
    if cfg.eval.every_s is not None:
        return math.floor(after_s / cfg.eval.every_s) > math.floor(before_s / cfg.eval.every_s)
    return t % cfg.eval.every == 0




# ------------------------------------------------------------------ executors


@dataclass
class ClientReplies:
    """What came back from one round's client jobs."""

    payloads: dict[int, Payload]  # accepted updates
    losses: list[float]  # mean local loss of each accepted update, in job order
    upload_bits: dict[int, float]  # bits of every reply that arrived (accepted or rejected)
    rejected: list[int]  # replies refused (non-finite, malformed): recorded, the run goes on
    missing: list[int] | None = None  # jobs with no reply (counted as not sampled); None: cannot happen


class Executor:
    """Runs a round's client jobs: `train(round, jobs) -> ClientReplies`."""

    def train(self, round_idx: int, jobs: dict[int, ClientJob]) -> ClientReplies:
        raise NotImplementedError

    def round_done(self, row: dict) -> None:
        """Called with each round's metrics row after it is committed."""

    def result_extra(self) -> dict:
        """Fields this executor adds to result.json."""
        return {}


class InProcessExecutor(Executor):
    """Every client trains in this process on the shared base model, one after the other."""

    def __init__(self, setup: Setup):
        self.setup = setup

    def train(self, round_idx: int, jobs: dict[int, ClientJob]) -> ClientReplies:
        bits_per_value = self.setup.cfg.system.bytes_per_value * 8
        replies = ClientReplies(payloads={}, losses=[], upload_bits={}, rejected=[])
        for i, job in jobs.items():
            res = local_train(self.setup, job, round_idx)
            payload = client_payload(job, res.state)
            replies.upload_bits[i] = payload_values(payload) * bits_per_value
            if res.finite and all(bool(torch.isfinite(v).all()) for v in payload.values()):
                replies.payloads[i] = payload
                replies.losses.append(float(np.mean(res.losses)))
            else:
                replies.rejected.append(i)  # NaN/inf update: dropped, recorded, the run goes on
        return replies


# ------------------------------------------------------------------ one round


def close_round(setup: Setup, method: Method, clock: RoundClock, prog: dict, t: int, state, rc,
                jobs: dict[int, ClientJob], replies: ClientReplies) -> tuple[object, dict]:
    """Aggregate, apply what the method returned, advance the simulated clock and evaluate.

    `jobs` are the round's participants (client id -> job; missing replies left out).
    Returns (new state, metrics row without cpu_time_s); updates `prog` in place."""
    cfg = setup.cfg
    agg = method.aggregate(t, state, jobs, replies.payloads)
    if agg.base_merge:
        setup.engine.merge_into_base(agg.base_merge)
    ids = sorted(jobs)
    bits = cfg.system.bytes_per_value * 8
    times = clock.round_time(t, ids, [jobs[i].compute_ratio for i in ids], [replies.upload_bits[i] for i in ids],
                             rc.broadcast_values * bits if ids else 0.0, [jobs[i].unicast_values * bits for i in ids],
                             rc.server_s + agg.server_s)
    download_values = (rc.broadcast_values if ids else 0) + sum(j.unicast_values for j in jobs.values())
    before_s = prog["sim_time_s"]
    prog["sim_time_s"] += times["round_time_s"]
    up, down = int(sum(replies.upload_bits[i] for i in ids) // 8), int(download_values * cfg.system.bytes_per_value)
    prog["upload_bytes"] += up
    prog["download_bytes"] += down
    prog["planning_time_s"] = prog.get("planning_time_s", 0.0) + float(rc.info.get("planning_time_s", 0.0))
    row = {"round": t, "sim_time_s": prog["sim_time_s"], **times, "participants": ids, "upload_bytes": up,
           "download_bytes": down, "train_loss": float(np.mean(replies.losses)) if replies.losses else None,
           "rejected": replies.rejected, **({} if replies.missing is None else {"missing": replies.missing}),
           **rc.info}
    if cfg.eval.probe_examples is not None:
        row["probe_loss"] = probe_loss(setup, agg.state)
    if eval_due(cfg, t, before_s, prog["sim_time_s"]):
        row["eval"], row["eval_mean"] = evaluate(setup, agg.state, setup.eval_questions)
    return agg.state, row


def stop_reason(cfg: RunConfig, prog: dict, t: int, rows: list[dict], stop_when=None) -> str | None:
    """Why the run stops after round t (None: it goes on); rows ends with round t's row."""
    row = rows[-1]
    if "eval" in row and target_reached(cfg.train.target_accuracy, row["eval"], row["eval_mean"]):
        return "target_accuracy"
    limit = limit_reached(cfg, t, prog["sim_time_s"])
    if limit == "max_sim_time":
        return limit
    if stop_when is not None and stop_when(rows):
        return "stop_when"
    return limit


def limit_reached(cfg: RunConfig, rounds_done: int, sim_time_s: float) -> str | None:
    """The limit the run has used up (its simulated time first), None while neither is."""
    t = cfg.train
    if t.max_sim_time_s is not None and sim_time_s >= t.max_sim_time_s:
        return "max_sim_time"
    return "max_rounds" if rounds_done >= t.rounds else None


def commit_round(out: Path, metrics, row: dict, state, method: Method, engine: Engine, prog: dict) -> None:
    """Append the round's row to the open metrics.jsonl and checkpoint after it."""
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()
    prog["next_round"] = row["round"] + 1
    checkpoint(out, state, method, engine, prog)


def checkpoint(out: Path, state, method: Method, engine: Engine, prog: dict) -> None:
    """The loop's state after a round: adapter, method state, merged base delta, progress."""
    adapter = {k: v.contiguous() for k, v in factors_payload(state).items()}
    save_checkpoint(out, adapter=adapter, method_state=method.state_dict(), base_delta=engine.base_delta(),
                    progress=prog)


# ------------------------------------------------------------------ a run


def run(cfg: RunConfig, out: Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        setup: Setup | None = None, stop_when=None, executor: Executor | None = None, planning=None) -> dict:
    """Run one method on a config into the run folder `out`; returns the result dict.

    `stop_when(rows)` (optional) ends the run after a round when it returns True (pilots).
    `executor`: who trains the clients (default: in process). `planning(cfg, out, setup=,
    progress=) -> (constants, simulated seconds spent)` resolves a planned method's constants
    before the loop (required for methods with `needs_constants`)."""
    method_cls = get_method(cfg.method)
    out = Path(out)
    extending = False
    if resume and (out / "config.yaml").exists():
        saved = (out / "config.yaml").read_text()
        if not same_training(saved, dump_config(cfg)):
            extending = check_extension(out, saved, cfg)  # more rounds or time: continue; else refused
    if setup is None:
        setup = build_setup(cfg)  # validates data, model and profiles before touching `out`
    elif setup.cfg is not cfg:  # a shared setup (compare, pilots): same data and model, this run's knobs
        setup = dataclasses.replace(setup, cfg=cfg)
    prepare_out(out, resume=resume, overwrite=overwrite)
    if (out / "result.json").exists() and resume and not extending:
        return json.loads((out / "result.json").read_text())
    method, pre_run_s = make_method(method_cls, setup, out, planning, resume=resume, progress=progress)
    if extending:  # result.json first: a crash in between leaves a resumable run
        (out / "result.json").unlink(missing_ok=True)
        write_atomic(out / "config.yaml", dump_config(cfg))
    state, prog = restore(setup, method, out, pre_run_s) if resume else start_run_folder(setup, method, out,
                                                                                          pre_run_s)
    executor = executor or InProcessExecutor(setup)
    state = run_rounds(setup, method, out, executor, state, prog, progress=progress, stop_when=stop_when)
    return finish(setup, method, out, state, prog, extra=executor.result_extra())


def make_method(method_cls, setup: Setup, out: Path, planning, *, resume: bool, progress: bool):
    """(the method, simulated seconds of planning before round 1): constants first, then the
    method, which plans in its constructor (and may refuse: infeasible constants, bad options)."""
    ctx = setup.method_context()
    pre_run_s = 0.0
    if method_cls.needs_constants:
        if planning is None:
            raise TypeError(f"method {method_cls.name} needs planner constants: pass planning=")
        ctx.constants, pre_run_s = planning(setup.cfg, out, setup=setup, progress=progress)
    try:
        return method_cls(ctx), pre_run_s
    except Exception:
        if not resume and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a method that cannot start leaves no empty run folder behind
        raise


def restore(setup: Setup, method: Method, out: Path, pre_run_s: float):
    """(state, progress) from the last checkpoint; a fresh start when there is none."""
    ckpt = load_checkpoint(out)
    if ckpt is None:
        return start_run_folder(setup, method, out, pre_run_s)
    adapter, method_state, base_delta, prog = ckpt
    if prog["stop_reason"] in ("max_rounds", "max_sim_time") and \
            limit_reached(setup.cfg, prog["next_round"] - 1, prog["sim_time_s"]) is None:
        prog["stop_reason"] = None  # an extended run: its limit grew
    method.load_state_dict(method_state)
    setup.engine.load_base_delta(base_delta)  # also clears merges a shared engine may carry
    # drop metric rows written after the checkpoint (a crash between row and checkpoint)
    rows = read_rows(out, before_round=prog["next_round"])
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return split_payload(adapter), prog


def run_rounds(setup: Setup, method: Method, out: Path, executor: Executor, state, prog: dict, *,
               progress: bool = True, stop_when=None):
    """The loop: configure, train (executor), aggregate and clock, commit (metrics.jsonl, the
    checkpoint, TensorBoard); until a stop rule."""
    cfg = setup.cfg
    clock = RoundClock(setup)
    bar = _progress(cfg.train.rounds, prog["next_round"] - 1, enabled=progress)
    history = read_rows(out) if stop_when else []
    last_eval = None
    track = RunLog(out, enabled=cfg.track.tensorboard, first_round=prog["next_round"])
    if prog["next_round"] == 1:  # round 0: the evaluation before training, and the starting plan
        track.row(read_rows(out)[0], prog, plan=method.plan())
    try:
        with open(out / "metrics.jsonl", "a") as metrics:
            t = prog["next_round"]
            while prog["stop_reason"] is None and t <= cfg.train.rounds:
                cpu0 = time.perf_counter()
                rc = method.configure_round(t, state)
                jobs = {j.client_id: j for j in rc.jobs}
                replies = executor.train(t, jobs)
                part = {i: j for i, j in jobs.items() if i not in (replies.missing or [])}
                state, row = close_round(setup, method, clock, prog, t, state, rc, part, replies)
                if stop_when is not None:
                    history.append(row)
                prog["stop_reason"] = stop_reason(cfg, prog, t, history if stop_when else [row], stop_when)
                row["cpu_time_s"] = time.perf_counter() - cpu0
                prog["cpu_time_s"] += row["cpu_time_s"]
                commit_round(out, metrics, row, state, method, setup.engine, prog)
                track.row(row, prog)
                executor.round_done(row)
                last_eval = row.get("eval_mean", last_eval)
                bar.update(1)
                bar.set_postfix(sim=f"{prog['sim_time_s']:.0f}s", loss=_fmt(row["train_loss"]), acc=_fmt(last_eval))
                t += 1
    finally:
        track.close()
    bar.close()
    if prog["stop_reason"] is None:
        prog["stop_reason"] = "max_rounds"
    return state


def check_extension(out: Path, saved: str, cfg: RunConfig) -> bool:
    """True when a resume's config differs from the saved one only by a larger train.rounds or
    train.max_sim_time_s (None: no limit): the run continues from its last checkpoint, as a
    training library's resume with more epochs would. Any other difference is refused. A run
    that stopped on its target stays stopped."""
    import yaml

    from .rundir import first_difference

    old = validate(yaml.safe_load(saved), str(out / "config.yaml"))
    t_old, t_new = old.train, cfg.train
    same = old.model_copy(update={"train": t_old.model_copy(update={"rounds": t_new.rounds,
                                                                    "max_sim_time_s": t_new.max_sim_time_s})})
    longer = t_new.rounds >= t_old.rounds and (t_new.max_sim_time_s is None or (
        t_old.max_sim_time_s is not None and t_new.max_sim_time_s >= t_old.max_sim_time_s))
    if not same_training(dump_config(same), dump_config(cfg)) or not longer:
        raise InputError(f"{out}/config.yaml: differs from the given config "
                         f"({first_difference(out / 'config.yaml', dump_config(cfg))}); resume needs the same "
                         "config, or only a larger train.rounds / train.max_sim_time_s")
    return True


def finish(setup: Setup, method: Method, out: Path, state, prog: dict, extra: dict | None = None) -> dict:
    """Final evaluation, adapter/, the final plan.json and result.json (with `extra` fields)."""
    cfg = setup.cfg
    rows = read_rows(out)
    if setup.final_questions == setup.eval_questions and isinstance(rows[-1].get("eval"), dict):
        acc, mean = rows[-1]["eval"], rows[-1]["eval_mean"]  # the last round scored these questions on this state
    else:
        acc, mean = evaluate(setup, state, setup.final_questions)
    adapter_tmp = out / "adapter.tmp"
    shutil.rmtree(adapter_tmp, ignore_errors=True)
    setup.engine.save_peft_adapter(method.export_state(state), cfg.lora.alpha, adapter_tmp)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    os.replace(adapter_tmp, out / "adapter")
    plan = method.plan()
    if plan is not None:  # the plan the run ended with (online planning changes it between rounds)
        write_atomic(out / "plan.json", json.dumps(plan, indent=1))
    pre = float(prog.get("pre_run_planning_s", 0.0))
    ttt = time_to_target(rows, cfg.train.target_accuracy)
    result = {"method": cfg.method, "seed": cfg.seed, "stop_reason": prog["stop_reason"],
              "rounds": rows[-1]["round"], "sim_time_s": prog["sim_time_s"], "cpu_time_s": prog["cpu_time_s"],
              "upload_bytes": prog["upload_bytes"], "download_bytes": prog["download_bytes"],
              "final_eval": acc, "final_eval_mean": mean,
              "final_eval_examples": len(setup.final_questions),
              # planning: before round 1 (pilots) + on the clock during the run (planner calls)
              "pre_run_planning_s": pre, "planning_time_s": pre + float(prog.get("planning_time_s", 0.0)),
              "time_to_target_s": ttt,  # on the run's own clock (in-run planning included)
              "total_time_to_target_s": None if ttt is None else pre + ttt,  # what a user waits for
              **(extra or {})}
    write_atomic(out / "result.json", json.dumps(result, indent=1))
    return result


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="round", dynamic_ncols=True)


__all__ = ["ClientReplies", "Executor", "InProcessExecutor", "RoundClock", "run", "close_round", "eval_due"]
