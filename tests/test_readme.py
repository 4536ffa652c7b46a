"""README.md opens with the two commands, and CI (and docs/testing.md) give exactly its test command."""

import re

from conftest import ROOT

VENV = "python3 -m venv .venv && . .venv/bin/activate && "
INSTALL = "pip install torch==2.13.0 && pip install -c constraints.txt -e "


def commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_run_and_test_commands():
    run, test = commands()[:2]
    readme = (ROOT / "README.md").read_text()
    assert readme.index(test) < readme.index("\n## ")  # both before the first section
    assert run.startswith(VENV + INSTALL + ". && ")
    assert run.endswith("train/kd.py --config configs/toy.yaml")
    assert test.startswith(VENV + INSTALL + '".[dev]" && ') and "pytest" in test


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands()[1] in ci_lines
    # The venv is removed first, so a run on a used checkout sees what a newcomer sees.
    assert ci_lines.index("rm -rf .venv") < ci_lines.index(commands()[1])


def test_testing_page_shows_the_readme_test_command():
    page = (ROOT / "docs" / "testing.md").read_text()
    assert re.findall(r"```bash\n(.+?)\n```", page)[0] == commands()[1]


def test_constraints_pin_every_package_exactly_and_agree_with_pyproject():
    """The known-good set pins each package once, exactly, and lies inside pyproject's ranges."""
    import tomllib
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", line
            assert req.name.lower() not in pins, f"{req.name} pinned twice"
            pins[req.name.lower().replace("_", "-")] = spec[0].version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = project["dependencies"] + project["optional-dependencies"]["dev"]
    for line in required:
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]} outside {req.specifier}"
