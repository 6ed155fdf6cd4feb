"""The fedlora ServerApp: reads the run config, runs FedLoraStrategy, writes the run folder.

On failure it writes OUT/flower_error.txt (one line) before re-raising, so launchers that
only see Flower's run status can report why.
"""

from __future__ import annotations

import traceback

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .common import load_run_config, resolve_path, setting

app = ServerApp()


def run_server(grid: Grid, run_config) -> dict:
    from .strategy import FedLoraStrategy

    out = resolve_path(str(setting(run_config, "out-dir")))
    try:
        cfg = load_run_config(run_config)
        strategy = FedLoraStrategy(cfg, out, round_timeout=float(setting(run_config, "round-timeout")),
                                   connect_timeout=float(setting(run_config, "connect-timeout")),
                                   overwrite=bool(setting(run_config, "overwrite")))
        strategy.start(grid)
        return strategy.result
    except BaseException as e:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "flower_error.txt").write_text(f"{e.__class__.__name__}: {e}\n{traceback.format_exc()}")
        except OSError:
            pass
        raise


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)


__all__ = ["app", "run_server"]
