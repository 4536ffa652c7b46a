"""User mistakes and how every entry point reports them: one line on stderr, exit code 2, no traceback.

Nothing heavy is imported here: the config modules (data/sources/config.py, train/engine/config.py) use it for --help
and config checks.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


class ConfigError(UserError):
    """A config key with a wrong, missing or out-of-range value; the message names the key."""


def require(ok: bool, key: str, expected: str) -> None:
    """A config check: unless `ok`, a ConfigError naming `key` and what was `expected` of it."""
    if not ok:
        raise ConfigError(f"config key '{key}': {expected}")


class ReportedElsewhere(UserError):
    """A mistake another process reports: this one exits 2 without a second copy of the line."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to one line, for wrapping library errors into a UserError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _peer_gone(err: BaseException) -> bool:
    """A collective that failed because another process of the run ended; that process said why (a user
    mistake found on one process only, such as a bad sample under data.strict, or a crash)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(
        text in str(err) for text in ("Connection closed by peer", "Connection reset by peer"))


def _exit(code: int) -> None:
    """sys.exit, after closing the process group if one is open: left to the interpreter's teardown, its
    threads are sometimes destroyed still running, and the process aborts (SIGABRT) instead of exiting."""
    dist = sys.modules.get("torch.distributed")  # only when the entry point imported it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point; user mistakes become one line on stderr and exit code 2."""
    try:
        main()
    except ReportedElsewhere:
        _exit(2)
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")  # one write: other processes may share stderr
        sys.stderr.flush()
        _exit(2)
    except RuntimeError as err:
        if not _peer_gone(err):
            raise
        _exit(1)  # the launcher reports the process that ended first, with its own exit code


def moved(new: str) -> None:
    """The whole of an old command path's script: one line naming the command that does its work now (with
    the arguments given), exit code 2."""
    import shlex

    def main() -> None:
        raise UserError(f"this command moved: run {shlex.join([*new.split(), *sys.argv[1:]])}")

    run_cli(main)
