"""Small pieces every layer uses: atomic file writes, the one writer lock, file hashes.

WriterLock is an exclusive, non-blocking flock on `<file>.lock` that records "pid host
command", so that a second writer is refused naming the first: shards (extract, import),
texts.h5, confounders.h5 and run folders (train) are guarded by it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import stat
from pathlib import Path

from cmdcl_cache.errors import CacheError, CacheLockedError


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def disk_full(err: OSError) -> bool:
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)


class WriterLock:
    """An exclusive, non-blocking flock on `lock_path`, held by the one process that writes `what`; the file
    keeps the holder's pid, host and command, so that a second writer's refusal names who holds it.

    The only lock of the project: shards (extract, import), texts.h5, confounders.h5, run folders (train)."""

    def __init__(self, lock_path: Path, what: str, command: str):
        self.path = Path(lock_path)
        self._fh = _open_lock_file(self.path)
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self._fh.seek(0)
            holder = self._fh.read().split(maxsplit=2)
            self._fh.close()
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            who = f"pid {holder[0]}" if holder else "pid unknown"
            if len(holder) > 1 and holder[1] != socket.gethostname():
                who += f" on {holder[1]}"
            other = holder[2].strip() if len(holder) > 2 else "process"
            raise CacheLockedError(f"another {other} ({who}) holds {self.path}: it is writing {what}; wait "
                                   "for it to finish or stop it (a killed process releases the lock)") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"{os.getpid()} {socket.gethostname()} {command}\n")
        self._fh.flush()

    def release(self) -> None:
        if not self._fh.closed:
            self._fh.close()   # closing the descriptor drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _open_lock_file(path: Path):
    """The lock file, read-write, never through a symlink (its target would be overwritten) and only when it is
    a regular file: anything else is refused naming the path (CacheError, exit 2)."""
    if path.is_dir() and not path.is_symlink():
        raise CacheError(f"{path}: the lock file is a folder; move it away (`mv {path} {path}.bad`) and rerun")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CacheError(f"{path}: the lock file is a symlink, which is never followed (its target would be "
                             "overwritten); remove the link and rerun") from None
        raise CacheError(f"{path}: the lock file cannot be opened ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CacheError(f"{path}: the lock file is not a regular file; move it away and rerun")
    return os.fdopen(fd, "r+")


def lock_path_of(target: Path) -> Path:
    """Where the lock of a written file lives: beside it, `<name>.lock`."""
    return target.with_name(target.name + ".lock")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` (str: UTF-8) all at once: a reader sees the old file or the new one. A
    folder at `path` is refused, and a failed write leaves no `.tmp` beside it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as err:   # a full disk's error names no file: name the one that was not replaced
        tmp.unlink(missing_ok=True)
        what = "disk full" if disk_full(err) else err.strerror or str(err)
        raise OSError(err.errno, f"{what} while writing; nothing was replaced", str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
