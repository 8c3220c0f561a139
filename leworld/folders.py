"""Writing without losing anything: the lock a process holds on a folder it writes in, files
written under names nobody else uses, and the room a write needs, checked before it starts.

A run folder or a dataset folder is written by one process at a time. That process holds an OS
lock (flock) on `<folder>/.leworld.lock` for as long as it writes there; a second process that
asks for the folder is refused in one line naming the first (its pid, command and start). The
lock is the kernel's: it goes with the process however it ends (kill -9 included), so there is
never a stale lock to clear by hand. It holds between processes of one machine; a folder on a
network file system shared by two machines is not protected (flock there may be local only).
"""

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from leworld import LeworldError

LOCK_NAME = ".leworld.lock"
UMASK = os.umask(0o022)
os.umask(UMASK)  # read back by setting it: the process's umask, unchanged


class FolderLock:
    """This process's hold on a folder (lock_folder makes one). release() lets it go, and removes the
    folder again when this process made it and left nothing in it."""

    def __init__(self, folder: Path, fd: int, made: bool):
        self.folder, self.fd, self.made = folder, fd, made

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.stat(self.folder / LOCK_NAME).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.folder / LOCK_NAME)  # before the lock goes: see lock_folder
        except FileNotFoundError:
            pass  # the folder was removed with the lock file in it
        os.close(self.fd)
        self.fd = None
        if self.made and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder: str | Path, busy: str, create: bool = True) -> FolderLock:
    """Lock `folder` for this process (made first when `create` and missing) -> its FolderLock, or a
    LeworldError naming the process that holds it, ended by `busy` (what the user can do then)."""
    folder = Path(folder)
    made = create and not folder.exists()
    if folder.exists() and not folder.is_dir():
        raise LeworldError(f"{folder} is a file, not a folder; choose another")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LeworldError(f"{folder} is in use by {holder(folder)}; {busy}") from None
            # A holder unlinks the file before it lets go: a file locked after that is not the one in
            # the folder now, so try again with the one that is.
            try:
                if os.stat(folder / LOCK_NAME).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        started = datetime.datetime.now().isoformat(timespec="seconds")
        command = " ".join(["python", *getattr(sys, "orig_argv", sys.argv)[1:]])
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                 "since": started}).encode())
    except OSError as err:
        raise LeworldError(f"cannot write in {folder} ({err.strerror or err}); make it writable or choose another") from None
    return FolderLock(folder, fd, made)


def holder(folder: Path) -> str:
    """Who holds a folder's lock, from what it wrote in the lock file."""
    try:
        who = json.loads((folder / LOCK_NAME).read_text())
        return f"process {who['pid']} on {who['host']} ({who['command']}, since {who['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has only just started)"


def entries(folder: Path) -> list[Path]:
    """What a folder holds, its lock file aside."""
    return [p for p in folder.iterdir() if p.name != LOCK_NAME]


def unique_partial(final: Path) -> Path:
    """A new empty file beside `final` under a name nobody else uses, to be written and then moved
    onto `final` (a fixed name such as <final>.partial may be a file of the user's)."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial")
    os.fchmod(fd, 0o666 & ~UMASK)  # what open() would give it, not mkstemp's owner-only 0600
    os.close(fd)
    return Path(name)


def write_atomically(final: Path, data: bytes, sync: bool = False) -> None:
    """`final` holds `data` whole or keeps what it held: written beside it, then renamed onto it."""
    partial = unique_partial(final)
    try:
        with open(partial, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def move_without_overwriting(partial: Path, final: Path) -> None:
    """Rename `partial` to `final` only if nothing is there, in one step (a hard link cannot replace a
    file), so that a file made at `final` meanwhile is never overwritten: FileExistsError then."""
    try:
        os.link(partial, final)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if final.exists():  # a file system without hard links: checked, then renamed
            raise FileExistsError(errno.EEXIST, "File exists", str(final)) from None
        os.replace(partial, final)
        return
    partial.unlink()


def check_free_space(root: Path, needed: int, fix: str = "free space or choose another path=") -> None:
    """LeworldError unless the disk that holds (or will hold) `root` has `needed` bytes free: a full
    disk under a memory map ends the process by SIGBUS, with no message."""
    existing = next(p for p in [root, *root.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    unit, scale = ("GB", 1e9) if max(needed, free) >= 1e8 else ("MB", 1e6)
    if free < needed:
        raise LeworldError(f"{root} needs {needed / scale:.1f} {unit} but its disk has {free / scale:.1f} {unit} free; {fix}")
