"""`fedlora` command line: a thin typer layer over config, simulate, planner and report.

Bad input exits with code 2 and one line on stderr naming file, field and value.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .config import InputError, load_config

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


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@app.command()
@user_errors
def run(config: Path = typer.Argument(..., help="YAML run config"),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="run folder (default runs/<config name>)"),
        resume: bool = typer.Option(False, "--resume", help="continue a stopped run in OUT"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
        overrides: Optional[list[str]] = OverridesArg):
    """Fine-tune one LoRA adapter federatedly on a simulated wireless clock."""
    cfg = load_config(config, overrides or [])
    _quiet_libraries()
    from .simulate import run as run_sim

    out = out or Path("runs") / config.stem
    result = run_sim(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet)
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
def methods():
    """List the federated LoRA methods."""
    from .methods import METHODS

    for name, cls in sorted(METHODS.items()):
        typer.echo(f"{name:16s} {cls.summary}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted; continue with --resume", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
