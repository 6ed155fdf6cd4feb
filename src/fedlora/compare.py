"""Run several methods on the same clients and write the comparison report.

`compare(cfg, out, methods, seeds)` runs every method (and seed) into its own run folder:
OUT/<method> without seeds, OUT/<method>/seed<k> with them. The expensive setup (data
partition, client profiles, model) is built once per seed and shared by every method, so
the methods see the same clients. A folder with result.json is skipped, one with a
checkpoint is resumed; then `report.report([OUT])` writes summary.json, summary.md and plots.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .config import InputError, RunConfig, dump_config
from .rundir import run_status


def parse_names(text: str | None) -> list[str] | None:
    """'a,b , c' -> ['a', 'b', 'c']; None or '' or 'all' -> None (every registered method)."""
    if text is None or text.strip() in ("", "all"):
        return None
    names = [t.strip() for t in text.split(",")]
    if any(not t for t in names):
        raise InputError(f"--methods '{text}': empty name (expected a,b,c)")
    return names


def parse_seeds(text: str | None) -> list[int] | None:
    """'0,1,2' -> [0, 1, 2]; None -> None (the config's seed, no seed subfolders)."""
    if text is None:
        return None
    out: list[int] = []
    for part in text.split(","):
        try:
            seed = int(part.strip())
        except ValueError:
            raise InputError(f"--seeds '{text}': '{part.strip()}' is not an integer (expected e.g. 0,1,2)") from None
        if seed < 0:
            raise InputError(f"--seeds '{text}': seed {seed} must be >= 0")
        if seed not in out:
            out.append(seed)
    return out


def resolve_methods(methods: Iterable[str] | None) -> list[str]:
    """Validated, de-duplicated method names in the given order; None: all registered, sorted."""
    from .methods import METHODS

    if methods is None:
        return sorted(METHODS)
    names: list[str] = []
    for m in methods:
        if m not in METHODS:
            raise InputError(f"--methods: unknown method '{m}' (known: {', '.join(sorted(METHODS))})")
        if m not in names:
            names.append(m)
    if not names:
        raise InputError("--methods: no method given")
    return names


@dataclasses.dataclass
class Job:
    method: str
    seed: int
    cfg: RunConfig
    folder: Path
    state: str  # "finished" (skip), "resume", "restart" (partial folder, no checkpoint), "new"


def plan_jobs(cfg: RunConfig, out: Path, methods: Sequence[str], seeds: Sequence[int] | None) -> list[Job]:
    """The run folders of a comparison and what to do with each; raises InputError before any work."""
    jobs = []
    for seed in (seeds if seeds is not None else [cfg.seed]):
        for m in methods:
            c = cfg.model_copy(deep=True)
            c.method = m
            c.seed = seed
            folder = out / m if seeds is None else out / m / f"seed{seed}"
            if seeds is not None and (out / m / "metrics.jsonl").exists():
                raise InputError(f"{out / m}: holds a single run (made without --seeds); use another -o")
            jobs.append(Job(m, seed, c, folder, run_status(folder, dump_config(c))))
    return jobs


def compare(cfg: RunConfig, out: str | Path, methods: Iterable[str] | None = None, seeds: Sequence[int] | None = None,
            *, progress: bool = True, log: Callable[[str], None] | None = None, target=None,
            baseline: str | None = None, write_report: bool = True) -> list[Path]:
    """Run `methods` (default: all registered) on the same clients into OUT; returns the run folders.

    With `seeds`, every method runs once per seed into OUT/<method>/seed<k>; the setup is built
    once per seed. Finished folders are skipped, interrupted ones resumed. Then the report
    (summary.json, summary.md, plots) is written into OUT, unless write_report is False; with
    two or more seeds it adds the first method's paired speedups and test (report --focus).
    """
    from . import simulate
    from .report import report
    from .setup import build_setup

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    names = resolve_methods(methods)
    if baseline is not None and write_report and baseline not in names and not (out / baseline).is_dir():
        raise InputError(f"--baseline '{baseline}': not among the compared methods ({', '.join(names)})")
    if seeds is not None:
        seeds = list(dict.fromkeys(int(s) for s in seeds))
        if not seeds:
            raise InputError("--seeds: no seed given")
    if log is None:
        def log(msg: str) -> None:
            if progress:
                print(msg, file=sys.stderr, flush=True)

    jobs = plan_jobs(cfg, out, names, seeds)
    out.mkdir(parents=True, exist_ok=True)
    total = len(jobs)
    setup = None
    setup_seed = None
    for k, job in enumerate(jobs, 1):
        tag = f"[{k}/{total}] {job.method}" + (f" seed {job.seed}" if seeds is not None else "")
        if job.state == "finished":
            log(f"{tag}: skipped, finished ({job.folder})")
            continue
        if setup_seed != job.seed:  # the previous seed's frozen-block cache serves the next
            caches = None if setup is None else setup.engine.scorer.caches()
            setup = None  # free the previous seed's model before building the next
            setup = build_setup(job.cfg, caches=caches)
            setup_seed = job.seed
        verb = {"resume": "resuming", "restart": "restarting", "new": "running"}[job.state]
        log(f"{tag}: {verb} -> {job.folder}")
        # one setup per seed: same partition, profiles and model for every method (run()
        # swaps in the method's config and resets or reloads merged base deltas itself)
        simulate.run(job.cfg, job.folder, resume=job.state == "resume", overwrite=job.state == "restart",
                     progress=progress, setup=setup)
    if write_report:
        # several seeds: the first method's speedup over each other, paired by seed, with its test
        focus = names[0] if seeds is not None and len(seeds) > 1 else None
        report([out], target=target, baseline=baseline, focus=focus)
    return [j.folder for j in jobs]


__all__ = ["compare", "plan_jobs", "parse_names", "parse_seeds", "resolve_methods", "Job"]
