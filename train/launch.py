"""`python -m sdkd.train.launch [accelerate launch options] TRAINER.py ARGS` (launch.sh calls it):
accelerate's own launcher, whose exit says what the trainer's did.

A trainer that stops on a user mistake exits 2 with one line. accelerate's launcher would then add a
report of its own (a CalledProcessError traceback, or torch elastic's ChildFailedError with several
processes) and exit 1; here it exits 2 with nothing added. Any other failure keeps the launcher's report.

With several processes, which one ends first is chance: the one that found the mistake, or another whose
collective lost it as a peer, or one stopped by torch elastic once another ended. So the processes write
nothing themselves; each that stops on a mistake records it (cli/errors.py), and the outcome is read from
every process's record and exit code together, once all have ended.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from sdkd.cli.errors import LAUNCHER_REPORTS, PEER_GONE, USER_MISTAKE, recorded_mistake, say

# How a process ends because another ended first: its collective lost a peer, or torch elastic stopped it.
_ENDED_BY_ANOTHER = {PEER_GONE, -signal.SIGTERM}


def user_mistake(failures: dict[int, ProcessFailure]) -> str | None:
    """The mistake recorded by the lowest-ranked process that recorded one, when every other process that
    failed ended because of it; None when any failed otherwise (a crash, whose report is kept)."""
    recorded = {rank: recorded_mistake(failure.error_file_data) for rank, failure in failures.items()}
    if any(recorded[rank] is None and failure.exitcode not in _ENDED_BY_ANOTHER for rank, failure in failures.items()):
        return None
    return next((recorded[rank] for rank in sorted(recorded) if recorded[rank] is not None), None)


def main(argv: list[str]) -> None:
    args = launch_command_parser().parse_args(argv)
    # torch elastic logs each stopped process on its own ("Sending process N closing signal SIGTERM");
    # the failure itself is reported below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_REPORTS] = "1"
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # one process: it wrote its line itself
        if err.returncode != USER_MISTAKE:
            raise
        sys.exit(USER_MISTAKE)
    except ChildFailedError as err:
        mistake = user_mistake(err.failures)
        if mistake is None:
            print(err.format_msg(), file=sys.stderr)
            sys.exit(1)
        say(mistake)
        sys.exit(USER_MISTAKE)


if __name__ == "__main__":
    main(sys.argv[1:])
