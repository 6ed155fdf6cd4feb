"""What a run needs that does not change from round to round: data split, client profiles,
base model (config -> Setup). The round loop (fedlora.loop), the pilots and the Flower apps
build it here.

All randomness is counter-based (seed, purpose, round, client): the streams below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import InputError, RunConfig, read_user_file
from .data import DataError, Question, load_tasks, partition, subsample
from .methods import MethodContext
from .model import Engine, ModelError, ModelSpec
from .scoring import ScorerCaches
from .sketch import payload_values as rank_payload_values
from .streams import STREAM_BATCH, STREAM_DATA, STREAM_EVAL, STREAM_PROFILES, training_entropy
from .system import ClientProfile, channel_profiles, generate_profiles



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
        upload_s_hz, download_s = link_times(self.cfg, [p.bits_per_s_per_hz for p in self.profiles],
                                             self.upload_bits_full)
        return MethodContext(
            cfg=self.cfg, data_share=self.data_share,
            compute_time_s=np.array([p.compute_time_s for p in self.profiles]),
            upload_s_hz=upload_s_hz, download_s=download_s,
            module_shapes=dict(self.engine.module_shapes), engine=self.engine,
            constants=constants_from_config(self.cfg))


def link_times(cfg: RunConfig, bits_per_s_per_hz, upload_bits_full) -> tuple[np.ndarray, np.ndarray]:
    """(t_cm_i(1) in s*Hz, t_dl_i in s) per client: a full-rank upload at unit bandwidth, and the
    broadcast (a full-rank update) at the client's downlink rate alone."""
    sys = cfg.system
    eff = np.asarray(bits_per_s_per_hz, dtype=np.float64)
    eff_dl = eff if sys.downlink_bits_per_s_per_hz is None else np.full(eff.size, sys.downlink_bits_per_s_per_hz)
    return upload_bits_full / eff, upload_bits_full / (sys.downlink_band_hz * eff_dl)


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
    records = read_user_file(p, "JSON", missing="profile file not found (system.profiles.file)")
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


def build_setup(cfg: RunConfig, caches: ScorerCaches | None = None) -> Setup:
    """Load data, partition it, build the model and the client profiles. Raises InputError.
    `caches`: an earlier engine's scorer caches (another seed, say), taken where they hold the
    same values (OptionScorer.adopt_caches)."""
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
                            seed=derived_seed(cfg.seed, STREAM_DATA), min_samples=cfg.data.min_client_samples,
                            draw=cfg.data.dirichlet_draw)
    except DataError as e:
        raise InputError(f"data: {e}") from None
    names = list(tasks)
    report["clients"] = [{name: int((np.array(task_of)[ix] == t).sum()) for t, name in enumerate(names)}
                         for ix in clients]
    try:
        engine = Engine(model_spec(cfg), rank=cfg.lora.rank, seed=cfg.seed)
    except ModelError as e:
        raise InputError(f"model.name_or_path: {e}") from None
    if caches is not None:
        engine.scorer.adopt_caches(caches)
    profiles = make_profiles(cfg, engine, train[:256])
    return Setup(cfg=cfg, train=train, client_indices=clients, eval_questions=eval_qs, final_questions=final_qs,
                 profiles=profiles, engine=engine, data_report=report)


def client_batches(setup: Setup, client: int, round_idx: int) -> list[list[Question]]:
    """tau minibatches drawn without replacement within a batch, seeded by (round, client)."""
    cfg = setup.cfg
    rng = np.random.default_rng([*training_entropy(cfg), STREAM_BATCH, round_idx, client])
    own = setup.client_indices[client]
    size = min(cfg.train.batch_size, len(own))
    return [[setup.train[j] for j in rng.choice(own, size=size, replace=False)]
            for _ in range(cfg.train.local_steps)]


def local_train(setup: Setup, job, round_idx: int):
    """One client's local training for `job` in round `round_idx` (the client side)."""
    cfg = setup.cfg
    return setup.engine.train_local(
        job.start, scaling=job.scaling, batches=client_batches(setup, job.client_id, round_idx), lr=cfg.train.lr,
        optimizer=cfg.train.optimizer, weight_decay=cfg.train.weight_decay,
        regularizer=job.regularizer, max_grad_norm=cfg.train.max_grad_norm)


def clients_json(setup: Setup) -> list[dict]:
    rows = []
    for p, n, share in zip(setup.profiles, setup.num_samples, setup.data_share):
        rows.append({"id": p.id, "num_samples": int(n), "data_share": float(share),
                     "compute_time_s": p.compute_time_s, "upload_bits": setup.upload_bits_full,
                     "bits_per_s_per_hz": p.bits_per_s_per_hz, **p.extra})
    return rows
