"""The mutation check (tests/mutate.py): its refusals, a caught and a surviving breakage, and the whole table."""

from __future__ import annotations

import pytest

from conftest import ROOT
from mutate import Mutation, TableError, check_table, mutated_text, run_check

WORDS = "cli/words.py"
WORDS_TEST = "tests/test_words.py::test_counted"


def breakage(old: str, new: str, name: str = "b", tests: tuple[str, ...] = (WORDS_TEST,)) -> Mutation:
    return Mutation(name, WORDS, old, new, tests, "a test breakage")


def test_old_text_must_occur_exactly_once():
    text = "a = 1\nb = 1\n"
    assert mutated_text(text, breakage("a = 1", "a = 2")) == "a = 2\nb = 1\n"
    with pytest.raises(TableError, match="occurs 0 times in cli/words.py"):
        mutated_text(text, breakage("c = 1", "c = 2"))
    with pytest.raises(TableError, match="occurs 2 times in cli/words.py"):
        mutated_text(text, breakage(" = 1", " = 2"))


def test_the_table_is_checked_against_the_checkout_before_anything_runs():
    check_table([breakage("if n == 1:", "if n == 2:")])
    with pytest.raises(TableError, match="occurs 0 times"):
        check_table([breakage("if n == 3:", "if n == 2:")])
    with pytest.raises(TableError, match="breakage names repeat"):
        check_table([breakage("if n == 1:", "if n == 2:")] * 2)
    with pytest.raises(TableError, match="no file nowhere.py"):
        check_table([Mutation("b", "nowhere.py", "x", "y", (WORDS_TEST,), "")])
    report = run_check([breakage("if n == 3:", "if n == 2:")], out=lambda line: None)
    assert "occurs 0 times" in report.broken and not report.results and not report.ok


@pytest.mark.slow  # a copy of the tree and two pytest runs in it
def test_a_breakage_of_the_copy_is_caught_a_harmless_one_survives_and_a_syntax_error_is_no_catch():
    """`counted` breaks only in the copy: its test fails there (so the copy's sdkd is what the tests import), the
    checkout is left as it was; a change no test sees is reported NOT CAUGHT, and one that stops the tests from
    being collected (a SyntaxError: pytest's exit code is not 1) an error, its output kept."""
    before = (ROOT / WORDS).read_text()
    lines = []
    report = run_check([breakage("if n == 1:", "if n == 2:", "caught"),
                        breakage('return f"1 {noun}"', 'return "1 " + noun', "survives"),
                        breakage("if n == 1:", "if n == 1", "syntax")], jobs=1, out=lines.append)
    assert (ROOT / WORDS).read_text() == before
    assert [(r.mutation.name, r.outcome) for r in report.results] == [
        ("caught", "caught"), ("survives", "NOT CAUGHT"), ("syntax", "error")]
    assert "SyntaxError" in report.results[2].detail
    assert [r.mutation.name for r in report.survivors] == ["survives", "syntax"] and not report.ok
    assert report.summary().startswith("3 breakages: 1 caught, 1 not caught, 1 errors")
    assert any(line.startswith("NOT CAUGHT") and line.endswith("survives") for line in lines)


@pytest.mark.slow  # the whole table: 2.5 to 6 minutes on 2 busy cores (docs/testing.md)
def test_every_breakage_in_the_table_is_caught():
    from mutation_table import MUTATIONS

    report = run_check(MUTATIONS, jobs=2, out=print)
    assert not report.broken, report.broken
    assert not report.survivors, "\n\n".join(f"{r.outcome}: {r.mutation.name} ({r.mutation.path}): {r.mutation.why}"
                                             f"\n{r.detail}" for r in report.survivors)
