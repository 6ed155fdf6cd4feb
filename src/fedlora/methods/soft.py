"""SOFT, sparsified orthogonal fine-tuning (seed 002, Kim & Choi, arXiv 2505.00333) --
RECONSTRUCTED from the paper's abstract (no full text, no code); docs/theory.md, section
"Seed 002: SOFT and TSFA (reconstructed)", lists what is ours.

Each round every client joins with its own probability q_i (independent coins, the same
streams as `manual`), trains the full rank-r adapter (s = 1) with the orthogonality penalty
lambda * (||A A^T - I||^2 + ||offdiag(B^T B)||^2) added to its loss (the B term is
off-diagonal by default, see fedlora.soft), then uploads, per LoRA module, only the
k = ceil(rho r) rank components whose change of B A is largest: the rows dA[j, :] and
columns dB[:, j] of its factor change together, plus the k int32 indices (omitted when
k = r). The server adds sum_i (p_i / q_i) * components_i into the global factors.

With rho = 1 and lambda = 0 this is exactly `manual` with sketch.ratio = 1 (plain
federated LoRA with unbiased independent sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..aggregation import sample_participants
from ..sketch import payload_values as rank_payload_values
from ..sketch import rank_count
from ..soft import SparseComponents, aggregate_components, component_change_norms, energy_profile, state_penalty, \
    top_components
from .base import AdapterState, Aggregated, ClientJob, Method, MethodContext, Payload, RoundConfig, \
    compute_model, factor_shapes, per_client_values, plan_json, state_values
from ..streams import STREAM_Q, STREAM_SAMPLE

INDEX_BYTES = 4  # rank indices go on the wire as int32


@dataclass(frozen=True)
class OrthogonalityRegularizer:
    """The client regularizer lambda * orthogonality penalty of the live factors. Plain
    numbers, not a closure, so that another engine (Flower) can send it and rebuild it."""

    kind: ClassVar[str] = "soft-orthogonality"
    lam: float
    a_mode: str
    b_mode: str

    def __call__(self, state: AdapterState) -> torch.Tensor:
        return state_penalty(state, self.lam, a_mode=self.a_mode, b_mode=self.b_mode)


def orthogonality_regularizer(lam: float, a_mode: str, b_mode: str) -> OrthogonalityRegularizer | None:
    """SOFT's regularizer for (lambda, A mode, B mode); None when the penalty is zero."""
    if lam == 0 or (a_mode == "none" and b_mode == "none"):
        return None
    return OrthogonalityRegularizer(float(lam), str(a_mode), str(b_mode))


@dataclass(frozen=True)
class TopComponentsUpload:
    """SOFT's client upload: per module the k rank components whose change of B A is largest
    (rows of dA, columns of dB) and their indices (none when k = r); TSFA's clients add
    their r-value energy profile."""

    kind: ClassVar[str] = "top-components"
    keep: int  # components uploaded per module (k)
    bytes_per_value: int  # the wire size of a value: the indices are packed to match it
    energy_profile: bool = False

    def payload(self, start: AdapterState, trained: AdapterState) -> Payload:
        r = next(iter(start.values()))[0].shape[0]
        k = min(self.keep, r) or r
        out: Payload = {}
        profile = np.zeros(r)
        for name, (a, b) in trained.items():
            a0, b0 = start[name]
            da, db = a - a0, b - b0
            if k < r or self.energy_profile:
                scores = component_change_norms(a0, b0, a, b)
                profile += energy_profile(scores)
            if k >= r:
                out[f"{name}.A"], out[f"{name}.B"] = da, db
                continue
            idx = top_components(scores, k)
            t = torch.as_tensor(idx, dtype=torch.long)
            out[f"{name}.A"] = da.index_select(0, t).contiguous()
            out[f"{name}.B"] = db.index_select(1, t).contiguous()
            out[f"{name}.idx"] = encode_indices(idx, self.bytes_per_value)
        if self.energy_profile:
            out["tsfa.energy_profile"] = torch.as_tensor(profile, dtype=torch.float32)
        return out

    def shapes(self, start: AdapterState) -> list[dict[str, tuple[int, ...]]]:
        r = next(iter(start.values()))[0].shape[0]
        k = min(self.keep, r) or r
        out = factor_shapes(start, k)
        if k < r:
            out.update({f"{name}.idx": (k * INDEX_BYTES // self.bytes_per_value,)
                        for name in start})
        if self.energy_profile:
            out["tsfa.energy_profile"] = (r,)
        return [out]


def encode_indices(idx: np.ndarray, bytes_per_value: int) -> torch.Tensor:
    """int32 indices as a tensor whose element count times bytes_per_value is their true size
    (4 bytes each): int32 for 4-byte values, the same bytes viewed as int16 for 2-byte values."""
    t = torch.as_tensor(np.asarray(idx, dtype=np.int32))
    return t if bytes_per_value == 4 else t.view(torch.int16)


def decode_indices(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    if t.dtype == torch.int16:
        t = t.view(torch.int32)
    return t.numpy().astype(np.int64)


class Soft(Method):
    name = "soft"
    summary = ("seed 002 SOFT, RECONSTRUCTED from the abstract of Kim & Choi (arXiv 2505.00333): orthogonality "
               "penalty (options.soft_lambda) + upload of the top-rho rank components (options.soft_rho)")
    uploads_energy_profile = False  # TSFA's clients also report r energy values (counted as upload)

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        opt = ctx.cfg.options
        self.participation_prob = np.asarray(
            per_client_values(ctx.cfg.sampling.participation_prob, ctx, purpose=STREAM_Q), dtype=float)
        self.lam = float(opt.soft_lambda)
        self.rho = float(opt.soft_rho)
        self.a_mode = opt.soft_a_penalty
        self.b_mode = opt.soft_b_penalty
        self.bytes_per_value = int(ctx.cfg.system.bytes_per_value)

    # ------------------------------------------------------------ sizes

    def upload_values(self, k: int) -> int:
        """Tensor elements one client uploads when it keeps k components per module, each
        counted at bytes_per_value (exactly what the loop counts from the payload)."""
        r = self.ctx.rank
        values = rank_payload_values(self.ctx.module_shapes, k)
        if k < r:
            values += len(self.ctx.module_shapes) * k * INDEX_BYTES // self.bytes_per_value
        if self.uploads_energy_profile:
            values += r
        return int(values)

    def upload_bits(self, k: int) -> float:
        return float(self.upload_values(k) * self.bytes_per_value * 8)

    def upload_bits_full(self) -> float:
        """Bits of a full rank-r factor update (what ctx.upload_s_hz is measured against)."""
        return float(rank_payload_values(self.ctx.module_shapes, self.ctx.rank) * self.bytes_per_value * 8)

    def plan(self) -> dict:
        from ..system import round_time_bound_s

        ctx = self.ctx
        n, r = ctx.num_clients, ctx.rank
        k = rank_count(self.rho, r)
        upload = ctx.upload_s_hz * self.upload_bits(k) / self.upload_bits_full()
        bound = round_time_bound_s(compute_model(ctx.cfg).time_s(ctx.compute_time_s, np.ones(n)), upload,
                                   self.participation_prob, ctx.cfg.system.bandwidth_hz, ctx.download_s)
        return plan_json(ctx, participation_prob=self.participation_prob, sketch_ratio=[1.0] * n, ranks=[r] * n,
                         expected_round_time_s=bound,
                         reconstruction="seed 002 SOFT/TSFA rebuilt from the abstract only; see docs/theory.md",
                         soft_lambda=self.lam, soft_rho=self.rho, keep_ranks=k,
                         penalty_modes={"A": self.a_mode, "B": self.b_mode})

    # ------------------------------------------------------------ round

    def round_keep(self, round_idx: int, sampled: np.ndarray) -> tuple[int, dict]:
        """Components kept per module this round, and extra metrics (TSFA decides here)."""
        return rank_count(self.rho, self.ctx.rank), {}

    def regularizer(self) -> OrthogonalityRegularizer | None:
        return orthogonality_regularizer(self.lam, self.a_mode, self.b_mode)

    def configure_round(self, round_idx: int, state: AdapterState) -> RoundConfig:
        sampled = sample_participants(self.ctx.rng(STREAM_SAMPLE, round_idx), self.participation_prob)
        k, info = self.round_keep(round_idx, sampled)
        reg = self.regularizer()
        upload = TopComponentsUpload(int(k), self.bytes_per_value, self.uploads_energy_profile)
        jobs = [ClientJob(client_id=int(i), start={n: (a.clone(), b.clone()) for n, (a, b) in state.items()},
                          scaling=self.ctx.base_scaling, compute_ratio=1.0, regularizer=reg, upload=upload)
                for i in sampled]
        return RoundConfig(jobs=jobs, broadcast_values=state_values(state), info=info)

    def decode(self, client_id: int, payload: Payload, state: AdapterState, weight: float) -> SparseComponents:
        r = self.ctx.rank
        modules = {}
        for name in state:
            key = f"{name}.idx"
            idx = decode_indices(payload[key]) if key in payload else np.arange(r, dtype=np.int64)
            modules[name] = (idx, payload[f"{name}.A"], payload[f"{name}.B"])
        return SparseComponents(client_id=client_id, weight=weight, modules=modules)

    def aggregate(self, round_idx, state, jobs, payloads) -> Aggregated:
        if not payloads:  # empty round: x unchanged (and no server-optimizer step)
            return Aggregated(state)
        p, q = self.ctx.data_share, self.participation_prob
        updates = [self.decode(i, payloads[i], state, float(p[i] / q[i])) for i in sorted(payloads)]
        return Aggregated(self.server_opt.apply(state, aggregate_components(state, updates)))
