"""Federated LoRA methods, one class per file; `METHODS` maps CLI names to classes."""

from __future__ import annotations

from .base import ClientJob, Method, MethodContext, RoundConfig
from .manual import IndependentSketch

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (IndependentSketch,)}
from .fslora import FSLoRA; METHODS[FSLoRA.name] = FSLoRA  # noqa: E402,E702  FSLoRA (Fang et al. 2025)
from .hetlora import HetLoRA; METHODS[HetLoRA.name] = HetLoRA  # noqa: E402,E702  HetLoRA (Cho et al. 2024)
from .flora import FLoRA; METHODS[FLoRA.name] = FLoRA  # noqa: E402,E702  FLoRA / FedStackLoRA (Wang et al. 2024)
from .flexlora import FlexLoRA; METHODS[FlexLoRA.name] = FlexLoRA  # noqa: E402,E702  FlexLoRA (Bai et al. 2024)
from .sampling_baselines import SampleFull; METHODS[SampleFull.name] = SampleFull  # noqa: E402,E702  seed 001 VI-A
from .sampling_baselines import SampleFixed; METHODS[SampleFixed.name] = SampleFixed  # noqa: E402,E702  seed 001 VI-A
from .sampling_baselines import SampleUniform; METHODS[SampleUniform.name] = SampleUniform  # noqa: E402,E702  seed 001 VI-A
from .sampling_baselines import SampleWeighted; METHODS[SampleWeighted.name] = SampleWeighted  # noqa: E402,E702  VI-A
from .rank_baselines import RankFull; METHODS[RankFull.name] = RankFull  # noqa: E402,E702  seed 001 VI-B
from .rank_baselines import RankNormal; METHODS[RankNormal.name] = RankNormal  # noqa: E402,E702  seed 001 VI-B
from .rank_baselines import RankUniform; METHODS[RankUniform.name] = RankUniform  # noqa: E402,E702  seed 001 VI-B
from .soft import Soft; METHODS[Soft.name] = Soft  # noqa: E402,E702  seed 002 SOFT (reconstructed)
from .proposed import Proposed; METHODS[Proposed.name] = Proposed  # noqa: E402,E702  seed 001 Algorithm 1+2
from .tsfa import Tsfa; METHODS[Tsfa.name] = Tsfa  # noqa: E402,E702  seed 002 TSFA (reconstructed)


def get_method(name: str) -> type[Method]:
    from ..config import InputError

    if name not in METHODS:
        raise InputError(f"field 'method': value '{name}' is not one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "ClientJob", "Method", "MethodContext", "RoundConfig", "get_method"]
