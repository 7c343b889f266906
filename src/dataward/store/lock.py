"""The single-writer rule of a ward's files: one process at a time trains, writes and cleans up ``models/``.

Readers (sampling, status, the service's generations) never take the lock; the ledger's transactions already make
accepting a forget safe from any process at any time. The lock is an advisory ``flock`` on ``WARD/writer.lock``, so it
is released by the kernel when its holder dies (``kill -9`` included); the file says who holds it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dataward.errors import DatawardError

LOCK_FILE = "writer.lock"
STAGING_MARK = ".dataward-staging-"  # a ward (or an export) is built in ``.NAME.dataward-staging-XXXX`` beside it, then renamed


class WriterBusy(DatawardError):
    """Another process holds the ward's writer lock."""


class WriterLock:
    """The writer lock of one ward for one :class:`~dataward.ward.Ward` (re-entrant within it)."""

    def __init__(self, ward: Path):
        self.path = Path(ward) / LOCK_FILE
        self._fd: int | None = None
        self._depth = 0

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it (pid and command), or "unknown"."""
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self) -> None:
        """Take the lock now, or raise :class:`WriterBusy` naming the process that holds it."""
        if self._depth == 0:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise WriterBusy(f"another process is writing to this ward ({self.holder()}): it trains whatever is missing, "
                                 f"including forgets accepted meanwhile; wait for it to finish (`dataward status` shows pending work)") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}".encode())
            self._fd = fd
        self._depth += 1

    def release(self) -> None:
        """Give the lock back (when the outermost holder in this ward releases it)."""
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def new_staging(ward: Path) -> tuple[Path, WriterLock]:
    """A fresh folder beside ``ward`` to build it in, with its writer lock held (release it once the folder was renamed
    into place). Folders left by a creation that was killed (their lock is free) are removed first; one that another
    process is building (its lock is held) is left alone."""
    ward.parent.mkdir(parents=True, exist_ok=True)
    for folder in ward.parent.glob(f".{ward.name}{STAGING_MARK}*"):
        lock = WriterLock(folder)
        try:
            lock.acquire()
        except (WriterBusy, OSError):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        lock.release()
    staging = Path(tempfile.mkdtemp(prefix=f".{ward.name}{STAGING_MARK}", dir=ward.parent))
    lock = WriterLock(staging)
    lock.acquire()
    return staging, lock


@contextmanager
def staged(target: Path, keep_lock_file: bool = True) -> Iterator[Path]:
    """Build the folder ``target`` (new, or empty) in a locked staging folder beside it (:func:`new_staging`): renamed
    into place when the block ends, removed with everything in it if the block raises. ``keep_lock_file=False`` drops
    the (empty) lock file before the rename, for folders that are not wards."""
    staging, lock = new_staging(target)
    try:
        yield staging
        if not keep_lock_file:
            lock.path.unlink()
        if target.exists():
            target.rmdir()
        staging.replace(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        lock.release()
