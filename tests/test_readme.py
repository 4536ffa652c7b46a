"""README.md opens with the two commands, and CI runs exactly its test command."""

import re

from conftest import ROOT


def commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_run_and_test_commands():
    run, test = commands()[:2]
    assert run.startswith("pip install torch==2.13.0 && pip install -e . && ")
    assert "train/kd.py --config configs/toy.yaml" in run
    assert test.startswith("pip install torch==2.13.0 && ") and "pytest" in test


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands()[1] in ci_lines
