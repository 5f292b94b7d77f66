"""An exclusive lock between processes, on a lock file that is removed again when released.

Two processes converting into the same directory, or recording verified files in the same $ZOO_HOME, take
turns through one of these. It is flock(2) on PATH: the kernel drops it when its process dies (even by
SIGKILL), so a crash never leaves a lock that must be cleared by hand. The holder removes PATH before
releasing it; a process that was waiting on the removed file sees that PATH no longer names the file it
locked and locks the new one instead (the usual remove-on-release protocol), so no two holders overlap.
Without fcntl (Windows) it falls back to the filelock package, which leaves the file in place.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None


class ProcessLock:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._fallback = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with blocking=False, return False at once if another process holds it."""
        if fcntl is None:
            from filelock import FileLock, Timeout

            self._fallback = self._fallback or FileLock(str(self.path))
            try:
                self._fallback.acquire(timeout=-1 if blocking else 0)
            except Timeout:
                return False
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                st = os.stat(self.path)
                mine = os.fstat(fd)
                same = (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # the holder before us removed that file while we waited: lock the one PATH names now

    def release(self) -> None:
        if fcntl is None:
            if self._fallback is not None:
                self._fallback.release()
            return
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ProcessLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
