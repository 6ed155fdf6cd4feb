"""Federated LoRA methods, one class per file; `METHODS` maps CLI names to classes."""

from __future__ import annotations

from .base import ClientJob, Method, MethodContext, RoundConfig
from .manual import IndependentSketch

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (IndependentSketch,)}


def get_method(name: str) -> type[Method]:
    from ..config import InputError

    if name not in METHODS:
        raise InputError(f"field 'method': value '{name}' is not one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "ClientJob", "Method", "MethodContext", "RoundConfig", "get_method"]
