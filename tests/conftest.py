"""Fixtures shared by several test files."""

import pytest

from fedlora import simulate


@pytest.fixture
def kill_in_round(monkeypatch):
    """kill_in_round(t): from now on a run is killed (KeyboardInterrupt) as round t starts
    training, after round t - 1's checkpoint; kill_in_round(None) lets runs go on again."""
    real = simulate.client_batches

    def install(t: int | None) -> None:
        def crash(setup, client, round_idx):
            if round_idx == t:
                raise KeyboardInterrupt("killed")
            return real(setup, client, round_idx)

        monkeypatch.setattr(simulate, "client_batches", real if t is None else crash)

    return install
