"""The run folder: one run at a time in it, and another run's files never replaced by mistake.

`claim` runs before anything is loaded: the main process checks the run's inputs (models, data path); refuses a
folder that is no place for a run (empty output_dir, the root, the home folder, a folder of other files) or that
holds another run, unless the run resumes it or was told to overwrite it; and only then creates OUTPUT and takes
an exclusive lock on OUTPUT/.lock (the OS drops it when the process ends, however it ends, so a crashed run never
leaves it stuck): a refused start writes nothing. `start` is the run's first write, once its models and checkpoint
have loaded: it clears the run being overwritten and saves the resolved config.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from sdkd.cli.errors import UserError
from sdkd.cli.files import check_writable, refuse_links
from sdkd.train.engine.config import RunConfig, save_config
from sdkd.train.engine.distributed import agree

LOCK = ".lock"
_held: dict[Path, int] = {}  # folder -> lock file descriptor, open for the life of the process


def _lock(folder: Path) -> None:
    # O_NOFOLLOW: a .lock that is a link (to a file inside the folder) is refused, never truncated through.
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 100).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"output_dir '{folder}' is in use by another run ({owner}); wait for it to end or "
                        f"choose another output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}".encode())
    _held[folder] = fd


def _check(cfg: RunConfig) -> None:
    cfg.check_inputs()
    given = str(cfg.output_dir)
    if not given.strip():
        raise UserError("output_dir is empty: name a new or empty folder for the run (e.g. output_dir=runs/toy)")
    folder = Path(given)
    where = folder.resolve()
    special = {Path(where.anchor): "the root folder", Path.home().resolve(): "your home folder"}.get(where)
    if special:
        raise UserError(f"output_dir '{folder}' is {special}: name a new or empty folder for the run "
                        f"(e.g. output_dir=runs/toy)")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output_dir '{folder}': cannot be written (it is a file)")
    refuse_links(folder, "output_dir")  # before the lock file is opened there
    contents = sorted(p.name for p in folder.iterdir() if p.name != LOCK) if folder.is_dir() else []
    # A run's folder: its config.yaml, or checkpoints alone (a run's checkpoint copied to resume elsewhere).
    is_run = (folder / "config.yaml").is_file() or (cfg.resume is not None and any(folder.glob("checkpoint-*")))
    if contents and not is_run:
        raise UserError(f"output_dir '{folder}' is not empty and holds no sdkd run (no config.yaml): "
                        f"choose a new or empty folder")
    if contents and cfg.resume is None and not cfg.overwrite:
        raise UserError(f"output_dir '{folder}' holds another run ({', '.join(contents[:4])}"
                        f"{', ...' if len(contents) > 4 else ''}): set resume=latest to continue it, "
                        f"overwrite=true to replace it, or choose another output_dir")
    check_writable(folder, "output_dir")
    try:  # the run's first writes, once nothing refuses it
        folder.mkdir(parents=True, exist_ok=True)
        if where not in _held:
            _lock(where)
    except OSError as err:
        raise UserError(f"output_dir '{folder}': cannot be written ({err.strerror or err})") from None


def claim(cfg: RunConfig, acc) -> None:
    """Lock OUTPUT and check it may be used (main process); every process stops on a refusal."""
    problem = None
    if acc.is_main_process:
        try:
            _check(cfg)
        except UserError as err:
            problem = str(err)
    agree(acc, problem)


def start(cfg: RunConfig, acc) -> None:
    """The run's first write to OUTPUT: clear the run it overwrites, save the resolved config."""
    if acc.is_main_process:
        folder = Path(cfg.output_dir)
        if cfg.overwrite and cfg.resume is None:
            for path in folder.iterdir():
                if path.name != LOCK:
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        save_config(cfg, folder / "config.yaml")
    acc.wait_for_everyone()
