"""The run folder module: atomic files, the metrics reader, the status rule, and a checkpoint
without pickles that refuses tampered or truncated files."""

import json

import numpy as np
import pytest
import torch

from fedlora.config import InputError
from fedlora.rundir import (first_difference, load_checkpoint, read_rows, run_status, save_checkpoint,
                            time_to_target, write_atomic)


def _state():
    return {"server_opt": {"step_count": 3, "moments": {"m.A.m": torch.arange(6.0).reshape(2, 3),
                                                        "m.A.v": torch.ones(2, 3, dtype=torch.float64)}},
            "online": {"estimator": {"energy": [1.5, None], "seen": [2, 0], "cross": 0.25},
                       "plan": {"participation_prob": [0.5, 1.0], "ranks": [4, 8], "objective": float("inf")}},
            "tsfa": {"profile": np.array([3.0, 2.0, 1.0]), "queue": np.float64(2.5)},
            "ranks": [np.int64(4), 2]}


def _save(out, state=None):
    save_checkpoint(out, adapter={"m.A": torch.zeros(2, 3), "m.B": torch.ones(3, 2)}, method_state=state or _state(),
                    base_delta={}, progress={"next_round": 4, "stop_reason": None})


def test_checkpoint_round_trip_without_pickles(tmp_path):
    _save(tmp_path)
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["adapter_state.safetensors", "method_state.json", "method_state.safetensors", "progress.json"]
    adapter, state, base, prog = load_checkpoint(tmp_path)
    assert torch.equal(adapter["m.B"], torch.ones(3, 2)) and base == {} and prog["next_round"] == 4
    moments = state["server_opt"]["moments"]
    assert torch.equal(moments["m.A.m"], torch.arange(6.0).reshape(2, 3)) and moments["m.A.v"].dtype == torch.float64
    assert state["online"]["estimator"] == {"energy": [1.5, None], "seen": [2, 0], "cross": 0.25}
    assert state["online"]["plan"]["objective"] == float("inf")
    np.testing.assert_array_equal(state["tsfa"]["profile"], [3.0, 2.0, 1.0])
    assert state["tsfa"]["queue"] == 2.5 and state["ranks"] == [4, 2]
    _save(tmp_path, {"x": 1})  # a second checkpoint replaces the first
    assert load_checkpoint(tmp_path)[1] == {"x": 1} and not (tmp_path / "checkpoint.old").exists()
    with pytest.raises(TypeError, match="object"):
        _save(tmp_path, {"x": object()})
    assert load_checkpoint(tmp_path)[1] == {"x": 1}  # a failed save leaves the last checkpoint


@pytest.mark.parametrize("damage", ["truncate", "json", "pickle", "missing"])
def test_damaged_checkpoint_is_refused_with_one_line(tmp_path, damage):
    _save(tmp_path)
    ck = tmp_path / "checkpoint"
    if damage == "truncate":
        data = (ck / "method_state.safetensors").read_bytes()
        (ck / "method_state.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "json":
        (ck / "method_state.json").write_text('{"server_opt": ')
    elif damage == "pickle":  # an older fedlora's method_state.pt: never unpickled
        (ck / "method_state.pt").write_bytes(b"\x80\x04anything")
    else:
        (ck / "adapter_state.safetensors").unlink()
    with pytest.raises(InputError) as e:
        load_checkpoint(tmp_path)
    assert "checkpoint cannot be read" in str(e.value) and "\n" not in str(e.value)


def test_no_checkpoint_and_crash_between_renames(tmp_path):
    assert load_checkpoint(tmp_path) is None
    _save(tmp_path)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # killed between the two renames
    assert load_checkpoint(tmp_path)[3]["next_round"] == 4


def test_read_rows_sorts_keeps_last_repeat_and_cuts(tmp_path):
    rows = [{"round": 0, "sim_time_s": 0.0}, {"round": 1, "sim_time_s": 5.0, "eval": {"a": 0.4}, "eval_mean": 0.4},
            {"round": 2, "sim_time_s": 9.0}, {"round": 1, "sim_time_s": 6.0, "eval": {"a": 0.5}, "eval_mean": 0.5}]
    write_atomic(tmp_path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    got = read_rows(tmp_path)
    assert [r["round"] for r in got] == [0, 1, 2] and got[1]["sim_time_s"] == 6.0
    assert [r["round"] for r in read_rows(tmp_path, before_round=2)] == [0, 1]
    assert time_to_target(got, 0.45) == 6.0 and time_to_target(got, {"a": 0.6}) is None
    (tmp_path / "metrics.jsonl").write_text('{"round": 0, "sim_time_s": 0}\n{"round": "x"}\n')
    with pytest.raises(InputError, match=r"metrics.jsonl: line 2: field 'round'"):
        read_rows(tmp_path)


def test_run_status_one_rule(tmp_path):
    cfg = "method: manual\nseed: 0\n"
    assert run_status(tmp_path / "absent", cfg) == "new"
    f = tmp_path / "run"
    f.mkdir()
    assert run_status(f, cfg) == "new"
    write_atomic(f / "config.yaml", cfg)
    assert run_status(f, cfg) == "restart"  # started, no checkpoint yet
    _save(f)
    assert run_status(f, cfg) == "resume"
    (f / "result.json").write_text("{}")
    assert run_status(f, cfg) == "finished"
    with pytest.raises(InputError, match="seed: 0 there, 1 now"):
        run_status(f, "method: manual\nseed: 1\n")
    # what is recorded is not what is trained: a folder made before `track` existed, or with
    # TensorBoard on, belongs to the same config with it off
    assert run_status(f, cfg + "track:\n  tensorboard: false\n") == "finished"
    with pytest.raises(InputError, match="seed: 0 there, 1 now"):
        run_status(f, "method: manual\nseed: 1\ntrack:\n  tensorboard: false\n")
    assert first_difference(f / "config.yaml", cfg) == "formatting"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a run folder"):
        run_status(other, cfg)


def test_recording_switches_do_not_make_another_setting():
    """Turning TensorBoard off keys the same setting (reference, targets) and the same pilots."""
    from fedlora.config import load_config
    from fedlora.pilot import pilot_key
    from fedlora.study import setting_key

    on = load_config(None, ["seed=3"])
    off = load_config(None, ["seed=3", "track.tensorboard=false"])
    assert setting_key(on) == setting_key(off) and pilot_key(on) == pilot_key(off)
    assert setting_key(on) != setting_key(load_config(None, ["train.lr=0.5"]))
