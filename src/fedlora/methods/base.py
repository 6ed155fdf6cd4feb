"""What every federated LoRA method provides to the round loop.

A method is the server's side of one algorithm: who trains this round and from what
(`configure_round`, which returns the round's client jobs), and how the server folds the
clients' payloads into the global adapter (`aggregate`, which returns an `Aggregated`
value). What a client sends back is stated in its job as data (`ClientJob.upload`, an
upload rule of plain numbers), so the node that trains applies it, in process or on a
Flower node alike, and the bytes on the clock are the bytes that crossed. A method changes
nothing outside itself: the loop (fedlora.loop) owns data, model, clock and files and
applies what `aggregate` returns (the new state, a merge into the base weights, server
time). So a method is one small class that reads like its paper.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..config import RandomRule, RunConfig
from ..sketch import rank_count
from ..streams import training_entropy

AdapterState = dict[str, tuple[Tensor, Tensor]]
Payload = dict[str, Tensor]


@dataclass
class MethodContext:
    """What a method may know: the config and the public facts about clients."""

    cfg: RunConfig
    data_share: np.ndarray  # p_i = n_i / n
    compute_time_s: np.ndarray  # tau local steps at full rank, per client
    upload_s_hz: np.ndarray  # full-rank upload time at 1 Hz (t_cm_i(1)), per client
    module_shapes: dict[str, tuple[int, int]]  # (in_features, out_features)
    engine: object | None = None  # the model engine, for methods that merge into the base
    constants: object | None = None  # planner.BoundConstants, for methods that plan (needs_constants)
    # time for client i to receive a broadcast of the full rank-r adapter alone over the whole
    # downlink band (docs/system.md, Downlink); None: no download model
    download_s: np.ndarray | None = None

    @property
    def num_clients(self) -> int:
        return len(self.data_share)

    @property
    def rank(self) -> int:
        return self.cfg.lora.rank

    @property
    def base_scaling(self) -> float:
        return self.cfg.lora.alpha / self.cfg.lora.rank

    def rng(self, *purpose: int) -> np.random.Generator:
        """Counter-based randomness: the same (seed, replicate, purpose, round, client) gives the
        same draws whether the run was resumed or not."""
        return np.random.default_rng([*training_entropy(self.cfg), *purpose])


# ------------------------------------------------------------------ upload rules
# A client's upload rule is a frozen dataclass of plain numbers with a `kind`: it travels to
# a Flower node as its kind and fields (fedlora.flower.common) and the node applies the same
# rule. `shapes(start)` lists the payloads a rule can produce (a reply matching none is
# rejected by the server).


@dataclass(frozen=True)
class DeltaUpload:
    """The change of every factor the client trained (the default)."""

    kind: ClassVar[str] = "delta"

    def payload(self, start: AdapterState, trained: AdapterState) -> Payload:
        out: Payload = {}
        for name, (a, b) in trained.items():
            a0, b0 = start[name]
            out[f"{name}.A"] = a - a0
            out[f"{name}.B"] = b - b0
        return out

    def shapes(self, start: AdapterState) -> list[dict[str, tuple[int, ...]]]:
        return [factor_shapes(start)]


@dataclass(frozen=True)
class FactorsUpload:
    """The trained factors themselves (FLoRA's stacking and FlexLoRA's products need them)."""

    kind: ClassVar[str] = "factors"

    def payload(self, start: AdapterState, trained: AdapterState) -> Payload:
        return factors_payload(trained)

    def shapes(self, start: AdapterState) -> list[dict[str, tuple[int, ...]]]:
        return [factor_shapes(start)]


def factor_shapes(state: AdapterState, keep: int | None = None) -> dict[str, tuple[int, ...]]:
    """{"module.A": (k, in), "module.B": (out, k)} of a state, its first `keep` ranks if given."""
    out = {}
    for name, (a, b) in state.items():
        k = a.shape[0] if keep is None else keep
        out[f"{name}.A"], out[f"{name}.B"] = (k, a.shape[1]), (b.shape[0], k)
    return out


@dataclass
class ClientJob:
    client_id: int
    start: AdapterState  # the (sub-)adapter the client trains
    scaling: float  # LoRA scaling while training: module output W0 x + scaling * B A x
    compute_ratio: float  # fraction of full-rank compute, for the simulated clock
    rank_indices: np.ndarray | None = None  # global ranks the sub-adapter holds
    unicast_values: int = 0  # values sent to this client alone (beyond the broadcast)
    regularizer: Callable[[AdapterState], Tensor] | None = None
    upload: object = DeltaUpload()  # the client's upload rule (DeltaUpload, FactorsUpload, ...)


def client_payload(job: ClientJob, trained: AdapterState) -> Payload:
    """What the client uploads after training `job` (run on the client: in process or on a node)."""
    return job.upload.payload(job.start, trained)


@dataclass
class RoundConfig:
    jobs: list[ClientJob]
    broadcast_values: int  # values broadcast to all clients at the start of the round
    info: dict = field(default_factory=dict)  # extra metrics of the method for this round
    server_s: float = 0.0  # server work before the round, on the clock (the planner's time)


@dataclass
class Aggregated:
    """What a round's aggregation returns; the loop applies it."""

    state: AdapterState  # the new global adapter
    base_merge: dict[str, Tensor] | None = None  # delta the loop adds to the base weights (FLoRA's merge)
    server_s: float = 0.0  # server compute on the clock (FlexLoRA's products and SVDs)


class Method(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    needs_constants: ClassVar[bool] = False  # True: the loop resolves planner constants first (pilot)
    # True: its q matches `sampling.match`'s expected participants (sampling_baselines)
    matches_participation: ClassVar[bool] = False

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self.server_opt = ServerOptimizer(ctx.cfg.train.server_optimizer, ctx.cfg.train.server_lr)

    def plan(self) -> dict | None:
        """plan.json fields when the method sets q and s (None when it does not)."""
        return None

    @abstractmethod
    def configure_round(self, round_idx: int, state: AdapterState) -> RoundConfig: ...

    @abstractmethod
    def aggregate(self, round_idx: int, state: AdapterState, jobs: dict[int, ClientJob],
                  payloads: dict[int, Payload]) -> Aggregated: ...

    def export_state(self, state: AdapterState) -> AdapterState:
        """The adapter written to adapter/ (merged base deltas are folded in by the engine)."""
        return state

    def state_dict(self) -> dict:
        return {"server_opt": self.server_opt.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.server_opt.load_state_dict(d["server_opt"])


def split_payload(payload: Payload) -> dict[str, tuple[Tensor, Tensor]]:
    names = sorted({k.rsplit(".", 1)[0] for k in payload})
    return {n: (payload[f"{n}.A"], payload[f"{n}.B"]) for n in names}


def factors_payload(state: AdapterState) -> Payload:
    """Upload the factors themselves (not their change): {"module.A": A, "module.B": B}."""
    out: Payload = {}
    for name, (a, b) in state.items():
        out[f"{name}.A"], out[f"{name}.B"] = a, b
    return out


def payload_values(payload: Payload) -> int:
    return int(sum(t.numel() for t in payload.values()))


def state_values(state: AdapterState) -> int:
    return int(sum(a.numel() + b.numel() for a, b in state.values()))


class ServerOptimizer:
    """x <- x + lr * aggregated update (sgd; lr 1 is the plain rule), or Adam on the
    pseudo-gradient -aggregated (FedAdam-style). Keeps its moments per tensor name."""

    def __init__(self, kind: str, lr: float, betas=(0.9, 0.99), eps: float = 1e-8):
        self.kind, self.lr, self.betas, self.eps = kind, lr, betas, eps
        self.step_count = 0
        self.moments: dict[str, Tensor] = {}

    def apply(self, state: AdapterState, update: AdapterState) -> AdapterState:
        if self.kind == "sgd":
            return {n: (a + self.lr * update[n][0], b + self.lr * update[n][1]) for n, (a, b) in state.items()}
        self.step_count += 1
        b1, b2 = self.betas
        out = {}
        for n, (a, b) in state.items():
            new = []
            for tag, x, u in (("A", a, update[n][0]), ("B", b, update[n][1])):
                m = self.moments.get(f"{n}.{tag}.m", torch.zeros_like(x)) * b1 + (1 - b1) * u
                v = self.moments.get(f"{n}.{tag}.v", torch.zeros_like(x)) * b2 + (1 - b2) * u * u
                self.moments[f"{n}.{tag}.m"], self.moments[f"{n}.{tag}.v"] = m, v
                m_hat = m / (1 - b1 ** self.step_count)
                v_hat = v / (1 - b2 ** self.step_count)
                new.append(x + self.lr * m_hat / (v_hat.sqrt() + self.eps))
            out[n] = (new[0], new[1])
        return out

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "moments": dict(self.moments)}

    def load_state_dict(self, d: dict) -> None:
        self.step_count = int(d["step_count"])
        self.moments = dict(d["moments"])


# ------------------------------------------------------- per-client settings


def per_client_values(spec, ctx: MethodContext, *, purpose: int) -> np.ndarray:
    """Resolve a config value for q or s: a constant, a list by client id, or a seeded
    random rule (uniform / truncated normal on [low, high], or q proportional to p)."""
    n = ctx.num_clients
    if isinstance(spec, (int, float)):
        return np.full(n, float(spec))
    if isinstance(spec, list):
        return np.asarray(spec, dtype=float)
    assert isinstance(spec, RandomRule)
    rng = ctx.rng(purpose)
    low = spec.low if spec.low is not None else 1.0 / ctx.rank
    if spec.rule == "uniform":
        return rng.uniform(low, spec.high, size=n)
    if spec.rule == "normal":
        from scipy.stats import truncnorm

        mean = spec.mean if spec.mean is not None else (low + spec.high) / 2
        std = spec.std if spec.std is not None else (spec.high - low) / 4
        a, b = (low - mean) / std, (spec.high - mean) / std
        return truncnorm.rvs(a, b, loc=mean, scale=std, size=n, random_state=rng)
    # weighted: q_i proportional to p_i, scaled so that sum q = expected participants
    # default: as many expected participants as the fixed-q = 0.5 baseline
    target = spec.expected_participants if spec.expected_participants is not None else 0.5 * n
    return weighted_probabilities(ctx.data_share, target)


def weighted_probabilities(data_share: np.ndarray, expected_participants: float) -> np.ndarray:
    """q_i = c p_i capped at 1, with c chosen so that sum q_i = expected participants
    (water-filling: capped clients hand their excess to the others)."""
    n = len(data_share)
    target = min(float(expected_participants), float(n))
    q = np.zeros(n)
    free = np.ones(n, bool)
    for _ in range(n):
        remaining = target - (~free).sum()
        q[free] = remaining * data_share[free] / data_share[free].sum()
        over = free & (q >= 1.0)
        if not over.any():
            break
        q[over] = 1.0
        free &= ~over
    return np.clip(q, 1e-6, 1.0)


def compute_model(cfg: RunConfig):
    """The clients' compute time vs sketch ratio (system.ComputeModel) of a config."""
    from ..system import ComputeModel

    return ComputeModel(cfg.system.compute_model.kind, cfg.system.compute_model.fixed_fraction)


def plan_json(ctx: MethodContext, *, participation_prob, sketch_ratio, ranks, expected_round_time_s: float,
              expected_participants: float | None = None, **extra) -> dict:
    """plan.json: the fields of every method that sets q and s, then the method's own (`extra`)."""
    cm = ctx.cfg.system.compute_model
    q = [float(x) for x in participation_prob]
    return {"participation_prob": q, "sketch_ratio": [float(x) for x in sketch_ratio],
            "ranks": [int(k) for k in ranks], "bandwidth_hz": ctx.cfg.system.bandwidth_hz,
            "compute_model": {"kind": "linear"} if cm.kind == "linear" else {"kind": "affine",
                                                                             "fixed_fraction": cm.fixed_fraction},
            "expected_round_time_s": float(expected_round_time_s),
            "expected_participants": float(sum(q) if expected_participants is None else expected_participants),
            **extra}


def ranks_from_ratios(ratios: np.ndarray, rank: int) -> np.ndarray:
    return np.array([rank_count(float(s), rank) for s in ratios], dtype=int)
