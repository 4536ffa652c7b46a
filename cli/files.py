"""The modes of the files sdkd writes: what the user's umask gives, as for any file a program creates.

safetensors writes each file through a private temporary file (mode 0600) renamed into place, and diffusers'
and transformers' `save_pretrained` and accelerate's `save_state` write their weights through it: left alone,
exports, checkpoints, LoRAs and caches could be read by their owner only. So every safetensors file sdkd writes
goes through `save_file` here, and every folder a library writes into through `save_pretrained` or
`follow_umask`. Only the files written then are changed, and a symbolic link is never followed: its target may
be any file the user can write.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """This process's umask, read without changing it where Linux shows it (os.umask can only set it, and a
    set-and-restore would race with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_mode(path: str | os.PathLike) -> None:
    """Give the regular file `path` the mode a newly created file gets (0o666 less the umask). A symbolic link,
    or anything but a regular file, is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW refuses a link: not ours to change
            return
        raise
    try:  # changed through the descriptor: what was opened is what is changed, whatever the path becomes
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)


def _files(folder: Path) -> dict[str, tuple[int, int, int]]:
    """The regular files under `folder` (links not followed), each with what tells a rewritten one apart."""
    found = {}
    for root, _, names in os.walk(folder):  # os.walk does not descend into linked folders
        for name in names:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                found[path] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return found


@contextmanager
def follow_umask(folder: str | os.PathLike):
    """The regular files that the block writes under `folder` (new or rewritten) get `user_mode`; the files
    that were there before and are left untouched keep theirs. Folders are made by the libraries' own mkdir,
    which follows the umask already."""
    folder = Path(folder)
    before = _files(folder)
    yield
    for path, ident in _files(folder).items():
        if before.get(path) != ident:
            user_mode(path)


def save_file(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, the file then given the mode the umask gives."""
    from safetensors.torch import save_file as write

    write(tensors, str(path), metadata=metadata)
    user_mode(path)


def save_pretrained(model, folder: str | os.PathLike, **kwargs) -> None:
    """`model.save_pretrained(folder, **kwargs)` (a diffusers or transformers model or pipeline, an EMA), its
    files then given the mode the umask gives."""
    with follow_umask(folder):
        model.save_pretrained(str(folder), **kwargs)


def report_file(path: str | os.PathLike, flag: str) -> Path:
    """A file a command writes at its end (a benchmark's --json): checked before the minutes of work, so a
    mistake costs one line, not the results. A folder, or a file in a folder that does not exist or cannot
    be written, is a UserError naming `flag`."""
    from sdkd.cli.errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} '{path}' is a folder; give a file")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{flag} '{path}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} '{path}': folder '{parent}' cannot be written")
    return path


def creatable(path: str | os.PathLike, flag: str) -> Path:
    """A file or folder a command will create at `path`, with the folders above it that are missing: checked
    before the command's work, creating nothing. The nearest existing folder above must be a folder this
    process can write; else a UserError naming `flag`."""
    from sdkd.cli.errors import UserError

    path = Path(path)
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{flag} '{path}': cannot be written ('{above}' is a file)")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{flag} '{path}': cannot be written (folder '{above}' is not writable)")
    return path
