"""The mutation check: break sdkd on purpose, one line at a time, and see that the tests notice.

`python tests/mutate.py [--list] [NAME ...] [-j N]` applies each breakage of `tests/mutation_table.py` to a copy
of the tree (never the checkout: a crash or a kill leaves it as it was), runs the breakage's tests there, and
reports it caught (pytest exit code 1: tests failed), NOT CAUGHT (they passed) or error (any other exit code:
a collection error, no tests, a timeout). First it checks that every breakage's `old` text occurs exactly once
and that every listed test passes on the unbroken copy; the exit status is 1 when any breakage survived or erred.

`import sdkd` in the copy resolves to the copy: sdkd is installed editable from the checkout (pyproject's
package-dir maps sdkd.train to train/, ...), so each copy gets a shim folder, first on the path, whose `sdkd`
package links those names to the copy's folders. The tests run in a fork of a worker process that imported
torch, diffusers and transformers once (seconds per breakage saved), never sdkd.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # one breakage's tests; a hang (a loop that never ends) is reported as an error
# What the worker imports before forking: the libraries every test file imports, never sdkd.
PRELOAD = ("torch", "numpy", "PIL.Image", "safetensors.torch", "diffusers", "diffusers.models", "transformers",
           "transformers.models.clip", "accelerate", "peft", "pytest")


@dataclass(frozen=True)
class Mutation:
    """One breakage: in `path` (repo-relative) the text `old`, which must occur exactly once, becomes `new`;
    `tests` (pytest node ids) must then fail. `why`: the real bug it stands for."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


class TableError(Exception):
    """A breakage that cannot be applied: its `old` text is missing or occurs more than once."""


@dataclass
class Result:
    mutation: Mutation
    outcome: str  # "caught", "NOT CAUGHT" or "error"
    seconds: float
    detail: str = ""  # an error's reason, and the tail of pytest's output


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    broken: str = ""  # why the table cannot be checked (an `old` text, or a test failing unbroken)

    @property
    def survivors(self) -> list[Result]:
        return [r for r in self.results if r.outcome != "caught"]

    @property
    def ok(self) -> bool:
        return not self.broken and not self.survivors

    def summary(self) -> str:
        if self.broken:
            return f"mutation table broken: {self.broken}"
        caught = sum(r.outcome == "caught" for r in self.results)
        errors = sum(r.outcome == "error" for r in self.results)
        return (f"{len(self.results)} breakages: {caught} caught, {len(self.results) - caught - errors} not caught, "
                f"{errors} errors; {self.seconds:.0f} s")


def mutated_text(text: str, mutation: Mutation) -> str:
    """`text` with the breakage applied; TableError unless `old` occurs exactly once (so a refactor that moves
    the code fails the table loudly instead of testing nothing)."""
    count = text.count(mutation.old)
    if count != 1:
        raise TableError(f"{mutation.name}: the text to replace occurs {count} times in {mutation.path}, "
                         f"not once: {mutation.old!r}")
    return text.replace(mutation.old, mutation.new)


def check_table(mutations: list[Mutation], root: Path = ROOT) -> None:
    """TableError naming the first breakage that cannot be applied to `root`'s files, or two with one name."""
    names = [m.name for m in mutations]
    if len(set(names)) != len(names):
        raise TableError(f"breakage names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    for m in mutations:
        if not (root / m.path).is_file():
            raise TableError(f"{m.name}: no file {m.path}")
        if not m.tests:
            raise TableError(f"{m.name}: no tests")
        mutated_text((root / m.path).read_text(), m)


def tree_files(root: Path) -> list[str]:
    """The checkout's files as git sees them: tracked and untracked, less what .gitignore leaves out."""
    out = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return [name for name in out.split("\0") if name and (root / name).is_file()]


def make_copy(root: Path, into: Path) -> tuple[Path, Path]:
    """`root`'s files copied to `into`/tree, and `into`/shim holding an `sdkd` package whose subpackages link to
    the copy's folders (pyproject's package-dir); returns (tree, shim)."""
    tree, shim = into / "tree", into / "shim"
    for name in tree_files(root):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, tree / name)
    package_dir = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    (shim / "sdkd").mkdir(parents=True)
    (shim / "sdkd" / "__init__.py").write_text("")
    for package, folder in package_dir.items():
        top, _, sub = package.partition(".")
        assert top == "sdkd" and "." not in sub, package  # the layout the links reproduce
        (shim / "sdkd" / sub).symlink_to(tree / folder, target_is_directory=True)
    return tree, shim


def write_source(path: Path, text: str) -> None:
    """Write a module's text and drop its cached bytecode: a mutation and its undoing can share a size and an
    mtime second, and Python would then run the stale .pyc."""
    path.write_text(text)
    Path(importlib.util.cache_from_source(str(path))).unlink(missing_ok=True)


def serve() -> None:
    """The worker: import the heavy libraries once, then per request line (JSON: cwd, shim, args, log, timeout)
    fork a child that runs pytest in the copy; answer each with a line {"rc": exit code}."""
    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job)
        deadline, status = time.monotonic() + job["timeout"], None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
            elif time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)  # the child and any script it started
                os.waitpid(pid, 0)
                status = "timeout"
            else:
                time.sleep(0.05)
        print(json.dumps({"rc": status}), flush=True)


def _child(job: dict) -> None:
    rc = 3
    try:
        os.setpgid(0, 0)
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir(job["cwd"])
        # As `python -m pytest` in the copy: the copy first (not this script's folder), the shim before the
        # editable install's finder, and both for the scripts the tests start.
        sys.path[:1] = [job["shim"], job["cwd"]]
        os.environ["PYTHONPATH"] = os.pathsep.join([job["shim"], os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        import sdkd.cli

        where = Path(sdkd.cli.__file__).resolve()
        if not where.is_relative_to(Path(job["cwd"]).resolve()):
            print(f"sdkd resolves to {where}, outside the copy {job['cwd']}", flush=True)
        else:
            import pytest

            rc = int(pytest.main(job["args"]))
    except BaseException as e:  # noqa: BLE001 - whatever the child raises is reported in its log, never raised on
        print(f"mutation worker: {type(e).__name__}: {e}", flush=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


class Worker:
    """A copy of the tree and a worker process that runs pytest in it."""

    def __init__(self, root: Path, into: Path):
        self.tree, self.shim = make_copy(root, into)
        self.log = into / "pytest.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen([sys.executable, __file__, "--serve"], cwd=self.tree, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def pytest(self, tests: tuple[str, ...], timeout: float = TIMEOUT_S) -> tuple[int | str, str]:
        """(pytest's exit code or "timeout", the tail of its output) for `tests` in the copy."""
        args = ["-q", "-x", "-p", "no:cacheprovider", *tests]
        job = {"cwd": str(self.tree), "shim": str(self.shim), "args": args, "log": str(self.log), "timeout": timeout}
        try:
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return "worker died", ""
        answer = self.process.stdout.readline()
        if not answer:
            return "worker died", ""
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return json.loads(answer)["rc"], tail

    def run(self, mutation: Mutation) -> Result:
        path = self.tree / mutation.path
        original = path.read_text()
        start = time.monotonic()
        try:
            write_source(path, mutated_text(original, mutation))
            rc, tail = self.pytest(mutation.tests)
        finally:
            write_source(path, original)
        outcome = {1: "caught", 0: "NOT CAUGHT"}.get(rc, "error")
        detail = "" if outcome == "caught" else f"pytest exit code {rc}\n{tail}"
        return Result(mutation, outcome, time.monotonic() - start, detail)

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # it died: nothing left to end
        self.process.wait(timeout=60)


def _share(workers: list[Worker], items: list, work) -> None:
    """`work(worker, item)` for every item, each worker (a thread each) taking the next item when it is free."""
    todo: queue.Queue = queue.Queue()
    for item in items:
        todo.put(item)

    def drain(worker: Worker) -> None:
        while True:
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            work(worker, item)

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def say(line: str) -> None:
    print(line, flush=True)  # a line as soon as each breakage is done, also into a file or a pipe


def run_check(mutations: list[Mutation], jobs: int = 2, root: Path = ROOT, out=say) -> Report:
    """Check every breakage of `mutations` on copies of `root` (`jobs` at a time), printing a line per breakage
    with `out`; the Report lists each result."""
    start, report = time.monotonic(), Report()
    try:
        check_table(mutations, root)
    except TableError as e:
        report.broken = str(e)
        return report
    with tempfile.TemporaryDirectory(prefix="sdkd-mutate-") as tmp:
        workers = [Worker(root, Path(tmp) / f"copy{i}") for i in range(max(1, min(jobs, len(mutations))))]
        try:
            # The unbroken baseline: one run per worker, each test file in one of them (its module fixtures
            # built once), about as many tests in each.
            files: dict[str, list[str]] = {}
            for test in dict.fromkeys(t for m in mutations for t in m.tests):
                files.setdefault(test.split("::")[0], []).append(test)
            runs: list[list[str]] = [[] for _ in workers]
            for tests in sorted(files.values(), key=len, reverse=True):
                min(runs, key=len).extend(tests)
            failed, lock = [], threading.Lock()

            def baseline(worker: Worker, tests: list[str]) -> None:
                rc, tail = worker.pytest(tuple(tests), timeout=TIMEOUT_S * 2)
                if rc != 0:
                    with lock:
                        failed.append(f"exit code {rc}:\n{tail}")

            _share(workers, [r for r in runs if r], baseline)
            if failed:
                report.broken = "the breakages' tests do not all pass on the unbroken tree, " + "\n".join(failed)
                return report
            out(f"the {sum(map(len, runs))} tests pass unbroken ({time.monotonic() - start:.0f} s)")

            def check(worker: Worker, m: Mutation) -> None:
                result = worker.run(m)
                with lock:
                    report.results.append(result)
                    out(f"{result.outcome:10} {result.seconds:6.1f} s  {m.name}")

            _share(workers, mutations, check)
        finally:
            for w in workers:
                w.close()
    order = {m.name: i for i, m in enumerate(mutations)}
    report.results.sort(key=lambda r: order[r.mutation.name])
    report.seconds = time.monotonic() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="breakages to check (default: all)")
    parser.add_argument("--list", action="store_true", help="list the breakages and their tests, run nothing")
    # 2: on 2 busy cores, 137 s against 162 s for 1 (docs/testing.md).
    parser.add_argument("-j", "--jobs", type=int, default=2, help="breakages checked at a time, one copy of the "
                        "tree each (default: 2)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the worker process
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    from mutation_table import MUTATIONS

    unknown = sorted(set(args.names) - {m.name for m in MUTATIONS})
    if unknown:
        parser.error(f"no breakage named {', '.join(unknown)} (see --list)")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path}: {m.why}\n    " + "\n    ".join(m.tests))
        return 0
    report = run_check(chosen, args.jobs)
    for r in report.survivors:
        print(f"\n{r.outcome}: {r.mutation.name} ({r.mutation.path}): {r.mutation.why}\n{r.detail}")
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
