"""The node's own state files: replaced crash-safely, and read back as carefully as anything from outside.

A reader sees either the old file or the new one, never a torn write: the bytes go to a temporary
file in the same directory, which is fsynced, renamed over the target, and then the directory itself
is fsynced so the rename survives a power cut.

Reading back, a state file is still a file someone else may have replaced: it is opened without following
a symbolic link, must be a regular file (not ``/dev/zero`` or a FIFO), and is refused past a size cap
before it is read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fchmod(tmp.fileno(), mode)
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateFileError(OSError):
    """A state file that is a link, not a regular file, or too large; the message names it and why."""


def read_state_bytes(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of a state file; ``FileNotFoundError`` when there is none, ``StateFileError`` (an ``OSError``)
    for a symbolic link, something other than a regular file, or more than ``max_bytes``."""
    target = Path(path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateFileError(errno.ELOOP, f"{target} is a symbolic link; state files are never followed") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise StateFileError(errno.EINVAL, f"{target} is not a regular file")
        if info.st_size > max_bytes:
            raise StateFileError(errno.EFBIG, f"{target} is {info.st_size} bytes, over the limit of {max_bytes}")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while we read it
        raise StateFileError(errno.EFBIG, f"{target} is over the limit of {max_bytes} bytes")
    return data
