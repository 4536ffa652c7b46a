"""Layers point one way: train/ never imports eval/ (eval/ and data/ may use train/)."""

import ast

import pytest

from conftest import ROOT


def imported_modules(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize("path", sorted((ROOT / "train").glob("*.py")), ids=lambda p: p.name)
def test_train_never_imports_eval(path):
    assert not [m for m in imported_modules(path) if m == "sdkd.eval" or m.startswith("sdkd.eval.")]


def test_the_check_sees_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from sdkd.eval.pipeline import load_pipeline\n")
    assert "sdkd.eval.pipeline" in set(imported_modules(probe))
