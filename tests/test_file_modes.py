"""Every file sdkd writes follows the user's umask (sdkd.cli.files): safetensors alone would write 0600, and
diffusers' save_pretrained and accelerate's save_state write through it. Links are never followed."""

from __future__ import annotations

import ast
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file as library_save_file

from sdkd.cli.errors import UserError
from sdkd.cli.files import follow_umask, save_file, umask, user_mode, written_whole

from conftest import ROOT, run_in_process, save_toy_student

WRITERS = ("cli", "data", "train", "eval")


@contextmanager
def umask_set(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_umask_is_read_without_changing_it():
    with umask_set(0o027):
        assert umask() == 0o027
        assert umask() == 0o027  # still set


def test_user_mode_changes_a_file_and_never_a_link_target(tmp_path):
    with umask_set(0o027):
        file, target = tmp_path / "written", tmp_path / "elsewhere"
        library_save_file({"x": torch.zeros(2)}, str(file))
        library_save_file({"x": torch.zeros(2)}, str(target))
        assert mode(file) == mode(target) == 0o600  # what safetensors does: the reason for all this
        link = tmp_path / "link"
        link.symlink_to(target)
        user_mode(file)
        user_mode(link)
        assert mode(file) == 0o640
        assert mode(target) == 0o600


def test_save_file_follows_the_umask(tmp_path):
    for mask, expected in ((0o022, 0o644), (0o027, 0o640), (0o077, 0o600)):
        with umask_set(mask):
            save_file({"x": torch.zeros(2)}, tmp_path / f"{mask:o}.safetensors")
        assert mode(tmp_path / f"{mask:o}.safetensors") == expected


def test_follow_umask_changes_only_what_the_block_wrote(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    kept, rewritten, target = out / "users.safetensors", out / "rewritten.safetensors", outside / "t.safetensors"
    for path in (kept, rewritten, target):
        library_save_file({"x": torch.zeros(2)}, str(path))
    (out / "link.safetensors").symlink_to(target)
    (out / "linked_folder").symlink_to(outside, target_is_directory=True)
    with umask_set(0o022), follow_umask(out):
        library_save_file({"x": torch.ones(2)}, str(rewritten))
        (out / "sub").mkdir()
        library_save_file({"x": torch.ones(2)}, str(out / "sub" / "new.safetensors"))
        library_save_file({"x": torch.ones(2)}, str(target))  # rewritten through the folder's links' target
    assert mode(rewritten) == mode(out / "sub" / "new.safetensors") == 0o644
    assert mode(kept) == 0o600  # there before, untouched: not ours to change
    assert mode(target) == 0o600  # outside, reached only through links


def _python_files():
    return [p for package in WRITERS for p in (ROOT / package).rglob("*.py")]


def test_every_safetensors_write_goes_through_sdkd_cli_files():
    """A new writer that imports safetensors' save_file directly would write 0600 files again."""
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ImportFrom) and node.module == "safetensors.torch"
                    and any(a.name == "save_file" for a in node.names) and path != ROOT / "cli/files.py"):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


# Where a library's save_pretrained is called directly: inside the checkpoint's follow_umask pass, into a
# temporary folder read back at once, and the helper itself.
DIRECT_SAVE_PRETRAINED = {"cli/files.py": 1, "train/engine/checkpoints.py": 2, "train/formats/model_files.py": 1}


def test_every_save_pretrained_goes_through_sdkd_cli_files():
    calls = {}
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "save_pretrained":
                name = str(path.relative_to(ROOT))
                calls[name] = calls.get(name, 0) + 1
    assert calls == DIRECT_SAVE_PRETRAINED


def _outputs_have_modes(folders: list[Path], mask: int) -> int:
    """Asserts every regular file under `folders` has mode 0o666 & ~mask and every folder 0o777 & ~mask
    (links not followed); returns how many files were checked."""
    found = []
    for top in folders:
        found.append(top)
        for root, dirs, names in os.walk(top):
            found += [Path(root) / name for name in dirs + names]
    wrong, files = [], 0
    for path in found:
        kind = os.lstat(path).st_mode
        if stat.S_ISDIR(kind) and mode(path) != 0o777 & ~mask:
            wrong.append(f"{path}/ {mode(path):o}")
        if stat.S_ISREG(kind):
            files += 1
            if mode(path) != 0o666 & ~mask:
                wrong.append(f"{path} {mode(path):o}")
    assert wrong == []
    return files


@pytest.mark.e2e
@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_runs_exports_loras_and_caches_follow_the_umask(mask, tmp_path):
    """A KD run (checkpoints, student), both exports, a LoRA run and its sd.cpp conversion, a latent cache, a
    one-step run and its ODE-pair cache: under umask 022 every file is 0644 and folder 0755, under 027 0640
    and 0750."""
    run, lora_run, cache = tmp_path / "kd", tmp_path / "lora", tmp_path / "cache"
    one_step, pairs = tmp_path / "one_step", tmp_path / "pairs"
    folder, single, sdcpp = tmp_path / "export", tmp_path / "model.safetensors", tmp_path / "lora-sdcpp.safetensors"
    with umask_set(mask):
        student = save_toy_student(tmp_path / "bk_tiny", "bk_tiny")
        assert run_in_process("train/kd.py", [
            "--config", "configs/toy.yaml", f"output_dir={run}", "train.max_steps=2", "train.checkpoint_every=1",
            "train.sample_every=2", "sample.steps=1", "data.num_samples=4", "train.batch_size=2",
            "ema.enabled=true", "log.trackers=[tensorboard]"]) == 0
        assert run_in_process("train/export.py", [str(run), "--format", "diffusers", "--out", str(folder)]) == 0
        assert run_in_process("train/export.py", [str(run), "--format", "single-file", "--out", str(single)]) == 0
        assert run_in_process("train/lora.py", [
            "--config", "configs/lora_toy.yaml", f"output_dir={lora_run}", f"model={student}",
            "train.max_steps=2", "train.checkpoint_every=1", "train.sample_every=0", "data.num_samples=4",
            "log.trackers=[none]"]) == 0
        assert run_in_process("train/convert_lora.py", [
            "to-sdcpp", str(lora_run), "--out", str(sdcpp)]) == 0
        assert run_in_process("train/cache_latents.py", [
            "--config", "configs/toy.yaml", f"data.cache={cache}", "data.num_samples=4", "--shard-size", "2"]) == 0
        assert run_in_process("train/one_step.py", [
            "--config", "configs/one_step_toy.yaml", f"output_dir={one_step}", f"pairs.cache={pairs}", "pairs.count=4",
            "pairs.eval_count=2", "pairs.steps=2", "pairs.batch_size=4", "distill.warmup_steps=1", "eval.every=1",
            "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=1", "train.sample_every=0",
            "data.num_samples=4", "log.trackers=[none]"]) == 0
    assert (run / "checkpoint-2").is_dir() and any(lora_run.rglob("*.safetensors"))
    assert any(cache.glob("*.safetensors")) and any(folder.rglob("*.safetensors")) and any(pairs.rglob("*.safetensors"))
    checked = _outputs_have_modes([student, run, folder, single, lora_run, sdcpp, cache, one_step, pairs], mask)
    assert checked > 100


# ---------------------------------------------------------------------------------------------
# Links and existing files (issue 22): nothing is written through a link sdkd did not make


def test_links_out_finds_links_leaving_the_folder_and_keeps_those_inside(tmp_path):
    from sdkd.cli.files import links_out

    run, outside = tmp_path / "run", tmp_path / "outside"
    (run / "wandb" / "run-1").mkdir(parents=True)
    outside.mkdir()
    (outside / "bashrc").write_text("mine")
    (run / "wandb" / "latest-run").symlink_to("run-1", target_is_directory=True)  # wandb's own: stays inside
    (run / "config.yaml").symlink_to(outside / "bashrc")
    (run / "samples").symlink_to(outside, target_is_directory=True)
    # wandb's own, to its log under ~/.cache/wandb: its folder is wandb's to write, never sdkd's
    (run / "wandb" / "debug-core.log").symlink_to(outside / "bashrc")
    (run / "logs").mkdir()
    (run / "logs" / "gone").symlink_to(tmp_path / "nowhere")  # dangling: a write would create it outside
    (run / "up").symlink_to("../outside/bashrc")  # relative, out through ..
    assert links_out(run) == [run / "config.yaml", run / "samples", run / "up", run / "logs" / "gone"]
    assert links_out(outside) == []
    shutil.rmtree(run / "wandb")
    (run / "wandb").symlink_to(outside, target_is_directory=True)  # the folder itself a link out: found
    assert run / "wandb" in links_out(run)


def test_refuse_links_is_one_line_naming_the_first_link(tmp_path):
    from sdkd.cli.errors import UserError
    from sdkd.cli.files import refuse_links

    (tmp_path / "out").mkdir()
    refuse_links(tmp_path / "out", "--out")  # none: nothing to say
    refuse_links(tmp_path / "missing", "--out")  # a folder not made yet holds nothing
    (tmp_path / "out" / "a.png").symlink_to(tmp_path / "elsewhere.png")
    (tmp_path / "out" / "b.png").symlink_to("/etc/hostname")
    with pytest.raises(UserError) as err:
        refuse_links(tmp_path / "out", "--out")
    assert str(err.value) == (f"--out '{tmp_path / 'out'}' holds a symbolic link leading out of it: "
                              f"'{tmp_path / 'out' / 'a.png'}' -> '{tmp_path / 'elsewhere.png'}'; sdkd does not write "
                              f"through links it did not make: replace it with the file itself (1 more)")


def test_write_text_replaces_a_link_and_append_text_refuses_one(tmp_path):
    from sdkd.cli.files import append_text, write_text

    target, link = tmp_path / "bashrc", tmp_path / "config.yaml"
    target.write_text("mine\n")
    link.symlink_to(target)
    write_text(link, "teacher: toy\n")
    assert target.read_text() == "mine\n" and not link.is_symlink() and link.read_text() == "teacher: toy\n"
    assert not list(tmp_path.glob(".*.tmp"))
    metrics = tmp_path / "metrics.jsonl"
    append_text(metrics, "1\n")
    append_text(metrics, "2\n")
    assert metrics.read_text() == "1\n2\n"
    metrics.unlink()
    metrics.symlink_to(target)
    with pytest.raises(OSError):  # O_NOFOLLOW: the OS refuses, the target is untouched
        append_text(metrics, "3\n")
    assert target.read_text() == "mine\n"


def test_check_new_file_asks_for_overwrite_and_never_takes_an_input(tmp_path):
    from sdkd.cli.errors import UserError
    from sdkd.cli.files import check_new_file

    lora, other = tmp_path / "lora.safetensors", tmp_path / "other.safetensors"
    lora.write_bytes(b"x")
    other.write_bytes(b"y")
    assert check_new_file(tmp_path / "new.safetensors", "--out", False, (lora,)) == tmp_path / "new.safetensors"
    assert check_new_file(other, "--out", True, (lora,)) == other
    with pytest.raises(UserError, match=r"^--out '.*other.safetensors' exists: pass --overwrite"):
        check_new_file(other, "--out", False, (lora,))
    (tmp_path / "sub").mkdir()
    for same in (lora, tmp_path / "sub" / ".." / "lora.safetensors"):
        with pytest.raises(UserError, match="is the command's input"):
            check_new_file(same, "--out", True, (lora,))
    (tmp_path / "alias").symlink_to(lora)
    with pytest.raises(UserError, match="is the command's input"):
        check_new_file(tmp_path / "alias", "--out", True, (lora,))
    with pytest.raises(UserError, match="is a folder"):
        check_new_file(tmp_path / "sub", "--out", True, (lora,))


def test_written_whole_replaces_the_file_only_when_the_write_completes(tmp_path):
    """written_whole: a completed block renames its temporary file onto the path; a block that raises leaves the old
    file and no temporary one; an OSError inside stops in one line naming the flag and the file."""
    out = tmp_path / "sub" / "model.bin"
    with written_whole(out) as tmp:
        tmp.write_bytes(b"old")
    assert out.read_bytes() == b"old" and [p.name for p in out.parent.iterdir()] == ["model.bin"]
    with pytest.raises(RuntimeError), written_whole(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert out.read_bytes() == b"old" and [p.name for p in out.parent.iterdir()] == ["model.bin"]
    with pytest.raises(UserError, match=rf"^--to '{out}': cannot be written \(disk full\)$"), \
            written_whole(out, "--to") as tmp:
        raise OSError("disk full")
    assert out.read_bytes() == b"old"
