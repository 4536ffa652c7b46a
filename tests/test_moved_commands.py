"""The command paths that moved into rooms: each old path stops with one line naming the command that does its
work now (with the arguments given), exit code 2, whatever it is given."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT, run_script
from test_layers import is_entry_script

OLD = sorted(path.relative_to(ROOT).as_posix() for package in ("train", "data", "eval")
             for path in (ROOT / package).glob("*.py") if "moved(" in path.read_text())


def test_there_are_old_paths_to_check():
    assert {"train/students.py", "train/lora_io.py", "data/cache_latents.py"} <= set(OLD)


@pytest.mark.parametrize("old", OLD)
def test_an_old_path_names_its_new_command(old):
    result = run_script([sys.executable, old, "--config", "my config.yaml", "train.max_steps=5"], timeout=120)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    prefix = "error: this command moved: run python "
    assert line.startswith(prefix) and line.endswith(" --config 'my config.yaml' train.max_steps=5"), line
    new = ROOT / line.removeprefix(prefix).split()[0]
    assert new.is_file() and new != ROOT / old and is_entry_script(new)
