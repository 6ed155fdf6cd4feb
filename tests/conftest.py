"""Fixtures shared by several test files."""

import json

import pytest

from fedlora import setup as setup_mod
from fedlora import simulate


def metric_rows(out) -> list[dict]:
    """metrics.jsonl of a run folder, without the (machine-dependent) cpu_time_s."""
    return [{k: v for k, v in json.loads(x).items() if k != "cpu_time_s"}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def killed_then_resumed(monkeypatch):
    """killed_then_resumed(cfg, out, setup, at_round): run into `out`, killed (KeyboardInterrupt)
    as round `at_round` starts training, after round at_round - 1's checkpoint; then resume it
    to the end. Returns the metric rows the killed run had left."""
    real = setup_mod.client_batches

    def run(cfg, out, setup, at_round: int) -> list[dict]:
        def crash(s, client, round_idx):
            if round_idx == at_round:
                raise KeyboardInterrupt("killed")
            return real(s, client, round_idx)

        monkeypatch.setattr(setup_mod, "client_batches", crash)
        with pytest.raises(KeyboardInterrupt):
            simulate.run(cfg, out, setup=setup, progress=False)
        assert not (out / "result.json").exists()  # killed: no result
        left = metric_rows(out)
        monkeypatch.setattr(setup_mod, "client_batches", real)
        simulate.run(cfg, out, setup=setup, progress=False, resume=True)
        return left

    return run
