"""`fedlora` command line: a thin typer layer over config, simulate, planner and report.

Bad input exits with code 2 and one line on stderr naming file, field and value.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .config import InputError, load_config
from .quiet import quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated LoRA fine-tuning over heterogeneous wireless networks.")

OverridesArg = typer.Argument(None, help="Dotted overrides, e.g. train.rounds=5 system.bandwidth_hz=1e6")


def user_errors(fn):
    """Turn user-input errors into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)

    return wrapper


@app.command()
@user_errors
def run(config: Path = typer.Argument(..., help="YAML run config"),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="run folder (default runs/<config name>)"),
        resume: bool = typer.Option(False, "--resume", help="continue a stopped run in OUT, or a finished one "
                                    "with a larger train.rounds or train.max_sim_time_s"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
        overrides: Optional[list[str]] = OverridesArg):
    """Fine-tune one LoRA adapter federatedly on a simulated wireless clock."""
    from .api import run as run_config

    out = out or Path("runs") / config.stem
    result = run_config(config, out, overrides=overrides or [], resume=resume, overwrite=overwrite,
                        progress=not quiet)
    _print_result(result, out)


def _print_result(result: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['method']} -> {out}", show_header=True)
    table.add_column("task")
    table.add_column("final accuracy", justify="right")
    for task, acc in result["final_eval"].items():
        table.add_row(task, f"{acc:.3f}")
    table.add_row("mean", f"{result['final_eval_mean']:.3f}")
    console = Console()
    console.print(table)
    ttt = result.get("time_to_target_s")
    console.print(f"rounds {result['rounds']}  simulated time {result['sim_time_s']:.1f} s  "
                  f"cpu time {result['cpu_time_s']:.1f} s  uploaded {result['upload_bytes'] / 1e6:.2f} MB  "
                  f"stop: {result['stop_reason']}"
                  + ("" if ttt is None and result.get("stop_reason") != "target_accuracy"
                     else f"  time to target {ttt:.1f} s" if ttt is not None else ""))


@app.command()
@user_errors
def plan(config: Path = typer.Argument(..., help="YAML run config"),
         as_json: bool = typer.Option(False, "--json", help="print plan.json fields plus `clients`"),
         out: Optional[Path] = typer.Option(None, "-o", "--out", help="where pilot runs go (planner.constants: pilots)"),
         overrides: Optional[list[str]] = OverridesArg):
    """The plan a `proposed` run starts with: q_i and ranks k_i for every client (Algorithm 2).
    With online planning (the default) that is the plan made before any update is seen (or the
    warm-up, with planner.online.warmup_rounds); the run refines it as it learns."""
    from .api import plan as make_plan

    cfg = load_config(config, overrides or [])
    result = make_plan(cfg, out=out or Path("runs") / f"{config.stem}-plan", progress=not as_json)
    clients, pre_run_s = result.pop("clients"), result.pop("pre_run_planning_s")
    online = result["constants"] == "online"
    if as_json:
        typer.echo(json.dumps({**result, "clients": clients, "pre_run_planning_s": pre_run_s}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan for {config} ({len(clients)} clients, B = {cfg.system.bandwidth_hz:g} Hz)")
    for col in ("client", "data share", "compute s", "link b/s/Hz", "q", "rank", "s"):
        table.add_column(col, justify="right")
    for c, q, k, s in zip(clients, result["participation_prob"], result["ranks"], result["sketch_ratio"]):
        table.add_row(str(c["id"]), f"{c['data_share']:.3f}", f"{c['compute_time_s']:.2f}",
                      f"{c['bits_per_s_per_hz']:.2f}", f"{q:.3f}", str(k), f"{s:.3f}")
    console = Console()
    console.print(table)
    console.print(f"expected participants {result['expected_participants']:.2f}  "
                  f"expected round time ({'Theorem-2 bound, uploads at the share not hidden behind compute' if online else 'Theorem-2 bound'}) "
                  f"{result['expected_round_time_s']:.3f} s")
    if online:
        from .methods.proposed import PARTICIPATION_STEP

        oc = cfg.planner.online
        start = (f"rounds 1-{oc.warmup_rounds} run this warm-up (every client, full rank)" if oc.warmup_rounds else
                 "round 1 runs this plan, made before any update was seen (each client's update taken as "
                 "orthogonal to the others'), and rounds 2 and 3 replace it as the first measurements come in")
        console.print(f"online planning: {start}; from then on the plan is computed from the update energies and the "
                      f"step's curvature cost the server measures and refined every {oc.replan_every} rounds or "
                      f"when its predicted rounds move by {oc.replan_tolerance:.0%} (q >= {oc.min_participation:g} for every client, and "
                      f"no re-plan divides a q by more than {PARTICIPATION_STEP:g}); each plan "
                      f"charges {cfg.planner.plan_time_s:g} s of server time")
    else:
        console.print(f"objective {result['objective']:.4g}  constants {result['constants']}  "
                      f"planning before round 1: {pre_run_s:.1f} simulated s")


@app.command()
@user_errors
def pilot(config: Path = typer.Argument(..., help="YAML run config with planner.pilot settings"),
          out: Optional[Path] = typer.Option(None, "-o", "--out", help="pilot folder (default runs/<config>-pilot)"),
          quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
          overrides: Optional[list[str]] = OverridesArg):
    """Estimate the bound constants (alpha, beta, gamma, delta) from short pilot runs."""
    cfg = load_config(config, overrides or [])
    quiet_libraries()
    from .pilot import run_pilots

    report = run_pilots(cfg, out or Path("runs") / f"{config.stem}-pilot", progress=not quiet)
    typer.echo(json.dumps(report, indent=1))


@app.command()
def methods():
    """List the federated LoRA methods."""
    from .methods import METHODS

    for name, cls in sorted(METHODS.items()):
        typer.echo(f"{name:16s} {cls.summary}")


@app.command()
@user_errors
def compare(config: Path = typer.Argument(..., help="YAML run config shared by every method"),
            out: Optional[Path] = typer.Option(None, "-o", "--out",
                                               help="comparison folder (default runs/<config name>-compare)"),
            methods: Optional[str] = typer.Option(None, "--methods", help="a,b,c (default: all registered)"),
            seeds: Optional[str] = typer.Option(None, "--seeds", help="0,1,2: every method once per seed"),
            target: Optional[str] = typer.Option(None, "--target", help="report target: 0.6 or TASK=ACC,TASK=ACC"),
            baseline: Optional[str] = typer.Option(None, "--baseline", help="report speedups against this method"),
            quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
            overrides: Optional[list[str]] = OverridesArg):
    """Run several methods on the same clients (one subfolder each, resumable) and write the report
    (with two or more seeds: the first method's speedups over each other, paired by seed, tested)."""
    from .compare import compare as run_compare, parse_names, parse_seeds
    from .report import parse_target

    cfg = load_config(config, overrides or [])
    names, seed_list = parse_names(methods), parse_seeds(seeds)
    tgt = parse_target(target) if target is not None else None
    quiet_libraries()
    out = out or Path("runs") / f"{config.stem}-compare"
    log = (lambda msg: None) if quiet else (lambda msg: typer.echo(msg, err=True))
    started = time.perf_counter()
    run_compare(cfg, out, names, seed_list, progress=not quiet, log=log, target=tgt, baseline=baseline)
    typer.echo((out / "summary.md").read_text())
    typer.echo(f"{out}: summary.md, summary.json, plots; wall time {time.perf_counter() - started:.0f} s")


@app.command()
@user_errors
def study(studies: list[Path] = typer.Argument(..., help="study files (experiments/*.yaml)"),
          out: Path = typer.Option(Path("runs/experiments"), "-o", "--out", help="study folder (resumable)"),
          workers: int = typer.Option(1, "--workers", help="runs in parallel (worker processes)"),
          seeds: Optional[str] = typer.Option(None, "--seeds", help="0,1: replace every study's seeds"),
          methods: Optional[str] = typer.Option(None, "--methods", help="fslora,hetlora: run only these method "
                                                "labels (default: all; a later call adds the others)"),
          quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
          report_only: bool = typer.Option(False, "--report-only", help="run nothing: write the reports of what OUT "
                                           "holds now (runs still going are flagged unfinished)"),
          overrides: Optional[list[str]] = typer.Option(None, "--set", help="override for every run, e.g. train.rounds=5")):
    """Run studies: reference, targets fixed from it, pilots, then every method and seed; write the reports."""
    from .compare import parse_names, parse_seeds
    from .study import run_studies

    if workers < 1:
        raise InputError(f"--workers: value {workers} must be >= 1")
    quiet_libraries()
    log = (lambda msg: None) if quiet else (lambda msg: typer.echo(msg, err=True))
    try:
        summaries = run_studies(studies, out, workers=workers, seeds=parse_seeds(seeds), overrides=overrides or [],
                                methods=parse_names(methods), progress=not quiet, log=log,
                                report_only=report_only)
    except RuntimeError as e:  # some runs failed: the others finished and are reported
        typer.echo(str(e), err=True)
        raise typer.Exit(1)
    for name, summary in summaries.items():
        typer.echo(f"## {name}\n\n{summary['markdown']}")


@app.command()
@user_errors
def report(outs: list[Path] = typer.Argument(..., help="run folders, or folders holding run folders"),
           target: Optional[str] = typer.Option(None, "--target", help="0.6 (mean and each task) or TASK=ACC,TASK=ACC[,mean=ACC]"),
           out: Optional[Path] = typer.Option(None, "-o", "--out", help="where to write (default: the first OUT)"),
           baseline: Optional[str] = typer.Option(None, "--baseline", help="speedups against this method"),
           focus: Optional[str] = typer.Option(None, "--focus", help="add a table: this method's speedup over each other, per seed"),
           at: Optional[str] = typer.Option(None, "--at", help="SECONDS[,SECONDS...]: the mean accuracy at these times "
                                            "(with --focus: paired differences)")):
    """Summarize run folders: summary.json, summary.md, accuracy_vs_time.png, bytes_vs_accuracy.png."""
    from .report import report as build_report

    summary = build_report(outs, out=out, target=target, baseline=baseline, focus=focus, at_s=_seconds(at))
    typer.echo(summary["markdown"])
    typer.echo(f"wrote {', '.join(summary['files'])}", err=True)


def _seconds(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"--at '{text}': expected seconds separated by commas, e.g. 180,360") from None


@app.command("flower-demo")
@user_errors
def flower_demo(config: Path = typer.Argument(..., help="YAML run config"),
                out: Path = typer.Option(..., "-o", "--out", help="run folder (must not exist or be empty)"),
                nodes: Optional[int] = typer.Option(None, "--nodes", help="SuperNodes (default data.num_clients)"),
                round_timeout: float = typer.Option(600.0, "--round-timeout", help="seconds per round"),
                insecure: bool = typer.Option(False, "--insecure",
                                              help="no TLS, no SuperNode authentication (any local process may join)"),
                overrides: Optional[list[str]] = OverridesArg):
    """Run CONFIG on a local Flower deployment (SuperLink + one SuperNode per client on 127.0.0.1),
    with TLS and SuperNode authentication unless --insecure."""
    quiet_libraries()
    from .flower.deploy import demo

    result = demo(config, out, nodes=nodes, overrides=overrides or [], round_timeout=round_timeout,
                  insecure=insecure)
    _print_result(result, out)
    missing = {k: v for k, v in result.get("missing_replies", {}).items() if v}
    typer.echo(f"missing replies per client: {missing or 'none'}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted; continue with --resume", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
