"""Start-up work that every process of a run must agree on, so that a mistake found by one process
stops all of them with its one line, said once, instead of leaving the others to fail in a collective
(a gloo or NCCL traceback) or to repeat the line."""

from __future__ import annotations

from typing import Any, Callable

from accelerate.utils import gather_object

from sdkd.cli.errors import ReportedElsewhere, UserError


def agree(acc, problem: str | None) -> None:
    """Collective: every process raises when any has a problem; the lowest-ranked one that has it says it."""
    problems = gather_object([problem]) if acc.num_processes > 1 else [problem]
    first = next((p for p in problems if p is not None), None)
    if first is None:
        return
    if problems.index(first) == acc.process_index:
        raise UserError(first)
    raise ReportedElsewhere(first)


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return fn(), None
    except UserError as err:
        return None, str(err)


def together(acc, fn: Callable[[], Any]) -> Any:
    """`fn()` on every process; a user mistake on any stops all."""
    result, problem = _attempt(fn)
    agree(acc, problem)
    return result


def main_process_first(acc, fn: Callable[[], Any]) -> Any:
    """`fn()` on the main process, then on the others (a data set's cache is prepared once); a user
    mistake on any stops all."""
    result, problem = _attempt(fn) if acc.is_main_process else (None, None)
    agree(acc, problem)  # the other processes wait here for the main one
    if not acc.is_main_process:
        result, problem = _attempt(fn)
    agree(acc, problem)
    return result
