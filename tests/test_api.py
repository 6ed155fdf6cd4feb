"""The Python API: the README's example runs as written, and the API returns what the CLI writes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    return blocks[0]


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "smoke.yaml", tmp_path / "configs" / "smoke.yaml")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_example(), "README.md", "exec"), {})
    out = tmp_path / "runs" / "api-smoke"
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "proposed" and result["rounds"] == 2
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].split() == [str(result["final_eval_mean"]), str(result["sim_time_s"]),
                                   str(result["upload_bytes"])]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["online"]["plans"][0]["round"] == 1


def test_config_as_dict_and_bad_input():
    import yaml

    from fedlora import load
    from fedlora.config import InputError

    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg = load(raw, ["train.rounds=7"])
    assert cfg.train.rounds == 7 and raw["train"]["rounds"] != 7  # the dict is not changed
    assert load(cfg) is cfg and load(cfg, ["seed=3"]).seed == 3 and cfg.seed == 0
    with pytest.raises(InputError, match="train.rounds"):
        load(raw, ["train.rounds=-1"])
    with pytest.raises(InputError, match="expected a YAML path"):
        load(42)
