"""`python -m sdkd.train.launch [accelerate launch options] TRAINER.py ARGS` (launch.sh calls it):
accelerate's own launcher, whose exit says what the trainer's did.

A trainer that stops on a user mistake prints its one line and exits 2. accelerate's launcher would
then add a report of its own (a CalledProcessError traceback, or torch elastic's ChildFailedError with
several processes) and exit 1; here it exits 2 with nothing added. Any other failure keeps the
launcher's report.
"""

from __future__ import annotations

import logging
import subprocess
import sys

from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

USER_MISTAKE = 2


def main(argv: list[str]) -> None:
    args = launch_command_parser().parse_args(argv)
    # torch elastic logs each stopped process on its own ("Sending process N closing signal SIGTERM");
    # the failure itself is reported below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:
        if err.returncode != USER_MISTAKE:
            raise
        sys.exit(USER_MISTAKE)
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode != USER_MISTAKE:
            print(err.format_msg(), file=sys.stderr)
            sys.exit(1)
        sys.exit(USER_MISTAKE)


if __name__ == "__main__":
    main(sys.argv[1:])
