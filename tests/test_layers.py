"""Layers point one way, across packages and their rooms, and no module imports an entry script.

The packages are cli < data < train < eval; inside each, the rooms (subpackages) come before the package's
top, which holds the commands. A module imports sdkd modules only from its own layer or from layers to
its left (`LAYERS`), so train/ never imports eval/, no two packages or rooms import each other, and no
room imports a command. An entry script (a file with an `if __name__ == "__main__":` block: a command
users run) is imported by no module, not even another entry script; what two commands share lives in a
room. The top of train/, eval/ and data/ holds only entry scripts. Every import counts, also one inside a
function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

# A layer may import only itself and those to its left; "train" is train/'s top (its commands).
LAYERS = ("cli",
          "data/sources", "data",
          "train/engine", "train/models", "train/formats", "train/losses", "train/tasks", "train",
          "eval/metrics", "eval/inference", "eval/bench", "eval/experiments", "eval/evaluation", "eval/page", "eval")
PACKAGES = ("cli", "data", "train", "eval")
FILES = sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def _in_package(path: Path) -> tuple[str, ...]:
    """The path from its package folder on: ("train", "engine", "loop.py")."""
    parts = path.parts
    start = max(i for i, part in enumerate(parts[:-1]) if part in PACKAGES)
    return parts[start:]


def layer_of(path: Path) -> str:
    """The layer of a file: its room (train/engine) or its package's top (train)."""
    parts = _in_package(path)
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def _relative_base(path: Path, level: int) -> list[str]:
    """`from .x import y` in PACKAGE/ROOM/FILE.py: level 1 is its own package, each level more one up (0: absolute)."""
    package = ["sdkd", *_in_package(path)[:-1]]
    return package[:len(package) + 1 - level] if level else []


def _module_file(module: str) -> Path | None:
    """The repository file of an sdkd module name (sdkd.train.models.students -> train/models/students.py), if any."""
    parts = module.split(".")
    if parts[0] != "sdkd" or len(parts) < 2 or parts[1] not in PACKAGES:
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
    """The file's sdkd imports that go to a layer to its right (or to no package of the four)."""
    own = LAYERS.index(layer_of(path))
    bad = []
    for line, module in imported_modules(path):
        parts = module.split(".")
        if parts[0] != "sdkd":
            continue
        if len(parts) < 2 or parts[1] not in PACKAGES:
            bad.append(f"line {line}: {module} (not in a package of {', '.join(PACKAGES)})")
            continue
        room = "/".join(parts[1:3])
        layer = room if room in LAYERS else parts[1]
        if LAYERS.index(layer) > own:
            bad.append(f"line {line}: {module} ({layer_of(path)}/ may import only "
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


def test_every_layer_has_files():
    assert {layer_of(path) for path in FILES} == set(LAYERS)


@pytest.mark.parametrize("package", ["data", "train", "eval"])
def test_the_top_of_a_package_holds_only_commands(package):
    top = [path for path in (ROOT / package).glob("*.py") if path.name != "__init__.py"]
    assert top and all(is_entry_script(path) for path in top), [str(p) for p in top if not is_entry_script(p)]


@pytest.mark.parametrize("room", [layer for layer in LAYERS if "/" in layer])
def test_every_room_says_what_it_holds(room):
    doc = ast.get_docstring(ast.parse((ROOT / room / "__init__.py").read_text(encoding="utf-8")))
    assert doc and len(doc.split()) >= 12, f"{room}/__init__.py needs a paragraph saying what the room holds"


def test_the_walker_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "train" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("import os\n\n"
                     "def f():\n    from sdkd.eval.inference.pipeline import load_pipeline\n\n"
                     "class C:\n    def g(self):\n        import sdkd.data.sources.core\n"
                     "        from sdkd.train.models import students\n")
    assert imported_modules(probe) == [(1, "os"), (4, "sdkd.eval.inference.pipeline"), (8, "sdkd.data.sources.core"),
                                       (9, "sdkd.train.models.students")]
    assert layer_violations(probe) == [
        "line 4: sdkd.eval.inference.pipeline (train/ may import only "
        + ", ".join(LAYERS[:LAYERS.index("train") + 1]) + ")"]
    room = tmp_path / "train" / "engine" / "probe.py"
    room.parent.mkdir()
    room.write_text("from sdkd.train.tasks.objective import kd_objective\nfrom sdkd.train.engine import console\n")
    assert layer_violations(room) == [
        "line 1: sdkd.train.tasks.objective (train/engine/ may import only cli, data/sources, data, train/engine)"]


def test_the_check_finds_entry_scripts(tmp_path):
    assert is_entry_script(ROOT / "train" / "export.py")
    assert not is_entry_script(ROOT / "train" / "models" / "students.py")
    probe = tmp_path / "eval" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("def f():\n    from sdkd.train import export\n    from sdkd.train.models import students\n")
    assert entry_script_imports(probe) == [
        "line 2: sdkd.train.export (train/export.py is an entry script; move what is shared into a library module)"]
    inside = tmp_path / "late.py"
    inside.write_text("def f():\n    if __name__ == '__main__':\n        pass\n")
    assert not is_entry_script(inside)  # only a module-level block makes a command
    reversed_ = tmp_path / "reversed.py"
    reversed_.write_text("if '__main__' == __name__:\n    pass\n")
    assert is_entry_script(reversed_)
