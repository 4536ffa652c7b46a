"""cli/errors.py: how an entry point ends on a user mistake, alone or as one of several processes."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from sdkd.cli.errors import ConfigError, ReportedElsewhere, UserError, first_line, require, run_cli


def ending(main, capsys) -> tuple[int, str]:
    """(exit code, stderr) of run_cli(main)."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    return exit_.value.code, capsys.readouterr().err


def fail(err: BaseException):
    def main():
        raise err
    return main


def test_a_user_mistake_is_one_line_and_exit_2(capsys):
    assert ending(fail(UserError("image folder not found: /x")), capsys) == (2, "error: image folder not found: /x\n")


def test_require_names_the_key():
    require(True, "train.lr", "must be > 0")
    with pytest.raises(ConfigError, match=r"^config key 'train.lr': must be > 0$"):
        require(False, "train.lr", "must be > 0")


def test_a_mistake_reported_by_another_process_is_not_repeated(capsys):
    assert ending(fail(ReportedElsewhere()), capsys) == (2, "")


def test_first_line_of_a_library_error():
    assert first_line(ValueError("\n bad header\nmore detail")) == "bad header"
    assert first_line(KeyError()) == "KeyError"


def test_a_peer_that_ended_is_exit_1_only_with_several_processes(monkeypatch, capsys):
    peer_gone = fail(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500"))
    with pytest.raises(RuntimeError, match="Connection closed"):  # alone, it is a real failure: its traceback
        run_cli(peer_gone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ending(peer_gone, capsys) == (1, "")
    with pytest.raises(RuntimeError, match="out of memory"):
        run_cli(fail(RuntimeError("out of memory")))


@pytest.mark.parametrize("err", [UserError("bad"), ReportedElsewhere()])
def test_the_process_group_is_closed_before_exit(err, tmp_path, capsys):
    """Left open to the interpreter's teardown, gloo's threads sometimes abort the process (SIGABRT, exit -6):
    launch.sh then exits 1 instead of 2 (seen 4 times in 30 two-process launches with a missing image folder)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert ending(fail(err), capsys)[0] == 2
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
