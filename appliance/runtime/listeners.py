"""Which of a process's children still accept connections on its listening sockets, read from /proc (Linux).

``appliance reload`` uses it to return only once the proxy workers it replaced have closed their copy of the listening
socket: before that, a new connection may still land on an old worker and get the old settings (a rotated certificate,
a revoked API key). A socket is shared by every process holding a descriptor to it, so "holds a descriptor to one of
the arbiter's listening sockets" is exactly "may still accept there". The sockets are taken from the arbiter rather
than from the configured port, which the reload may be changing.

Only per-process paths are read (``/proc/<pid>/net``, not ``/proc/net``): the systemd unit's ``ProcSubset=pid`` hides
the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/<pid>/net/tcp's "st" column


def _listening_inodes(pid: int) -> set[int]:
    """Inodes of every listening TCP socket in ``pid``'s network namespace."""
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            fields = row.split()
            if fields[3] == _LISTEN:
                inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` has descriptors to (none once it has exited)."""
    inodes: set[int] = set()
    try:
        fds = list(os.scandir(f"/proc/{pid}/fd"))
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd.path)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listening_sockets(pid: int) -> set[int]:
    """Inodes of the listening TCP sockets ``pid`` holds (empty when /proc does not show them)."""
    return _socket_inodes(pid) & _listening_inodes(pid)


def holders(pids: set[int], inodes: set[int]) -> set[int]:
    """Those of ``pids`` that still hold one of the sockets ``inodes``."""
    return {pid for pid in pids if _socket_inodes(pid) & inodes}


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``."""
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The command name is in parentheses and may hold anything: the fields start after the last ')'.
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found.add(int(entry.name))
    return found
