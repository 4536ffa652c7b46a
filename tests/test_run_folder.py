"""The run folder: refusing another run's folder, overwrite and resume, the lock, unwritable paths."""

import os
import subprocess
import sys

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from sdkd.cli.errors import ConfigError, UserError
from sdkd.train.engine import run_folder
from sdkd.train.engine.config import RunConfig, load_config
from sdkd.train.tasks.diffusion_config import KDConfig


@pytest.fixture
def acc():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def cfg(out, **kw):
    return RunConfig(output_dir=str(out), **kw)


def snapshot(folder):
    """Every file under `folder` (but the lock) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != run_folder.LOCK}


def old_run(folder):
    (folder / "checkpoint-4").mkdir(parents=True)
    (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (folder / "config.yaml").write_text("teacher: toy\n")
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    return snapshot(folder)


def test_a_new_or_empty_folder_is_claimed_and_the_config_saved_only_at_start(tmp_path, acc):
    run_folder.claim(cfg(tmp_path / "new"), acc)
    assert (tmp_path / "new" / run_folder.LOCK).is_file()
    assert not (tmp_path / "new" / "config.yaml").exists()
    run_folder.start(cfg(tmp_path / "new"), acc)
    assert load_config(tmp_path / "new" / "config.yaml", schema=RunConfig).output_dir == str(tmp_path / "new")


def test_another_runs_folder_is_refused_and_left_as_it_was(tmp_path, acc):
    before = old_run(tmp_path)
    with pytest.raises(UserError, match=r"holds another run .*resume=latest .*overwrite=true"):
        run_folder.claim(cfg(tmp_path), acc)
    assert snapshot(tmp_path) == before


def test_a_folder_that_holds_no_run_is_refused_even_with_overwrite(tmp_path, acc):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="holds no sdkd run"):
        run_folder.claim(cfg(tmp_path, overwrite=True), acc)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_resume_keeps_and_overwrite_replaces_the_old_run(tmp_path, acc):
    before = old_run(tmp_path)
    run_folder.claim(cfg(tmp_path, resume="latest"), acc)
    assert snapshot(tmp_path) == before  # nothing written by the claim
    run_folder.claim(cfg(tmp_path, overwrite=True), acc)
    assert snapshot(tmp_path) == before  # cleared only once the new run has loaded
    run_folder.start(cfg(tmp_path, overwrite=True), acc)
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_folder.LOCK, "config.yaml"]


def test_overwrite_and_resume_together_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="'overwrite'"):
        load_config(None, ["teacher=toy", f"output_dir={tmp_path}", "overwrite=true", "resume=latest"], schema=KDConfig)


def test_a_running_run_holds_the_lock_and_a_killed_one_releases_it(tmp_path, acc):
    # It holds the folder until its stdin closes: when the test kills it, or if the test itself ends first.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from accelerate import Accelerator; from sdkd.train.engine import run_folder; "
        "from sdkd.train.engine.config import RunConfig; "
        f"run_folder.claim(RunConfig(output_dir={str(tmp_path)!r}), Accelerator(cpu=True)); "
        "print('locked', flush=True); sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by another run \(pid {holder.pid}\)"):
            run_folder.claim(cfg(tmp_path), acc)
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
    run_folder.claim(cfg(tmp_path), acc)  # a killed run leaves no stuck lock


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_unwritable_output_dir_is_one_line(tmp_path, acc, where):
    (tmp_path / "f").write_text("x")
    out = {"a file": tmp_path / "f", "under a file": tmp_path / "f" / "run",
           "read-only": tmp_path / "ro" / "run"}[where]
    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(UserError, match=rf"output_dir '{out}': cannot be written"):
        run_folder.claim(cfg(out), acc)
    assert (tmp_path / "f").read_text() == "x"
