"""What every federated LoRA method provides to the round loop.

A method is the server's side of one algorithm: who trains this round and from what
(`configure_round`), what a client sends back (`client_payload`, run "on the client"), and
how the server folds the payloads into the global adapter (`aggregate`). The loop owns
data, model, clock and files, so a method is one small class that reads like its paper.
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
        """Counter-based randomness: the same (seed, purpose, round, client) gives the same
        draws whether the run was resumed or not."""
        return np.random.default_rng([self.cfg.seed, *purpose])


@dataclass
class ClientJob:
    client_id: int
    start: AdapterState  # the (sub-)adapter the client trains
    scaling: float  # LoRA scaling while training: module output W0 x + scaling * B A x
    compute_ratio: float  # fraction of full-rank compute, for the simulated clock
    rank_indices: np.ndarray | None = None  # global ranks the sub-adapter holds
    unicast_values: int = 0  # values sent to this client alone (beyond the broadcast)
    regularizer: Callable[[AdapterState], Tensor] | None = None


@dataclass
class RoundConfig:
    jobs: list[ClientJob]
    broadcast_values: int  # values broadcast to all clients at the start of the round
    info: dict = field(default_factory=dict)  # extra metrics of the method for this round


class Method(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    needs_constants: ClassVar[bool] = False  # True: the loop resolves planner constants first (pilot)

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self.server_opt = ServerOptimizer(ctx.cfg.train.server_optimizer, ctx.cfg.train.server_lr)

    def plan(self) -> dict | None:
        """plan.json fields when the method sets q and s (None when it does not)."""
        return None

    @abstractmethod
    def configure_round(self, round_idx: int, state: AdapterState) -> RoundConfig: ...

    def client_payload(self, job: ClientJob, trained: AdapterState) -> Payload:
        """What the client uploads: by default the change of every factor it trained."""
        out: Payload = {}
        for name, (a, b) in trained.items():
            a0, b0 = job.start[name]
            out[f"{name}.A"] = a - a0
            out[f"{name}.B"] = b - b0
        return out

    @abstractmethod
    def aggregate(self, round_idx: int, state: AdapterState, jobs: dict[int, ClientJob],
                  payloads: dict[int, Payload]) -> AdapterState: ...

    def export_state(self, state: AdapterState) -> AdapterState:
        """The adapter written to adapter/ (merged base deltas are folded in by the engine)."""
        return state

    def server_time_s(self) -> float:
        """Server compute charged on the clock this round (e.g. FlexLoRA's SVDs)."""
        return 0.0

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


def compute_model_json(cfg: RunConfig) -> dict:
    """plan.json's compute_model: {"kind": "linear"} or {"kind": "affine", "fixed_fraction": f}."""
    cm = cfg.system.compute_model
    return {"kind": "linear"} if cm.kind == "linear" else {"kind": "affine", "fixed_fraction": cm.fixed_fraction}


def ranks_from_ratios(ratios: np.ndarray, rank: int) -> np.ndarray:
    return np.array([rank_count(float(s), rank) for s in ratios], dtype=int)
