"""The round loop on a simulated wireless clock, with atomic checkpoints and resume.

config -> (data, profiles, method) -> rounds -> run folder. Every round: the method picks
its clients and what they start from; each client trains for real on the shared base
model; the method aggregates; the clock adds what that round would have cost on the
network (broadcast, the slowest of compute + upload under the bandwidth allocation, and
any server work). Real CPU time is reported beside it, never mixed in.

All randomness is counter-based (seed, purpose, round, client), so a resumed run draws
exactly what an uninterrupted one would.
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
from .data import DataError, Question, load_tasks, partition, subsample
from .methods import METHODS, MethodContext, get_method
from .methods.base import Method, payload_values
from .model import Engine, ModelError, ModelSpec
from .sketch import payload_values as rank_payload_values
from .rundir import load_checkpoint, read_rows, save_checkpoint, target_reached, time_to_target, write_atomic
from .system import (ClientProfile, ComputeModel, channel_profiles, downlink_time_s, equal_finish_allocation,
                     equal_split_allocation, generate_profiles, rayleigh_fading)

STREAM_DATA, STREAM_PROFILES, STREAM_EVAL, STREAM_INIT, STREAM_BATCH, STREAM_FADING, STREAM_PROBE = 1, 2, 3, 4, 5, 6, 7


def derived_seed(seed: int, *purpose: int) -> int:
    return int(np.random.SeedSequence([seed, *purpose]).generate_state(1)[0])


# ------------------------------------------------------------------ setup


@dataclass
class Setup:
    """Everything a run needs that does not change from round to round."""

    cfg: RunConfig
    train: list[Question]  # all clients' training questions, concatenated
    client_indices: list[np.ndarray]  # client i owns train[client_indices[i]]
    eval_questions: list[Question]  # fixed periodic-eval subset, every task
    final_questions: list[Question]
    profiles: list[ClientProfile]
    engine: Engine
    data_report: dict

    @property
    def num_samples(self) -> np.ndarray:
        return np.array([len(ix) for ix in self.client_indices])

    @property
    def data_share(self) -> np.ndarray:
        n = self.num_samples
        return n / n.sum()

    @property
    def upload_bits_full(self) -> float:
        """Bits of one full-rank LoRA update of this model (all target modules)."""
        values = rank_payload_values(self.engine.module_shapes, self.cfg.lora.rank)
        return float(values * self.cfg.system.bytes_per_value * 8)

    def method_context(self) -> MethodContext:
        sys = self.cfg.system
        eff = np.array([p.bits_per_s_per_hz for p in self.profiles])
        eff_dl = eff if sys.downlink_bits_per_s_per_hz is None else np.full(eff.size, sys.downlink_bits_per_s_per_hz)
        return MethodContext(
            cfg=self.cfg, data_share=self.data_share,
            compute_time_s=np.array([p.compute_time_s for p in self.profiles]),
            upload_s_hz=self.upload_bits_full / eff,
            download_s=self.upload_bits_full / (sys.downlink_band_hz * eff_dl),  # the broadcast = a full-rank update
            module_shapes=dict(self.engine.module_shapes), engine=self.engine,
            constants=constants_from_config(self.cfg))


def constants_from_config(cfg: RunConfig):
    """BoundConstants when planner.constants gives numbers, else None (online or pilots)."""
    from .config import ConstantsConfig

    c = cfg.planner.constants
    return c.bound_constants() if isinstance(c, ConstantsConfig) else None


def model_spec(cfg: RunConfig) -> ModelSpec:
    return ModelSpec(name_or_path=cfg.model.name_or_path, kind=cfg.model.kind, max_length=cfg.model.max_length,
                     target_modules=tuple(cfg.lora.target_modules) if cfg.lora.target_modules else None,
                     lora_layers=tuple(cfg.lora.layers) if cfg.lora.layers else None,
                     lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, score=cfg.model.score,
                     device=cfg.model.device)


def load_profiles_file(path: str, num_clients: int) -> list[ClientProfile]:
    p = Path(path)
    try:
        records = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: profile file not found (system.profiles.file)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: cannot read profiles ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(records, dict) and "clients" in records:
        records = records["clients"]
    if not isinstance(records, list):
        raise InputError(f"{p}: expected a JSON list of client profiles")
    if len(records) != num_clients:
        raise InputError(f"{p}: {len(records)} profiles for data.num_clients={num_clients}")
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"{p}: profile {i}: expected an object")
        for key in ("compute_time_s", "bits_per_s_per_hz"):
            v = rec.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not np.isfinite(v):
                raise InputError(f"{p}: profile {i}: field '{key}': value {v!r}: must be a positive number")
        extra = {k: v for k, v in rec.items() if k not in ("id", "compute_time_s", "bits_per_s_per_hz")}
        out.append(ClientProfile(id=i, compute_time_s=float(rec["compute_time_s"]),
                                 bits_per_s_per_hz=float(rec["bits_per_s_per_hz"]), extra=extra))
    return out


def make_profiles(cfg: RunConfig, engine: Engine, sample: list[Question]) -> list[ClientProfile]:
    pc, n = cfg.system.profiles, cfg.data.num_clients
    seed = derived_seed(cfg.seed, STREAM_PROFILES)
    if pc.source == "file":
        return load_profiles_file(pc.file, n)
    if pc.source == "generate":
        return generate_profiles(n, seed=seed, compute_time_s=pc.compute_time_s, compute_spread=pc.compute_spread,
                                 bits_per_s_per_hz=pc.bits_per_s_per_hz, link_spread=pc.link_spread,
                                 distribution=pc.distribution)
    flops_per_round = engine.flops_per_step(cfg.train.batch_size, sample) * cfg.train.local_steps
    # SNR is taken at the bandwidth a client would get if the expected participants split B.
    return channel_profiles(n, seed=seed, flops_per_round=flops_per_round,
                            device_flops_median=pc.device_flops_median, device_flops_spread=pc.device_flops_spread,
                            cell_radius_m=pc.cell_radius_m, tx_power_dbm=tuple(pc.tx_power_dbm),
                            noise_dbm_per_hz=pc.noise_dbm_per_hz, shadowing_db=pc.shadowing_db,
                            reference_bandwidth_hz=cfg.system.bandwidth_hz / max(1, n))


def build_setup(cfg: RunConfig) -> Setup:
    """Load data, partition it, build the model and the client profiles. Raises InputError."""
    try:
        tasks = load_tasks(Path(cfg.data.dir) if cfg.data.dir else None, cfg.data.tasks,
                           carve_fraction=cfg.data.carve_fraction)
    except DataError as e:
        raise InputError(str(e)) from None
    if not tasks:
        raise InputError(f"data.dir {cfg.data.dir}: no task folders found")
    train: list[Question] = []
    task_of: list[int] = []
    eval_qs: list[Question] = []
    final_qs: list[Question] = []
    report = {"tasks": {}}
    for t_id, (name, task) in enumerate(tasks.items()):
        keep = subsample(len(task.train), cfg.data.max_train_per_task, seed=derived_seed(cfg.seed, STREAM_DATA, t_id))
        train.extend(task.train[j] for j in keep)
        task_of.extend([t_id] * len(keep))
        ev = subsample(len(task.test), cfg.eval.max_examples, seed=derived_seed(cfg.seed, STREAM_EVAL, t_id))
        fin = subsample(len(task.test), cfg.eval.final_max_examples, seed=derived_seed(cfg.seed, STREAM_EVAL, t_id))
        eval_qs.extend(task.test[j] for j in ev)
        final_qs.extend(task.test[j] for j in fin)
        report["tasks"][name] = {"source": task.source, "train_available": len(task.train), "train_used": len(keep),
                                 "test": len(task.test), "eval_subset": len(ev), "final_eval": len(fin),
                                 "train_carved_from_test": task.train_carved_from_test}
    try:
        clients = partition(np.array(task_of), cfg.data.num_clients, alpha=cfg.data.dirichlet_alpha,
                            seed=derived_seed(cfg.seed, STREAM_DATA), min_samples=cfg.data.min_client_samples)
    except DataError as e:
        raise InputError(f"data: {e}") from None
    names = list(tasks)
    report["clients"] = [{name: int((np.array(task_of)[ix] == t).sum()) for t, name in enumerate(names)}
                         for ix in clients]
    try:
        engine = Engine(model_spec(cfg), rank=cfg.lora.rank, seed=cfg.seed)
    except ModelError as e:
        raise InputError(f"model.name_or_path: {e}") from None
    profiles = make_profiles(cfg, engine, train[:256])
    return Setup(cfg=cfg, train=train, client_indices=clients, eval_questions=eval_qs, final_questions=final_qs,
                 profiles=profiles, engine=engine, data_report=report)


def client_batches(setup: Setup, client: int, round_idx: int) -> list[list[Question]]:
    """tau minibatches drawn without replacement within a batch, seeded by (round, client)."""
    cfg = setup.cfg
    rng = np.random.default_rng([cfg.seed, STREAM_BATCH, round_idx, client])
    own = setup.client_indices[client]
    size = min(cfg.train.batch_size, len(own))
    return [[setup.train[j] for j in rng.choice(own, size=size, replace=False)]
            for _ in range(cfg.train.local_steps)]


# ------------------------------------------------------------- run folder


def clients_json(setup: Setup) -> list[dict]:
    rows = []
    for p, n, share in zip(setup.profiles, setup.num_samples, setup.data_share):
        rows.append({"id": p.id, "num_samples": int(n), "data_share": float(share),
                     "compute_time_s": p.compute_time_s, "upload_bits": setup.upload_bits_full,
                     "bits_per_s_per_hz": p.bits_per_s_per_hz, **p.extra})
    return rows


def flatten_state(state) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in state.items():
        out[f"{name}.A"], out[f"{name}.B"] = a.contiguous(), b.contiguous()
    return out


def unflatten_state(flat: dict[str, torch.Tensor]):
    names = sorted({k.rsplit(".", 1)[0] for k in flat})
    return {n: (flat[f"{n}.A"], flat[f"{n}.B"]) for n in names}


# ------------------------------------------------------------------ loop


class RoundClock:
    """Simulated seconds of one round: download + (compute, upload) under the allocation + server."""

    def __init__(self, setup: Setup):
        cfg = setup.cfg
        self.cfg = cfg
        self.compute_model = ComputeModel(cfg.system.compute_model.kind, cfg.system.compute_model.fixed_fraction)
        self.compute_time_s = np.array([p.compute_time_s for p in setup.profiles])
        self.eff = np.array([p.bits_per_s_per_hz for p in setup.profiles])
        self.allocate = equal_finish_allocation if cfg.system.allocation == "equal_finish" else equal_split_allocation

    def round_time(self, round_idx: int, ids: list[int], ratios: list[float], upload_bits: list[float],
                   broadcast_bits: float, unicast_bits: list[float], server_s: float) -> dict:
        sys = self.cfg.system
        eff = self.eff[ids]
        if sys.profiles.fading and ids:
            rng = np.random.default_rng([self.cfg.seed, STREAM_FADING, round_idx])
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


# The pieces of one round, shared by `run` and the Flower engine (fedlora.flower).


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
    state = setup.engine.init_state(derived_seed(cfg.seed, STREAM_INIT))
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


def local_train(setup: Setup, job, round_idx: int):
    """One client's local training for `job` in round `round_idx` (the client side)."""
    cfg = setup.cfg
    return setup.engine.train_local(
        job.start, scaling=job.scaling, batches=client_batches(setup, job.client_id, round_idx), lr=cfg.train.lr,
        optimizer=cfg.train.optimizer, weight_decay=cfg.train.weight_decay,
        regularizer=job.regularizer, max_grad_norm=cfg.train.max_grad_norm)


def payload_ok(payload) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in payload.values())


def client_update(setup: Setup, method: Method, job, round_idx: int):
    """(payload, mean loss or None when the update is not finite, upload bits) of one client."""
    res = local_train(setup, job, round_idx)
    payload = method.client_payload(job, res.state)
    bits = payload_values(payload) * setup.cfg.system.bytes_per_value * 8
    if res.finite and payload_ok(payload):
        return payload, float(np.mean(res.losses)), bits
    return payload, None, bits


def eval_due(cfg: RunConfig, t: int, before_s: float, after_s: float) -> bool:
    """Evaluate after round t (which moved the clock from before_s to after_s)? Every
    eval.every rounds, or (eval.every_s) when the round crossed a multiple of every_s; always
    after the last round and the round that reaches max_sim_time_s."""
    if t == cfg.train.rounds or (cfg.train.max_sim_time_s is not None and after_s >= cfg.train.max_sim_time_s):
        return True
    if cfg.eval.every_s is not None:
        return math.floor(after_s / cfg.eval.every_s) > math.floor(before_s / cfg.eval.every_s)
    return t % cfg.eval.every == 0


def close_round(setup: Setup, method: Method, clock: RoundClock, prog: dict, t: int, state, rc, jobs: dict,
                payloads: dict, losses: list, rejected: list, upload_bits: dict, *, history=None, stop_when=None,
                extra: dict | None = None):
    """Aggregate, advance the simulated clock, evaluate, decide whether to stop.

    `jobs` are the round's participants (client id -> job). Returns (new state, metrics row
    without cpu_time_s); updates `prog` in place."""
    cfg = setup.cfg
    bytes_per_value = cfg.system.bytes_per_value
    rounds = cfg.train.rounds
    state = method.aggregate(t, state, jobs, payloads)
    ids = sorted(jobs)
    bits = bytes_per_value * 8
    times = clock.round_time(t, ids, [jobs[i].compute_ratio for i in ids], [upload_bits[i] for i in ids],
                             rc.broadcast_values * bits if ids else 0.0, [jobs[i].unicast_values * bits for i in ids],
                             method.server_time_s())
    download_values = (rc.broadcast_values if ids else 0) + sum(j.unicast_values for j in jobs.values())
    before_s = prog["sim_time_s"]
    prog["sim_time_s"] += times["round_time_s"]
    up = int(sum(upload_bits[i] for i in jobs) // 8)
    down = int(download_values * bytes_per_value)
    prog["upload_bytes"] += up
    prog["download_bytes"] += down
    prog["planning_time_s"] = prog.get("planning_time_s", 0.0) + float(rc.info.get("planning_time_s", 0.0))
    row = {"round": t, "sim_time_s": prog["sim_time_s"], **times, "participants": ids,
           "upload_bytes": up, "download_bytes": down,
           "train_loss": float(np.mean(losses)) if losses else None, "rejected": rejected, **(extra or {}),
           **rc.info}
    if cfg.eval.probe_examples is not None:
        row["probe_loss"] = probe_loss(setup, state)
    if eval_due(cfg, t, before_s, prog["sim_time_s"]):
        acc, mean = evaluate(setup, state, setup.eval_questions)
        row["eval"], row["eval_mean"] = acc, mean
        if target_reached(cfg.train.target_accuracy, acc, mean):
            prog["stop_reason"] = "target_accuracy"
    if cfg.train.max_sim_time_s is not None and prog["sim_time_s"] >= cfg.train.max_sim_time_s \
            and prog["stop_reason"] is None:
        prog["stop_reason"] = "max_sim_time"
    if stop_when is not None and prog["stop_reason"] is None and stop_when((history or []) + [row]):
        prog["stop_reason"] = "stop_when"
    if t == rounds and prog["stop_reason"] is None:
        prog["stop_reason"] = "max_rounds"
    return state, row


def commit_round(out: Path, metrics, row: dict, state, method: Method, engine: Engine, prog: dict) -> None:
    """Append the round's row to the open metrics.jsonl and checkpoint after it."""
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()
    prog["next_round"] = row["round"] + 1
    checkpoint(out, state, method, engine, prog)


def checkpoint(out: Path, state, method: Method, engine: Engine, prog: dict) -> None:
    """The loop's state after a round: adapter, method state, merged base delta, progress."""
    save_checkpoint(out, adapter=flatten_state(state), method_state=method.state_dict(), base_delta=engine.base_delta(),
                    progress=prog)


def run(cfg: RunConfig, out: Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        setup: Setup | None = None, stop_when=None) -> dict:
    """Run one method on a config into the run folder `out`; returns the result dict.

    `stop_when(rows)` (optional) ends the run after a round when it returns True (pilots)."""
    method_cls = get_method(cfg.method)
    out = Path(out)
    extending = False
    if resume and (out / "config.yaml").exists():
        saved = (out / "config.yaml").read_text()
        if saved != dump_config(cfg):
            extending = check_extension(out, saved, cfg)  # more rounds or time: continue; else refused
    if method_cls.needs_constants:
        from .pilot import check_planner_inputs

        check_planner_inputs(cfg)
    if setup is None:
        setup = build_setup(cfg)  # validates data, model and profiles before touching `out`
    elif setup.cfg is not cfg:  # a shared setup (compare, pilots): same data and model, this run's knobs
        setup = dataclasses.replace(setup, cfg=cfg)
    prepare_out(out, resume=resume, overwrite=overwrite)
    if (out / "result.json").exists() and resume and not extending:
        return json.loads((out / "result.json").read_text())
    ctx = setup.method_context()
    pre_run_s = 0.0
    if method_cls.needs_constants:
        from .pilot import resolve_constants

        ctx.constants, pre_run_s = resolve_constants(cfg, out, setup=setup, progress=progress)
    try:
        method = method_cls(ctx)  # plans (may refuse: infeasible constants, bad options)
    except Exception:
        if not resume and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a method that cannot start leaves no empty run folder behind
        raise

    if extending:  # result.json first: a crash in between leaves a resumable run
        (out / "result.json").unlink(missing_ok=True)
        write_atomic(out / "config.yaml", dump_config(cfg))
    ckpt = load_checkpoint(out) if resume else None
    metrics_path = out / "metrics.jsonl"
    if ckpt is None:
        state, prog = start_run_folder(setup, method, out, pre_run_s)
    else:
        adapter, method_state, base_delta, prog = ckpt
        if prog["stop_reason"] in ("max_rounds", "max_sim_time") and not limit_reached(cfg, prog):
            prog["stop_reason"] = None  # an extended run: its limit grew
        state = unflatten_state(adapter)
        method.load_state_dict(method_state)
        setup.engine.load_base_delta(base_delta)  # also clears merges a shared engine may carry
        # drop metric rows written after the checkpoint (a crash between row and checkpoint)
        rows = read_rows(out, before_round=prog["next_round"])
        write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    clock = RoundClock(setup)
    rounds = cfg.train.rounds
    bar = _progress(rounds, prog["next_round"] - 1, enabled=progress)
    last = {}
    history = read_rows(out) if stop_when else []
    with open(metrics_path, "a") as metrics:
        t = prog["next_round"]
        while prog["stop_reason"] is None and t <= rounds:
            cpu0 = time.perf_counter()
            rc = method.configure_round(t, state)
            jobs = {j.client_id: j for j in rc.jobs}
            payloads, losses, rejected, upload_bits = {}, [], [], {}
            for i, job in jobs.items():
                payload, loss, upload_bits[i] = client_update(setup, method, job, t)
                if loss is not None:
                    payloads[i] = payload
                    losses.append(loss)
                else:
                    rejected.append(i)  # NaN/inf update: dropped, recorded, the run goes on
            state, row = close_round(setup, method, clock, prog, t, state, rc, jobs, payloads, losses, rejected,
                                     upload_bits, history=history, stop_when=stop_when)
            row["cpu_time_s"] = time.perf_counter() - cpu0
            prog["cpu_time_s"] += row["cpu_time_s"]
            commit_round(out, metrics, row, state, method, setup.engine, prog)
            last = row
            if stop_when is not None:
                history.append(row)
            bar.update(1)
            bar.set_postfix(sim=f"{prog['sim_time_s']:.0f}s", loss=_fmt(row["train_loss"]),
                            acc=_fmt(row.get("eval_mean", last.get("eval_mean"))))
            t += 1
    bar.close()
    if prog["stop_reason"] is None:
        prog["stop_reason"] = "max_rounds"
    return finish(setup, method, out, state, prog)


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
    if dump_config(same) != dump_config(cfg) or not longer:
        raise InputError(f"{out}/config.yaml: differs from the given config "
                         f"({first_difference(out / 'config.yaml', dump_config(cfg))}); resume needs the same "
                         "config, or only a larger train.rounds / train.max_sim_time_s")
    return True


def limit_reached(cfg: RunConfig, prog: dict) -> bool:
    """Has the run used up its rounds or its simulated time (as close_round decides)?"""
    t = cfg.train
    return prog["next_round"] > t.rounds or (t.max_sim_time_s is not None and prog["sim_time_s"] >= t.max_sim_time_s)


def finish(setup: Setup, method: Method, out: Path, state, prog: dict) -> dict:
    cfg = setup.cfg
    acc, mean = evaluate(setup, state, setup.final_questions)
    adapter_tmp = out / "adapter.tmp"
    shutil.rmtree(adapter_tmp, ignore_errors=True)
    setup.engine.save_peft_adapter(method.export_state(state), cfg.lora.alpha, adapter_tmp)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    os.replace(adapter_tmp, out / "adapter")
    rows = read_rows(out)
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
              "total_time_to_target_s": None if ttt is None else pre + ttt}  # what a user waits for
    write_atomic(out / "result.json", json.dumps(result, indent=1))
    return result


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="round", dynamic_ncols=True)


__all__ = ["METHODS", "Setup", "build_setup", "run", "client_batches", "RoundClock", "time_to_target"]
