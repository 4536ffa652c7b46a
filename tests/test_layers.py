"""Layers point one way: cli < data < train < eval, and no module imports an entry script.

A module of one package imports sdkd modules only from its own package or from packages to its left
(cli imports none of the others; data imports cli; train imports cli and data; eval imports all), so
train/ never imports eval/ and no two packages import each other. An entry script (a file with an
`if __name__ == "__main__":` block: a command users run) is imported by no module, not even another
entry script; what two commands share lives in a library module. Every import counts, also one inside
a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

LAYERS = ("cli", "data", "train", "eval")  # a package may import only itself and those to its left
FILES = sorted(path for package in LAYERS for path in (ROOT / package).glob("*.py"))


def _relative_base(path: Path, level: int) -> list[str]:
    """`from .x import y` in PACKAGE/FILE.py: level 1 is sdkd.PACKAGE, level 2 is sdkd (0: absolute)."""
    return ["sdkd", path.parent.name][:3 - level] if level else []


def _module_file(module: str) -> Path | None:
    """The repository file of an sdkd module name (sdkd.train.students -> train/students.py), if any."""
    parts = module.split(".")
    if parts[0] != "sdkd" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    folder = ROOT / parts[1]
    if len(parts) == 2:
        return folder / "__init__.py"
    file = folder.joinpath(*parts[2:-1], parts[-1] + ".py")
    return file if file.is_file() else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of the file, also inside functions; `from sdkd.train import x`
    names the submodule sdkd.train.x when x is one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*_relative_base(path, node.level), *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if _module_file(sub) is not None else base))
    return sorted(set(found))


def is_entry_script(path: Path) -> bool:
    """Whether the file has a module-level `if __name__ == "__main__":` block."""
    def main_test(test) -> bool:
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
            return False
        sides = [test.left, test.comparators[0]]
        return (any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
                and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))

    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(node, ast.If) and main_test(node.test) for node in tree.body)


def layer_violations(path: Path) -> list[str]:
    """The file's sdkd imports that go to a package to its right (or to no package of the four)."""
    own = LAYERS.index(path.parent.name)
    bad = []
    for line, module in imported_modules(path):
        parts = module.split(".")
        if parts[0] != "sdkd":
            continue
        if len(parts) < 2 or parts[1] not in LAYERS:
            bad.append(f"line {line}: {module} (not in a package of {', '.join(LAYERS)})")
        elif LAYERS.index(parts[1]) > own:
            bad.append(f"line {line}: {module} ({path.parent.name}/ may import only "
                       f"{', '.join(LAYERS[:own + 1])})")
    return bad


def entry_script_imports(path: Path) -> list[str]:
    """The file's imports of entry scripts."""
    bad = []
    for line, module in imported_modules(path):
        file = _module_file(module)
        if file is not None and file.is_file() and is_entry_script(file):
            bad.append(f"line {line}: {module} ({file.relative_to(ROOT)} is an entry script; move what is "
                       f"shared into a library module)")
    return bad


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------
# The rules, one test per file


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_imports_only_its_own_layer_or_those_left_of_it(path):
    bad = layer_violations(path)
    assert not bad, f"{_id(path)} imports against the layer order {' < '.join(LAYERS)}:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_imports_no_entry_script(path):
    bad = entry_script_imports(path)
    assert not bad, f"{_id(path)} imports an entry script:\n  " + "\n  ".join(bad)


# ---------------------------------------------------------------------------------------------
# The checks themselves


def test_every_package_has_files():
    assert {path.parent.name for path in FILES} == set(LAYERS)


def test_the_walker_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "train" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("import os\n\n"
                     "def f():\n    from sdkd.eval.pipeline import load_pipeline\n\n"
                     "class C:\n    def g(self):\n        import sdkd.data.sources\n"
                     "        from sdkd.train import students\n")
    assert imported_modules(probe) == [(1, "os"), (4, "sdkd.eval.pipeline"), (8, "sdkd.data.sources"),
                                       (9, "sdkd.train.students")]
    assert layer_violations(probe) == ["line 4: sdkd.eval.pipeline (train/ may import only cli, data, train)"]


def test_the_check_finds_entry_scripts(tmp_path):
    assert is_entry_script(ROOT / "train" / "export.py")
    assert not is_entry_script(ROOT / "train" / "students.py")
    probe = tmp_path / "eval" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("def f():\n    from sdkd.train import export, students\n")
    assert entry_script_imports(probe) == [
        "line 2: sdkd.train.export (train/export.py is an entry script; move what is shared into a library module)"]
    inside = tmp_path / "late.py"
    inside.write_text("def f():\n    if __name__ == '__main__':\n        pass\n")
    assert not is_entry_script(inside)  # only a module-level block makes a command
    reversed_ = tmp_path / "reversed.py"
    reversed_.write_text("if '__main__' == __name__:\n    pass\n")
    assert is_entry_script(reversed_)
