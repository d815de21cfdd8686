"""Which of a process's children still accept connections on a TCP port, read from /proc (Linux).

``appliance reload`` uses it to return only once the proxy workers it replaced have closed their copy of the listening
socket: before that, a new connection may still land on an old worker and get the old settings (a rotated certificate,
a revoked API key). A socket is shared by every process holding a descriptor to it, so "holds a descriptor to a
listening socket on the port" is exactly "may still accept there".

Only per-process paths are read (``/proc/<pid>/net``, not ``/proc/net``): the systemd unit's ``ProcSubset=pid`` hides
the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/<pid>/net/tcp's "st" column


def listening_inodes(pid: int, port: int) -> set[int]:
    """Inodes of the listening TCP sockets on ``port`` (any address) in ``pid``'s network namespace."""
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            fields = row.split()
            if fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def holds_any(pid: int, inodes: set[int]) -> bool:
    """Whether ``pid`` has a descriptor to one of the sockets ``inodes`` (False once it has exited)."""
    try:
        fds = list(os.scandir(f"/proc/{pid}/fd"))
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd.path)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            return True
    return False


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


def accepting_children(pid: int, port: int) -> set[int] | None:
    """``pid``'s children that hold its listening socket on ``port``; None when ``pid`` itself holds none there (not
    listening, or /proc does not show it), since then nothing can be said about its children."""
    inodes = listening_inodes(pid, port)
    if not holds_any(pid, inodes):
        return None
    return {child for child in children(pid) if holds_any(child, inodes)}
