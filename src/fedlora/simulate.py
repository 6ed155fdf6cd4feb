"""Run one method on a config: `simulate.run(cfg, out)`, what `fedlora run`, compare, study
and the Flower server call.

config -> Setup (fedlora.setup) -> planner constants, before the loop (fedlora.pilot:
online, given numbers or pilot runs) -> the round loop (fedlora.loop) with the clients
trained in this process, or by whichever executor the caller passes (Flower nodes).
"""

from __future__ import annotations

from pathlib import Path

from . import loop
from .config import RunConfig
from .methods import get_method
from .pilot import check_planner_inputs, resolve_constants
from .setup import Setup


def run(cfg: RunConfig, out: Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        setup: Setup | None = None, stop_when=None, executor: loop.Executor | None = None) -> dict:
    """Run one method on a config into the run folder `out`; returns the result dict.

    `stop_when(rows)` (optional) ends the run after a round when it returns True.
    `executor` (optional) trains the clients elsewhere (default: in this process)."""
    if get_method(cfg.method).needs_constants:
        check_planner_inputs(cfg)  # cheap checks before data and model are loaded
    return loop.run(cfg, out, resume=resume, overwrite=overwrite, progress=progress, setup=setup,
                    stop_when=stop_when, executor=executor, planning=resolve_constants)


__all__ = ["run"]
