"""Every command the README shows is one the tool knows: `make` targets exist, `fedlora`
subcommands and their options are registered, config files exist, and their dotted
overrides validate against the config (so a reader who copies a line gets no error from us).
The Python example runs in tests/test_api.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer

from fedlora.cli import app
from fedlora.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The README's commands, and the Makefile's own fedlora lines (what `make demo` runs)."""
    text = (ROOT / "README.md").read_text()
    lines = [m.group(1) for m in re.finditer(r"^ {4}((?:fedlora|make) [^\n]*)$", text, flags=re.M)]
    inline = re.findall(r"`((?:fedlora|make) [^`]+)`", text)
    recipes = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    made = [m.group(1) for m in re.finditer(r"\$\(VENV\)/bin/(fedlora [^\n]*)", recipes)]
    return [c.split("#")[0].strip() for c in lines + inline + made]


def test_readme_commands_are_known():
    commands = readme_commands()
    assert len(commands) >= 10 and any(c.startswith("fedlora compare configs/demo.yaml") for c in commands)
    group = typer.main.get_command(app)
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for line in commands:
        words = shlex.split(line)
        if words[0] == "make":
            assert words[1] in targets, line
            continue
        cmd = group.commands.get(words[1])
        assert cmd is not None, f"unknown subcommand: {line}"
        options = {o: p for p in cmd.params for o in getattr(p, "opts", [])}
        args, rest = [], iter(words[2:])
        for w in rest:
            if w.startswith("-"):
                opt = options.get(w.split("=")[0])
                assert opt is not None, f"unknown option {w}: {line}"
                if not opt.is_flag and "=" not in w:
                    next(rest)  # the option's value
            else:
                args.append(w)
        files = [w for w in args if w.endswith(".yaml")]
        for f in files:
            assert (ROOT / f).is_file(), f"missing file {f}: {line}"
        overrides = [w for w in args if "=" in w]
        if files and words[1] in ("run", "plan", "compare", "pilot", "flower-demo"):
            load_config(ROOT / files[0], overrides)  # raises InputError on a bad key or value
