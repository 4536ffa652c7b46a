"""The modes of the files sdkd writes: what the user's umask gives, as for any file a program creates.

safetensors writes each file through a private temporary file (mode 0600) renamed into place, and diffusers'
and transformers' `save_pretrained` and accelerate's `save_state` write their weights through it: left alone,
exports, checkpoints, LoRAs and caches could be read by their owner only. So every safetensors file sdkd writes
goes through `save_file` here, and every folder a library writes into through `save_pretrained` or
`follow_umask`. Only the files written then are changed, and a symbolic link is never followed: its target may
be any file the user can write.

For the same reason nothing is written through a link sdkd did not make: a folder sdkd writes into (a run folder,
an output, a cache) is refused when a link in it leads out of it (`refuse_links`: a run folder received as a tar
keeps its links, and `config.yaml -> ~/.bashrc` would have the resumed run's config written there), the files
sdkd rewrites are replaced (`write_text`, safetensors' own writes), never written in place, and appended files
are opened without following a link (`append_text`). An existing file is replaced only when the user asked
(`check_new_file`), and never when it is one of the command's inputs.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from pathlib import Path

from sdkd.cli.errors import UserError, first_line


def check_writable(folder: str | os.PathLike, flag: str, shown: str | os.PathLike | None = None) -> None:
    """Refuse, in one line naming `flag` and `shown` (default: `folder`), a folder that could not be created or
    written, without creating it (a command creates its output folder only once it has something to write)."""
    path, shown = Path(folder).absolute(), folder if shown is None else shown
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} '{shown}': cannot be written ('{existing}' is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} '{shown}': cannot be written (permission denied on '{existing}')")


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


@contextmanager
def written_whole(path: str | os.PathLike, flag: str = "--out", errors: tuple[type[Exception], ...] = ()):
    """A temporary name beside `path` to write the file under, renamed to `path` when the block ends: a failed or
    interrupted write leaves the old file (or none). OSError (a read-only file system, a full disk) and `errors`
    stop in one line naming `flag` and the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except (OSError, *errors) as err:
        raise UserError(f"{flag} '{path}': cannot be written ({first_line(err)})") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_file(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, the file then given the mode the umask gives."""
    from safetensors.torch import save_file as write

    write(tensors, str(path), metadata=metadata)
    user_mode(path)


def save_pretrained(model, folder: str | os.PathLike, **kwargs) -> None:
    """`model.save_pretrained(folder, **kwargs)` (a diffusers or transformers model or pipeline, an EMA), its
    files then given the mode the umask gives."""
    refuse_links(folder, "folder")
    with follow_umask(folder):
        model.save_pretrained(str(folder), **kwargs)


def _outside(link: Path, folder: Path) -> bool:
    """Whether the link `link` under `folder` leads out of it (or nowhere)."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling or a loop: a write would create or fail somewhere unknown
        return True
    return not target.is_relative_to(folder.resolve())


# Folders of a run that another library writes and sdkd never writes into: wandb links its run's logs to files
# under ~/.cache/wandb itself.
FOREIGN = ("wandb",)


def links_out(folder: str | os.PathLike) -> list[Path]:
    """The symbolic links under `folder` (itself excluded) that lead out of it or nowhere, in walk order, outside
    the FOREIGN folders at its top. Links that stay inside (wandb's `latest-run`) are the folder's own business."""
    folder = Path(folder)
    found = []
    for root, dirs, names in os.walk(folder):  # does not descend into linked folders: they are listed in dirs
        if Path(root) == folder:
            dirs[:] = [d for d in dirs if d not in FOREIGN or (folder / d).is_symlink()]
        for name in sorted(dirs + names):
            path = Path(root) / name
            if path.is_symlink() and _outside(path, folder):
                found.append(path)
    return found


def refuse_links(folder: str | os.PathLike, what: str) -> None:
    """A UserError naming the first link under `folder` that leads out of it: sdkd is about to write there.
    `what` names the folder for the user ("output_dir", "--out")."""
    if not Path(folder).is_dir():
        return
    found = links_out(folder)
    if found:
        link = found[0]
        raise UserError(f"{what} '{folder}' holds a symbolic link leading out of it: '{link}' -> "
                        f"'{os.readlink(link)}'; sdkd does not write through links it did not make: replace it "
                        f"with the file itself{f' ({len(found) - 1} more)' if len(found) > 1 else ''}")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether the paths name one file (through links, `..`, hard links); False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_new_file(path: str | os.PathLike, what: str, overwrite: bool, inputs: tuple = ()) -> Path:
    """Check that the output file `path` may be written: never one of `inputs` (the command's input files or
    folders, any path naming them), and an existing file (or link) only with `overwrite`. `what` names the
    option for the user ("--out"). Returns the path."""
    path = Path(path)
    for source in inputs:
        if source is not None and same_file(path, source):
            raise UserError(f"{what} '{path}' is the command's input '{source}': write to another file")
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder: give the file to write")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UserError(f"{what} '{path}' exists: pass --overwrite to replace it, or choose another file")
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    """`path` written with `text`, whole: through a temporary file renamed into place, so a link at `path` is
    replaced and never written through, and an interrupted write leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def append_text(path: str | os.PathLike, text: str) -> None:
    """`text` appended to `path` (created if missing), refused by the OS when `path` is a link."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    with os.fdopen(fd, "a") as f:
        f.write(text)


def report_file(path: str | os.PathLike, flag: str, overwrite: bool = False) -> Path:
    """A file a command writes at its end (a benchmark's --json): checked before the minutes of work, so a
    mistake costs one line, not the results. A folder, an existing file without `overwrite` (--overwrite), or a
    file in a folder that does not exist or cannot be written, is a UserError naming `flag`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} '{path}' is a folder; give a file")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UserError(f"{flag} '{path}' exists: pass --overwrite to replace it, or choose another file")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{flag} '{path}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} '{path}': folder '{parent}' cannot be written")
    return path


def creatable(path: str | os.PathLike, flag: str) -> Path:
    """A file or folder a command will create at `path`, with the folders above it that are missing: checked
    before the command's work, creating nothing (`check_writable` on the folder it goes in)."""
    path = Path(path)
    check_writable(path.parent, flag, shown=path)
    return path
