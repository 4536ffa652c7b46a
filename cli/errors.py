"""User mistakes and how every entry point reports them: one line on stderr, exit code 2, no traceback.

One of several processes started by `python -m sdkd.train.launch` (launch.sh) does not write the line: it
records it in the error file torch elastic gives each process, and the launcher says it once when all have
ended, whichever processes found it and in whatever order they ended (a process's own line could be cut off
by the launcher stopping it, when another ended first).

Nothing heavy is imported here: the config modules (data/sources/config.py, train/engine/config.py) use it for --help
and config checks.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any, Callable

USER_MISTAKE = 2  # exit code of a process that stopped on a user mistake
PEER_GONE = 3  # exit code of a process whose collective failed because another process of the run ended

# Set by sdkd.train.launch for the processes it starts: the launcher reports their user mistakes.
LAUNCHER_REPORTS = "SDKD_LAUNCHER_REPORTS"


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


class ConfigError(UserError):
    """A config key with a wrong, missing or out-of-range value; the message names the key."""


def require(ok: bool, key: str, expected: str) -> None:
    """A config check: unless `ok`, a ConfigError naming `key` and what was `expected` of it."""
    if not ok:
        raise ConfigError(f"config key '{key}': {expected}")


def require_package(module: str, what: str, extra: str):
    """The optional package `module` (in sdkd's pyproject extra `extra`), imported; else a UserError saying that
    `what` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"{what} needs {module} ({err.name or err} is missing): "
                        f"pip install -c constraints.txt -e \".[{extra}]\"") from None


class ReportedElsewhere(UserError):
    """A mistake another process reports (the message is the same): this one exits 2 without a second copy
    of the line."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to one line, for wrapping library errors into a UserError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _peer_gone(err: BaseException) -> bool:
    """A collective that failed because another process of the run ended; that process tells why (a user
    mistake found on one process only, such as a bad sample under data.strict, or a crash)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(
        text in str(err) for text in ("Connection closed by peer", "Connection reset by peer"))


def say(message: str) -> None:
    """A user mistake's one line on stderr."""
    sys.stderr.write(f"error: {message}\n")  # one write: other processes may share stderr
    sys.stderr.flush()


def _record(message: str) -> bool:
    """Under sdkd.train.launch with torch elastic: the mistake written to this process's error file, for the
    launcher to say (`recorded_mistake`); False where there is no such file."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not (path and os.environ.get(LAUNCHER_REPORTS)):
        return False
    # torch elastic's own format (a message and its time) and a mark of ours; written whole (renamed into
    # place), as the launcher may stop this process at any moment once another has ended.
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump({"message": message, "timestamp": int(time.time()), "userMistake": True}, f)
    os.replace(partial, path)
    return True


def recorded_mistake(error_file_data: dict[str, Any]) -> str | None:
    """The user mistake a process recorded in its error file (torch elastic's ProcessFailure.error_file_data),
    or None."""
    return error_file_data.get("message") if error_file_data.get("userMistake") is True else None


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
    except UserError as err:
        # Recorded before the process group is closed: no other process ends because of this one before then.
        if not _record(str(err)) and not isinstance(err, ReportedElsewhere):
            say(str(err))
        _exit(USER_MISTAKE)
    except RuntimeError as err:
        if not _peer_gone(err):
            raise
        _exit(PEER_GONE)  # quietly, and told apart from a crash by sdkd.train.launch


def moved(new: str) -> None:
    """The whole of an old command path's script: one line naming the command that does its work now (with
    the arguments given), exit code 2."""
    import shlex

    def main() -> None:
        raise UserError(f"this command moved: run {shlex.join([*new.split(), *sys.argv[1:]])}")

    run_cli(main)
