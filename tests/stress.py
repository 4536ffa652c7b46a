"""The tests whose outcome could hang on timing or on the order in which processes end, run N times in a row
(default 30) while every core is kept busy by a CPU burner this script starts and stops; reports each test's
passes and failures. Exit code 0 when none failed.

    python tests/stress.py              # the full check: 30 rounds under load
    python tests/stress.py -n 3         # a quick one
    python tests/stress.py -j 2         # two rounds at a time beside the burner (more load, fewer minutes)
    python tests/stress.py -n 5 tests/test_cli_errors.py   # other tests (pytest node ids)

Each round is one pytest session over all the tests (as CI runs them: one process, in file order); the output
of a round with a failure is kept and its path printed. The tests (TESTS):
- every test that starts several processes of one run (launch.sh, sdkd.train.launch, accelerate launch
  --num_processes 2), its processes ending in whatever order (tests/ending_processes.py forces each order);
- every test in which another process must be in a given state at a given moment: a run folder held by
  another run, wandb's service process writing its run file, the demo's server answering a browser.
Left out: tests whose processes only run side by side on their own files (nothing between them to order), and
the benchmarks, whose measured times are only checked to be positive and consistent with each other.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TESTS = [
    "tests/test_cli_errors.py",
    "tests/test_data_e2e.py::test_two_processes_read_disjoint_shards_for_the_right_epochs",
    "tests/test_data_e2e.py::test_a_bad_sample_on_one_of_two_processes_stops_both_with_one_line",
    "tests/test_kd_e2e.py::test_two_processes_through_launch_sh",
    "tests/test_kd_e2e.py::test_two_processes_match_one_process_of_the_same_global_batch",
    "tests/test_hostile_inputs.py::test_hostile_input_is_one_line_and_changes_nothing[launch-two-ranks-imagefolder-missing]",
    "tests/test_hostile_inputs.py::test_hostile_input_is_one_line_and_changes_nothing[launch-one-process-unknown-key]",
    "tests/test_hostile_inputs.py::test_hostile_input_is_one_line_and_changes_nothing[output-dir-locked-by-another-run]",
    "tests/test_run_folder.py::test_a_running_run_holds_the_lock_and_a_killed_one_releases_it",
    "tests/test_task_state.py::test_two_processes_each_resume_their_own_task_state",
    "tests/test_tracking.py::test_logged_images_carry_their_prompts",
    "tests/test_demo.py::test_page_in_headless_chromium_shows_one_image_per_model",
    "tests/test_demo.py::test_a_flood_of_requests_leaves_the_demo_serving_with_its_memory_flat",
    "tests/test_fsdp_e2e.py::test_fsdp_matches_one_process_and_resumes_in_another_number_of_processes",
]

# One busy loop per core; it ends by itself if this script dies without stopping it.
BURN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    sum(range(100_000))\n"


def outcomes(junit: Path) -> dict[str, str]:
    """{node id: "passed" | "failed" | "skipped"} from a round's JUnit XML."""
    found = {}
    for case in ET.parse(junit).iter("testcase"):  # classname: tests.test_x (the tests are module functions)
        nodeid = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        states = {child.tag for child in case}
        found[nodeid] = ("failed" if states & {"failure", "error"} else "skipped" if "skipped" in states else "passed")
    return found


def play(round_: int, tests: list[str], work: Path) -> tuple[int, dict[str, str], Path | None, float]:
    """One round: a pytest session over `tests`; (round, {node id: outcome}, its output if a test failed, seconds)."""
    junit, log = work / f"round-{round_}.xml", work / f"round-{round_}.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        # -p no:cacheprovider: no --last-failed reordering between rounds.
        code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                               *tests], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    got = outcomes(junit) if junit.exists() else {}
    junit.unlink(missing_ok=True)
    if code not in (0, 5) and "failed" not in got.values():
        got[f"pytest exit code {code}"] = "failed"  # a collection error or an interrupted session
    if "failed" not in got.values():
        log.unlink()
        log = None
    return round_, got, log, time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--rounds", type=int, default=30, help="rounds (pytest sessions) in a row (default 30)")
    parser.add_argument("-j", "--jobs", type=int, default=1,
                        help="rounds run at once (default 1); the burner keeps every core busy all the same, and each "
                             "round's tests then also share the cores with another round's")
    parser.add_argument("--no-load", action="store_true", help="no CPU burner (to compare)")
    parser.add_argument("tests", nargs="*", default=TESTS, help="pytest node ids (default: TESTS above)")
    args = parser.parse_args()
    if args.rounds < 1 or args.jobs < 1:
        parser.error("--rounds and --jobs must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="sdkd-stress-"))
    burners = [] if args.no_load else [subprocess.Popen([sys.executable, "-c", BURN])
                                       for _ in range(os.cpu_count() or 1)]
    print(f"{len(burners)} CPU burner(s) running; {args.rounds} round(s) of {len(args.tests)} test path(s), "
          f"{args.jobs} at a time; round output in {work}", flush=True)
    counts: dict[str, dict[str, list[int]]] = {}
    kept, started = [], time.monotonic()
    pool = ThreadPoolExecutor(args.jobs)
    try:
        rounds = [pool.submit(play, r, args.tests, work) for r in range(1, args.rounds + 1)]
        for done in as_completed(rounds):
            round_, got, log, seconds = done.result()
            for nodeid, state in got.items():
                counts.setdefault(nodeid, {"passed": [], "failed": [], "skipped": []})[state].append(round_)
            failed = sum(state == "failed" for state in got.values())
            if log is not None:
                kept.append(log)
            print(f"round {round_}/{args.rounds}: {len(got) - failed} passed or skipped, {failed} failed, "
                  f"{seconds:.0f} s" + (f"; output: {log}" if log else ""), flush=True)
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C no further round starts (the running ones got it too)
        for burner in burners:
            burner.kill()
            burner.wait()
    print(f"\n{'passed':>6} {'failed':>6} {'skipped':>7}  test  ({time.monotonic() - started:.0f} s in all, "
          f"{'with' if burners else 'without'} {len(burners)} CPU burner(s), {args.jobs} round(s) at a time)")
    for nodeid, states in counts.items():
        rounds = f"  failed in rounds {sorted(states['failed'])}" if states["failed"] else ""
        print(f"{len(states['passed']):>6} {len(states['failed']):>6} {len(states['skipped']):>7}  {nodeid}{rounds}")
    if not kept and work.exists() and not any(work.iterdir()):
        work.rmdir()
    return 1 if any(states["failed"] for states in counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
