"""The Python API: `from fedlora import run, compare, plan`.

Each takes a config (a YAML path, a dict shaped like one, or a RunConfig) and dotted
overrides, and returns what the CLI prints: `run` the run's result (result.json), `plan`
the plan a planned run starts with (plan.json's fields plus the clients), `compare` the
comparison's summary (summary.json). Bad input raises fedlora.config.InputError (the CLI
prints it as one line and exits 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from .config import InputError, RunConfig, apply_overrides, load_config, validate

def load(config: str | Path | dict | RunConfig, overrides: Sequence[str] = ()) -> RunConfig:
    """A validated RunConfig from a YAML path, a dict or a RunConfig, with dotted overrides."""
    if isinstance(config, RunConfig):
        return validate(apply_overrides(config.model_dump(mode="json"), list(overrides)), "config") \
            if overrides else config
    if isinstance(config, dict):
        return validate(apply_overrides(dict(config), list(overrides)), "config dict")
    if isinstance(config, (str, Path)):
        return load_config(config, list(overrides))
    raise InputError(f"config: expected a YAML path, a dict or a RunConfig, got {type(config).__name__}")


def _default_out(config, suffix: str = "") -> Path:
    stem = Path(config).stem if isinstance(config, (str, Path)) else "run"
    return Path("runs") / f"{stem}{suffix}"


def run(config: str | Path | dict | RunConfig, out: str | Path | None = None, *, overrides: Sequence[str] = (),
        resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Run the config's method into the run folder `out` (default runs/<config name>); returns
    the result (result.json: final accuracy per task, simulated time, time to target, bytes)."""
    from .quiet import quiet_libraries
    from .simulate import run as simulate_run

    cfg = load(config, overrides)
    quiet_libraries()
    return simulate_run(cfg, Path(out) if out is not None else _default_out(config), resume=resume,
                        overwrite=overwrite, progress=progress)


def plan(config: str | Path | dict | RunConfig, *, overrides: Sequence[str] = (), out: str | Path | None = None,
         progress: bool = False) -> dict:
    """The plan `proposed` starts with on this config: plan.json's fields (q_i, ranks, expected
    round time, ...) plus `clients` (data share, compute time, link) and `pre_run_planning_s`.
    With online planning (the default) the run refines it as it learns; with
    `planner.constants: pilots` the pilot runs go into `out` (default runs/<config>-plan)."""
    from .methods.proposed import Proposed
    from .pilot import check_planner_inputs, resolve_constants
    from .quiet import quiet_libraries
    from .setup import build_setup, clients_json

    cfg = load(config, overrides).model_copy(update={"method": "proposed"})  # the caller's config stays as it was
    check_planner_inputs(cfg)
    quiet_libraries()
    setup = build_setup(cfg)
    ctx = setup.method_context()
    ctx.constants, pre_run_s = resolve_constants(cfg, Path(out) if out is not None else _default_out(config, "-plan"),
                                                 setup=setup, progress=progress)
    method = Proposed(ctx)
    return {**method.plan(), "clients": clients_json(setup), "pre_run_planning_s": pre_run_s}


def compare(config: str | Path | dict | RunConfig, out: str | Path, *, methods: Iterable[str] | None = None,
            seeds: Sequence[int] | None = None, overrides: Sequence[str] = (), progress: bool = True) -> dict:
    """Run `methods` (default: all) on the same clients into `out` (one folder per method, and
    per seed with `seeds`); returns the summary (summary.json: time to target per method,
    speedups, final accuracy, bytes). Finished runs are skipped, interrupted ones resumed."""
    from .compare import compare as run_compare
    from .quiet import quiet_libraries

    cfg = load(config, overrides)
    quiet_libraries()
    run_compare(cfg, out, methods=methods, seeds=seeds, progress=progress)
    return json.loads((Path(out) / "summary.json").read_text())


__all__ = ["compare", "load", "plan", "run"]
