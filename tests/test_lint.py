"""The tree passes ruff with pyproject.toml's rules, so README's one test command (what CI runs) lints too."""

import subprocess
import sys

from conftest import ROOT


def ruff(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=cwd,
                          capture_output=True, text=True)


def test_ruff_finds_nothing_in_the_tree():
    result = ruff("--output-format", "concise")
    assert result.returncode == 0, result.stdout[-10000:] + result.stderr


def test_the_configured_rules_catch_what_they_are_for(tmp_path):
    # pyproject.toml's rules, not ruff's defaults: the line length, import order and blind excepts are ours.
    (tmp_path / "probe.py").write_text(
        "import sys\nimport os\n\n\n"
        "def f():\n    try:\n        return os.sep\n    except Exception:\n        return None\n\n\n"
        f"X = '{'x' * 120}'\n")
    result = ruff("--config", str(ROOT / "pyproject.toml"), "--output-format", "concise", "probe.py", cwd=tmp_path)
    found = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("probe.py:")}
    assert result.returncode == 1 and found == {"I001", "F401", "BLE001", "E501"}, result.stdout + result.stderr
