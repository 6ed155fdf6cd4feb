"""Config validation: every bad value gives one line naming file, field and value."""

from pathlib import Path

import pytest
import yaml

from fedlora.config import InputError, apply_overrides, dump_config, load_config, validate


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def error_of(tmp_path, data, overrides=()):
    with pytest.raises(InputError) as e:
        load_config(write(tmp_path, data), list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_roundtrip(tmp_path):
    cfg = load_config(write(tmp_path, {"train": {"rounds": 3}}))
    assert cfg.train.rounds == 3 and cfg.lora.rank == 8
    again = validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["train.rounds=5", "system.bandwidth_hz=2e6",
                                           "sampling.participation_prob=[0.5, 1.0]", "data.num_clients=2"])
    assert cfg.train.rounds == 5 and cfg.system.bandwidth_hz == 2e6
    assert cfg.sampling.participation_prob == [0.5, 1.0]
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize("data,overrides,needles", [
    ({"trian": {}}, [], ["unknown key", "trian"]),
    ({"train": {"rounds": 2, "epochs": 3}}, [], ["unknown key", "train.epochs"]),
    ({"sampling": {"participation_prob": 1.5}}, [], ["sampling.participation_prob", "1.5"]),
    ({"sampling": {"participation_prob": 0}}, [], ["sampling.participation_prob", "0"]),
    ({"sketch": {"ratio": -0.1}}, [], ["sketch.ratio", "-0.1"]),
    ({"lora": {"rank": 0}}, [], ["lora.rank", "0"]),
    ({"data": {"num_clients": 3}, "sampling": {"participation_prob": [0.5, 0.5]}}, [],
     ["participation_prob has 2 values for 3 clients"]),
    ({}, ["train.lr=-1"], ["train.lr", "-1"]),
    ({}, ["train.target_accuracy=1.5"], ["train.target_accuracy", "1.5"]),
    ({}, ["train.target_accuracy={ARC-Easy: 0.4, mean: 0.35}"], ["train.target_accuracy", "give a number"]),
    ({"system": {"profiles": {"source": "file"}}}, [], ["system.profiles.file"]),
])
def test_bad_values(tmp_path, data, overrides, needles):
    msg = error_of(tmp_path, data, overrides)
    assert "c.yaml" in msg
    for n in needles:
        assert n in msg, msg


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="top level must be a mapping"):
        load_config(lst)
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, {}), ["train.rounds"])


def test_a_field_added_later_is_left_out_at_its_old_behaviour():
    """config.ADDED_LATER: data.dirichlet_draw at per_task (what every earlier config did) is
    not dumped, so a setting's key and an older run folder's config.yaml stay the same; any
    other value is dumped and round-trips."""
    from fedlora.rundir import same_training
    from fedlora.study import setting_key

    old = load_config(None)
    assert "dirichlet_draw" not in dump_config(old)
    saved_before = yaml.safe_load(dump_config(old))  # what a folder written before the field holds
    assert "dirichlet_draw" not in saved_before["data"]
    assert same_training(yaml.safe_dump(saved_before, sort_keys=False), dump_config(old))
    new = load_config(None, ["data.dirichlet_draw=per_client"])
    assert "dirichlet_draw: per_client" in dump_config(new)
    assert validate(yaml.safe_load(dump_config(new))).data.dirichlet_draw == "per_client"
    assert not same_training(dump_config(old), dump_config(new))
    assert setting_key(old) != setting_key(new)
    # the stored 10-client studies (results/history/wave2/settings/<key>) are still keyed by their config
    root = Path(__file__).resolve().parents[1]
    wave2 = load_config(root / "experiments/history/wave2/base.yaml")
    assert (root / "results/history/wave2/settings" / setting_key(wave2)).is_dir()
    # and the 50-client studies' reference and targets by theirs
    assert (root / "results/experiments/settings" / setting_key(load_config(root / "experiments/base.yaml"))
            / "targets.json").is_file()
