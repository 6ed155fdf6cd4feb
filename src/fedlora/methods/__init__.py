"""Federated LoRA methods, one class per file; `METHODS` maps CLI names to classes."""

from __future__ import annotations

from .base import ClientJob, Method, MethodContext, RoundConfig
from .flexlora import FlexLoRA
from .flora import FLoRA
from .fslora import FSLoRA
from .hetlora import HetLoRA
from .hetlora_rank_avg import HetLoRARankAverage
from .manual import IndependentSketch
from .planned_ablations import ProposedQ, ProposedS
from .proposed import Proposed
from .relaxed import ProposedRelaxed, ProposedSRelaxed
from .rank_baselines import RankFull, RankNormal, RankUniform
from .sampling_baselines import SampleFixed, SampleFull, SampleUniform, SampleWeighted
from .soft import Soft
from .tsfa import Tsfa

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    Proposed, IndependentSketch,  # seed 001: Algorithm 1 + 2, and Algorithm 1 with q, s given
    FSLoRA, HetLoRA, FLoRA, FlexLoRA,  # heterogeneous-rank federated LoRA baselines
    HetLoRARankAverage,  # a later variant of HetLoRA's aggregation (per-rank average), labelled as such
    ProposedQ, ProposedS,  # seed 001: the planner's q half and s half alone (Figs. 2, 3)
    ProposedRelaxed, ProposedSRelaxed,  # the same planners, Appendix-C bound relaxed for large clients (ours)
    SampleFull, SampleFixed, SampleUniform, SampleWeighted,  # seed 001 section VI-A
    RankFull, RankNormal, RankUniform,  # seed 001 section VI-B
    Soft, Tsfa,  # seed 002 (reconstructed)
)}


def get_method(name: str) -> type[Method]:
    from ..config import InputError

    if name not in METHODS:
        raise InputError(f"field 'method': value '{name}' is not one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "ClientJob", "Method", "MethodContext", "RoundConfig", "get_method"]
