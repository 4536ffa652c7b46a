"""A run of two processes that stops as SCENARIO says, the order in which its processes end forced instead of
left to chance: what tests/test_cli_errors.py starts through sdkd.train.launch (and launch.sh).

    python -m sdkd.train.launch --multi_gpu --num_processes 2 tests/ending_processes.py SCENARIO FINDER [FOLDER]

FINDER is the rank that finds the user mistake (or crashes). "Seen to end" is a process reaped by torch
elastic's agent, which then stops the processes still running (SIGTERM).

  peer-ends-first    FINDER stops on a user mistake; the other, in a collective, loses it as a peer and ends;
                     FINDER ends only once the other has been seen to end.
  finder-ends-first  FINDER stops on a user mistake; the other, out of any collective, waits to be stopped.
  reporter-last      the processes agree on FINDER's mistake (train/engine/distributed.agree): FINDER is to say
                     it, the other ends first; FINDER waits, before saying it, to be stopped.
  all-before-group   every process finds the mistake before the process group starts; none ends before all have
                     stopped on it (each marks that in FOLDER).
  crash              FINDER fails with a RuntimeError (not a user mistake); the other, in a collective, loses it.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path

from sdkd.cli.errors import ReportedElsewhere, UserError, run_cli

MISTAKE = "the mistake found by rank {}"


def wait_for(done, what: str) -> None:
    """Until `done()`; the deadline only keeps a broken run from hanging the tests (it ends with exit 99)."""
    deadline = time.monotonic() + 300
    while not done():
        if time.monotonic() > deadline:
            sys.stderr.write(f"ending_processes: rank {os.environ['RANK']} gave up waiting for {what}\n")
            os._exit(99)
        time.sleep(0.01)


def seen_to_end(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # reaped: torch elastic's agent has its exit code
        return True
    return False


def stop_together(folder: Path, rank: int) -> None:
    """At exit (after run_cli has dealt with the mistake): until every process has got here."""
    (folder / f"stopped-{rank}").touch()
    wait_for(lambda: len(list(folder.glob("stopped-*"))) == int(os.environ["WORLD_SIZE"]), "every process to stop")


def main() -> None:
    if "--check-config" in sys.argv:  # launch.sh's check before it starts any process
        return
    scenario, finder = sys.argv[1], int(sys.argv[2])
    rank = int(os.environ["RANK"])
    if scenario == "all-before-group":
        atexit.register(stop_together, Path(sys.argv[3]), rank)
        raise UserError("a mistake every process finds")

    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    from sdkd.train.engine.distributed import agree

    state = PartialState(cpu=True)  # the process group, as a trainer's Accelerator starts it here (gloo)
    pids = [None] * state.num_processes
    dist.all_gather_object(pids, os.getpid())
    other = pids[1 - rank]
    if scenario == "reporter-last":
        try:
            agree(state, MISTAKE.format(finder) if rank == finder else None)
        except ReportedElsewhere:
            raise
        except UserError:
            wait_for(lambda: False, "to be stopped")
    if rank == finder:
        if scenario == "crash":
            raise RuntimeError("a crash, not a user mistake")
        if scenario == "peer-ends-first":
            # atexit: after run_cli has recorded the mistake and closed the process group.
            atexit.register(wait_for, lambda: seen_to_end(other), "the other process to end")
        raise UserError(MISTAKE.format(finder))
    if scenario == "finder-ends-first":
        wait_for(lambda: seen_to_end(other), "the finder to end")
        wait_for(lambda: False, "to be stopped")
    dist.all_reduce(torch.zeros(1))  # left in a collective whose peer ends


if __name__ == "__main__":
    run_cli(main)
