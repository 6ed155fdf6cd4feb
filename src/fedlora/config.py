"""Run configuration: YAML in, dotted overrides applied, validated by pydantic, resolved out.

Every user-facing problem (bad file, unknown key, out-of-range value) becomes an
`InputError` with one line naming file, field and value; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MEAN = "mean"  # target key for eval_mean, the mean accuracy over tasks (reports time it next to per-task targets)


class InputError(ValueError):
    """A problem with what the user gave us (file, field, value). Printed as one line, exit 2."""


def read_user_text(path: Path, *, missing: str) -> str:
    """The text of a file the user named; InputError '<path>: <missing>' when there is none,
    '<path>: cannot read (...)' when it is not readable text."""
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e.__class__.__name__})") from None


def read_user_file(path: Path, fmt: Literal["YAML", "JSON"], *, missing: str) -> Any:
    """The parsed content of a YAML or JSON file the user named (read_user_text's errors, and
    '<path>: not valid <fmt> (...)' when it does not parse)."""
    text = read_user_text(path, missing=missing)
    try:
        return yaml.safe_load(text) if fmt == "YAML" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid {fmt} ({str(e).splitlines()[0]})") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name_or_path: str = "embedded:all-MiniLM-L6-v2"
    kind: Literal["auto", "encoder", "causal"] = "auto"
    max_length: int = Field(64, ge=8)
    score: Literal["option", "answer"] = "option"  # causal LMs only
    device: Literal["auto", "cpu", "cuda"] = "auto"


class DataConfig(_Strict):
    dir: str | None = None  # None: the four commonsense tasks shipped with fedlora
    tasks: list[str] | None = None  # None: every task folder in dir
    num_clients: int = Field(10, ge=1)
    dirichlet_alpha: float | None = Field(0.1, gt=0)  # None: iid split
    # per_task: each task's shares over the clients ~ Dir(alpha); per_client: each client's
    # task mixture ~ Dir(alpha) (data.partition; 50 clients need per_client)
    dirichlet_draw: Literal["per_task", "per_client"] = "per_task"
    min_client_samples: int = Field(8, ge=1)
    max_train_per_task: int | None = Field(None, ge=1)  # subsample train data (CPU-sized runs)
    carve_fraction: float = Field(0.5, gt=0, lt=1)  # train share carved from test-only tasks


class LoraConfig(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] | None = None  # None: the model kind's default (query/value)
    # transformer blocks that get LoRA (None: all). With an encoder, the frozen blocks below
    # the lowest one are computed once per (question, option) and cached (model.Engine).
    layers: list[int] | None = Field(None, min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class TrainConfig(_Strict):
    rounds: int = Field(20, ge=1)
    local_steps: int = Field(5, ge=1)  # tau
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["sgd", "adamw"] = "adamw"  # local optimizer, fresh every round
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    server_optimizer: Literal["sgd", "adam"] = "sgd"  # sgd with server_lr 1 is the plain rule
    server_lr: float = Field(1.0, gt=0)
    target_accuracy: float | dict[str, float] | None = None  # eval_mean, or per task
    max_sim_time_s: float | None = Field(None, gt=0)
    # 0: the seed's own training draws; k > 0: fresh draws of every training stream (initial
    # adapter, minibatches, participation, sketches, fading) on the seed's data split, client
    # profiles and evaluation questions: how much a run varies within one setting
    replicate: int = Field(0, ge=0)

    @field_validator("target_accuracy")
    @classmethod
    def _target_in_range(cls, v):
        if isinstance(v, dict) and MEAN in v:  # only reports time a mean next to per-task targets
            raise ValueError("per-task targets name tasks; for the mean accuracy over tasks give a number")
        values = v.values() if isinstance(v, dict) else ([] if v is None else [v])
        for x in values:
            if not 0 < x <= 1:
                raise ValueError(f"accuracy target {x} must be in (0, 1]")
        return v


class ComputeModelConfig(_Strict):
    kind: Literal["linear", "affine"] = "linear"
    fixed_fraction: float = Field(0.0, ge=0, lt=1)  # affine: t_cp(s) = c * (f + (1 - f) s)


class ProfilesConfig(_Strict):
    source: Literal["generate", "file", "channel"] = "generate"
    file: str | None = None  # source=file: JSON list of {id, compute_time_s, bits_per_s_per_hz}
    distribution: Literal["lognormal", "uniform"] = "lognormal"
    compute_time_s: float = Field(10.0, gt=0)  # median time of tau local steps at full rank
    compute_spread: float = Field(0.5, ge=0)
    bits_per_s_per_hz: float = Field(4.0, gt=0)  # median link spectral efficiency
    link_spread: float = Field(0.5, ge=0)
    # source=channel: physical model (docs/system.md, Profiles and channel)
    device_flops_median: float = Field(2e10, gt=0)
    device_flops_spread: float = Field(0.5, ge=0)
    cell_radius_m: float = Field(500.0, gt=10)
    tx_power_dbm: tuple[float, float] = (10.0, 23.0)
    noise_dbm_per_hz: float = -174.0
    shadowing_db: float = Field(8.0, ge=0)
    fading: bool = False  # Rayleigh fading per round on top of the mean channel

    @model_validator(mode="after")
    def _file_given(self):
        if self.source == "file" and not self.file:
            raise ValueError("source 'file' needs system.profiles.file")
        if self.tx_power_dbm[0] > self.tx_power_dbm[1]:
            raise ValueError(f"tx_power_dbm range {list(self.tx_power_dbm)} is reversed")
        return self


class SystemConfig(_Strict):
    bandwidth_hz: float = Field(1e6, gt=0)  # total uplink bandwidth shared by sampled clients
    # downlink (docs/system.md): the server's broadcast and unicasts share downlink_hz (None:
    # the uplink's bandwidth_hz, one band time-shared by both directions); each client receives
    # at its own profile's spectral efficiency unless downlink_bits_per_s_per_hz is given
    downlink_hz: float | None = Field(None, gt=0)
    downlink_bits_per_s_per_hz: float | None = Field(None, gt=0)
    allocation: Literal["equal_finish", "equal_split"] = "equal_finish"
    bytes_per_value: Literal[2, 4] = 4
    server_flops_hz: float = Field(1e11, gt=0)  # server arithmetic rate: server-side work (FlexLoRA's SVDs) on the clock
    compute_model: ComputeModelConfig = ComputeModelConfig()
    profiles: ProfilesConfig = ProfilesConfig()

    @property
    def downlink_band_hz(self) -> float:
        """downlink_hz, or the uplink's bandwidth_hz when not given."""
        return float(self.downlink_hz if self.downlink_hz is not None else self.bandwidth_hz)


class RandomRule(_Strict):
    """Draw one value per client, seeded: uniform on [low, high], a truncated normal on
    [low, high], or (participation only) proportional to the data share."""

    rule: Literal["uniform", "normal", "weighted"]
    low: float | None = Field(None, gt=0, le=1)
    high: float = Field(1.0, gt=0, le=1)
    mean: float | None = Field(None, gt=0, le=1)
    std: float | None = Field(None, gt=0)
    expected_participants: float | None = Field(None, gt=0)  # weighted: scale to this sum of q


ProbSpec = Union[float, list[float], RandomRule]


def _check_unit_interval(name: str, v):
    values = v if isinstance(v, list) else ([v] if isinstance(v, (int, float)) else [])
    for x in values:
        if not (0 < x <= 1) or math.isnan(x):
            raise ValueError(f"{name} {x} must be in (0, 1]")
    return v


class SamplingConfig(_Strict):
    participation_prob: ProbSpec = 1.0
    # sample_uniform / sample_weighted (seed 001's sampling baselines): their q sums to the
    # expected participants of the planned method they are compared with, `match`'s starting
    # plan, unless expected_participants gives the number (docs/baselines.md)
    match: Literal["proposed", "proposed_q", "proposed_relaxed"] = "proposed"
    expected_participants: float | None = Field(None, gt=0)

    @field_validator("participation_prob")
    @classmethod
    def _range(cls, v):
        return _check_unit_interval("participation probability", v)


class SketchConfig(_Strict):
    ratio: ProbSpec = 1.0

    @field_validator("ratio")
    @classmethod
    def _range(cls, v):
        if isinstance(v, RandomRule) and v.rule == "weighted":
            raise ValueError("sketch ratio rule must be 'uniform' or 'normal'")
        return _check_unit_interval("sketch ratio", v)


class EvalConfig(_Strict):
    every: int = Field(5, ge=1)  # rounds between evaluations on the fixed subset
    # simulated seconds between evaluations (overrides `every`): the first round ending past
    # each multiple is evaluated, so methods with short and long rounds get the same number
    # of looks per simulated second (with `every`, short-round methods would get more chances
    # to cross a target by evaluation noise)
    every_s: float | None = Field(None, gt=0)
    max_examples: int | None = Field(200, ge=1)  # per task, periodic evaluation
    final_max_examples: int | None = Field(None, ge=1)  # per task, final evaluation (None: all)
    # training questions (drawn once per seed, uniformly from all clients' data, so each
    # client weighs p_i) on which the global model's loss is computed after every round:
    # the row's `probe_loss`, an estimate of f(x) = sum_i p_i f_i(x) that does not depend on
    # which clients were sampled (the mean train loss of the participants does). Pilots stop on it.
    probe_examples: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)


class PilotConfig(_Strict):
    settings: list[tuple[float, float]] = [(1.0, 1.0), (0.5, 1.0), (1.0, 0.25), (0.5, 0.5)]
    target_loss: float | None = Field(None, gt=0)  # pilot stops at this loss (probe_loss if measured, else train loss) ...
    target_accuracy: float | None = Field(None, gt=0, le=1)  # ... or this eval_mean
    max_rounds: int = Field(30, ge=1)
    probe_examples: int | None = Field(128, ge=1)  # pilots measure eval.probe_examples = this (None: train loss)
    # how the pilots' rounds become constants: the seed's SVD (rejects pilots that contradict
    # the model), the best positive fit (planner.fit_constants_constrained), or the SVD and,
    # only where it rejects, the positive fit (recorded in constants.json as such)
    fit: Literal["svd", "constrained", "svd_else_constrained"] = "svd"


class ConstantsConfig(_Strict):
    alpha: float = Field(gt=0)
    beta: float = Field(gt=0)
    gamma: float = Field(gt=0)
    delta: float = Field(gt=0)
    # simulated seconds it took to obtain these numbers (pilot runs and the reference run that
    # set their stopping loss, as `fedlora study` records them): counted as planning time
    planning_time_s: float = Field(0.0, ge=0)
    source: Literal["given", "pilots"] = "given"  # pilots: estimated from this seed's pilot runs (fedlora study)

    def bound_constants(self):
        """These numbers as the planner's BoundConstants."""
        from .planner import BoundConstants

        return BoundConstants(alpha=self.alpha, beta=self.beta, gamma=self.gamma, delta=self.delta)


class OnlineConfig(_Strict):
    """Online planning (docs/theory.md section 8): the run learns its rounds model from its own
    updates and re-plans between rounds."""

    warmup_rounds: int = Field(0, ge=0)  # rounds at q = 1, full rank (the fixed q for proposed_s) before the first plan
    replan_every: int = Field(5, ge=1)  # rounds between re-plans ...
    replan_tolerance: float = Field(0.25, gt=0)  # ... or sooner, when the plan's predicted rounds moved by this fraction
    min_participation: float = Field(0.05, gt=0, le=1)  # exploration floor on every q_i
    sketch_exponent: float = Field(1.0, ge=0)  # theta: a rank-k sketch costs (r/k)^theta in variance (1: the seed's)
    smoothing: float = Field(0.3, gt=0, le=1)  # weight of the newest round in the estimates' moving averages


class PlannerConfig(_Strict):
    # where the rounds model comes from: learnt online from the run (default), fitted to pilot
    # runs (planner.pilot) before the run, or given numbers
    constants: Literal["online", "pilots"] | ConstantsConfig = "online"
    pilot: PilotConfig = PilotConfig()
    online: OnlineConfig = OnlineConfig()
    # server seconds charged on the simulated clock for each planner call (Algorithm 2): the
    # clock stays reproducible, so it charges this stated cost rather than the measured CPU time
    # (bench/planner_speed.py: under 0.5 s at N = 50 on a 2-core CPU)
    plan_time_s: float = Field(0.5, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _legacy_pilot_switch(cls, v):
        """`pilot: true` (older configs) means constants from pilots; `pilot: false` the default."""
        if isinstance(v, dict) and isinstance(v.get("pilot"), bool):
            v = dict(v)
            if v.pop("pilot") and v.get("constants") in (None, "online"):
                v["constants"] = "pilots"
        if isinstance(v, dict) and v.get("constants", "online") is None:
            v = {**v, "constants": "online"}
        return v


class MethodOptions(_Strict):
    """Knobs of the baselines; each method reads only its own."""

    clients_per_round: int | None = Field(None, ge=1)  # fslora: fixed-size sampled set
    client_ranks: list[int] | None = None  # hetlora/flora/flexlora: rank per client (None: from sketch.ratio)
    # hetlora (Cho et al. 2024): aggregation weights ("norm": the paper's sparsity weighting by
    # ||B_i A_i||_F; "data_share": p_i), both normalised over the round's sampled clients; rank
    # self-pruning with the paper's tail regularizer and decay factor
    hetlora_weighting: Literal["norm", "data_share"] = "norm"
    hetlora_pruning: bool = True
    hetlora_decay: float = Field(0.99, gt=0, lt=1)
    hetlora_prune_lambda: float = Field(0.01, ge=0)
    hetlora_min_rank: int = Field(1, ge=1)
    soft_lambda: float = Field(0.01, ge=0)
    soft_rho: float = Field(0.5, gt=0, le=1)
    soft_a_penalty: Literal["full", "offdiag", "none"] = "full"  # ||A A^T - I||^2 (or its off-diagonal part)
    soft_b_penalty: Literal["full", "offdiag", "none"] = "offdiag"  # see docs/theory.md, SOFT section
    tsfa_latency_budget_s: float | None = Field(None, gt=0)
    tsfa_v: float = Field(1.0, gt=0)


class TrackConfig(_Strict):
    # TensorBoard events in <run folder>/tensorboard (`tensorboard --logdir runs/`)
    tensorboard: bool = True


class RunConfig(_Strict):
    method: str = "manual"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    system: SystemConfig = SystemConfig()
    sampling: SamplingConfig = SamplingConfig()
    sketch: SketchConfig = SketchConfig()
    eval: EvalConfig = EvalConfig()
    planner: PlannerConfig = PlannerConfig()
    options: MethodOptions = MethodOptions()
    track: TrackConfig = TrackConfig()

    @model_validator(mode="after")
    def _per_client_lists(self):
        n = self.data.num_clients
        for name, v in (("sampling.participation_prob", self.sampling.participation_prob),
                        ("sketch.ratio", self.sketch.ratio)):
            if isinstance(v, list) and len(v) != n:
                raise ValueError(f"{name} has {len(v)} values for {n} clients")
        if self.options.client_ranks is not None:
            if len(self.options.client_ranks) != n:
                raise ValueError(f"options.client_ranks has {len(self.options.client_ranks)} values for {n} clients")
            bad = [k for k in self.options.client_ranks if not 1 <= k <= self.lora.rank]
            if bad:
                raise ValueError(f"options.client_ranks value {bad[0]} is outside 1..{self.lora.rank}")
        return self


# ---------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.rounds=5' -> (['train', 'rounds'], 5); the value is read as YAML."""
    if "=" not in item:
        raise InputError(f"override '{item}': expected KEY=VALUE, e.g. train.rounds=5")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise InputError(f"override '{item}': empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise InputError(f"override '{item}': value is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = dict(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in {
        "float", "list[float]", "RandomRule", "constrained-float", "dict[str,float]"}))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{loc}'"
    value = e.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    where = f"field '{loc}'" if loc else "config"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {where}: value {shown}: {msg}{more}"


def validate(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise InputError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        loaded = read_user_file(p, "YAML", missing="config file not found")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InputError(f"{p}: top level must be a mapping of keys, got {type(loaded).__name__}")
        raw = loaded
    raw = apply_overrides(raw, overrides or [])
    cfg = validate(raw, source)
    if cfg.data.dir is not None and path is not None and not Path(cfg.data.dir).is_absolute():
        # Relative data folders are relative to the config file, so configs are portable.
        candidate = (Path(path).parent / cfg.data.dir)
        if candidate.exists() and not Path(cfg.data.dir).exists():
            cfg.data.dir = str(candidate)
    return cfg


# Fields added after run folders and settings were first written, with the value that
# reproduces the behaviour from before: at that value they are left out of the dumps, so a
# setting keeps its key and an older run folder still matches its config.
ADDED_LATER: dict[tuple[str, str], Any] = {("data", "dirichlet_draw"): "per_task", ("train", "replicate"): 0}


def _config_dict(cfg: RunConfig) -> dict:
    raw = cfg.model_dump(mode="json")
    for (section, name), old_behaviour in ADDED_LATER.items():
        if raw[section][name] == old_behaviour:
            del raw[section][name]
    return raw


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(_config_dict(cfg), sort_keys=False)


# Sections that change what a run records, not what it trains (settings, pilots and run
# folders are matched without them).
RECORDING_ONLY = ("track",)


def training_dump(cfg: RunConfig) -> str:
    """dump_config without the RECORDING_ONLY sections: the text that keys a setting."""
    raw = {k: v for k, v in _config_dict(cfg).items() if k not in RECORDING_ONLY}
    return yaml.safe_dump(raw, sort_keys=False)
