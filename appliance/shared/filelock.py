"""An exclusive lock on a shared file for a ``with`` block: ``lockf`` costs one system call each way, and the kernel
drops it when its process dies, however it dies."""

from __future__ import annotations

import fcntl


class Locked:
    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
