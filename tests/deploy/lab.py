"""Container lab for deployment tests: Debian bookworm hosts with systemd as PID 1 (systemd-nspawn), offline.

`ensure_image()` builds the base root filesystem once per machine (mmdebstrap from the Debian mirror apt on this machine
uses) and caches it as a .tar.zst. `Lab` boots containers with an overlayfs root each over one extracted copy of it,
on a private bridge in 198.18.0.0/15 (no NAT, no default route), reachable over SSH. Needs root, systemd-nspawn,
mmdebstrap, zstd, tar, ssh and ip (`scripts/setup.sh --dev` installs them).

All lab resources live under WORK_ROOT, bridges named BRIDGE_PREFIX*, and cgroups named CGROUP_PREFIX*, and only one
lab runs per machine at a time (a flock on LOCK_PATH), so `sweep()` can remove everything a killed run left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import hashlib
import io
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from types import FrameType, TracebackType
from typing import Any

# A fresh Debian 12 host: systemd, sshd and Python, plus what the tests use to reach and inspect it (sudo for
# Ansible's become, ip and ss, ps and pgrep, curl; python3-apt, which Ansible's apt module needs in check mode and
# would install itself otherwise). Nothing the roles install is here.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-apt",
    "iproute2",
    "curl",
    "procps",
    "sudo",
)
# What the roles install from a Debian mirror (site.yml, and fleet.yml for tests/deploy/test_fleet.py). The hosts are
# offline, so these are only downloaded into apt's archive cache: installed nowhere, until a role asks apt for them.
MIRRORED = (
    "python3-venv",
    "python3-packaging",
    "libgomp1",
    "haproxy",
    "socat",
    "prometheus",
)
RECIPE_VERSION = "2"  # bump when the image recipe below changes
SUITE = "bookworm"
LAB_NET = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range: never routed anywhere

WORK_ROOT = Path("/var/tmp/appliance-lab")  # on disk: each lab extracts ~300 MiB here
LOCK_PATH = Path("/run/lock" if Path("/run/lock").is_dir() else "/var/tmp") / "appliance-lab.lock"
BRIDGE_PREFIX = "alab-"
CGROUP_PREFIX = "appliance-lab."
CONTAINER_PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
_NAME = re.compile(r"[a-z][a-z0-9-]{0,19}")
_TAR_OPTS = ("--numeric-owner", "--xattrs", "--xattrs-include=*")
_SLOW_AT_BOOT = (  # timers and boot jobs that only cost time in a throwaway container
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
)


class LabError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[lab] {msg}", file=sys.stderr, flush=True)


def _tail(text: str, lines: int = 40, chars: int = 4000) -> str:
    out = "\n".join(text.strip().splitlines()[-lines:])
    return out[-chars:]


def _ticks(timeout: float, interval: float) -> Iterator[float]:
    """Bounded polling: yields the seconds left until the deadline, sleeping `interval` between yields."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        yield left
        time.sleep(interval)


def _run(
    argv: Sequence[str], *, timeout: float, check: bool = True, input: bytes | None = None, what: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run argv in its own process group (killed as a whole on timeout); on failure the error carries its output."""
    what = what or " ".join(argv)
    with subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as p:
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            out, err = b"", b""
            with contextlib.suppress(subprocess.TimeoutExpired):
                out, err = p.communicate(timeout=5)
            output = (out + err).decode(errors="replace")
            raise LabError(f"{what}: timed out after {timeout:.0f} s\n{_tail(output)}") from None
    res = subprocess.CompletedProcess(
        list(argv), p.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )
    if check and res.returncode != 0:
        raise LabError(f"{what}: exit status {res.returncode}\n{_tail(res.stdout + res.stderr)}")
    return res


def _need_root_and(*tools: str) -> None:
    if os.geteuid() != 0:
        raise LabError("the container lab needs root")
    missing = [t for t in tools if not any(Path(d, t).exists() for d in ("/usr/bin", "/usr/sbin", "/bin", "/sbin"))]
    if missing:
        raise LabError(f"missing host tools: {', '.join(missing)} (scripts/setup.sh --dev installs them)")


# --- the base image -------------------------------------------------------------------------------------------------


def apt_mirror() -> str:
    """The URL of the Debian archive that apt on this machine uses for SUITE main (deb822 and one-line formats)."""
    d = Path("/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list"), *sorted(d.glob("*.list")), *sorted(d.glob("*.sources"))]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        entries: list[dict[str, list[str]]] = []
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, list[str]] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ", "\t")):
                        key, value = line.split(":", 1)
                        fields[key.strip().lower()] = value.split()
                if fields.get("enabled", ["yes"])[0].lower() != "no":
                    entries.append(fields)
        else:
            for line in text.splitlines():
                m = re.match(r"\s*(deb)\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+([^#]*)", line)
                if m:
                    entries.append({"types": [m[1]], "uris": [m[2]], "suites": [m[3]], "components": m[4].split()})
        for e in entries:
            if "deb" in e.get("types", []) and SUITE in e.get("suites", []) and "main" in e.get("components", []):
                return e["uris"][0].rstrip("/")
    raise LabError(f"no apt source for '{SUITE} main' in /etc/apt/sources.list or /etc/apt/sources.list.d/")


def image_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    key = hashlib.sha256(json.dumps([RECIPE_VERSION, SUITE, sorted(PACKAGES), sorted(MIRRORED)]).encode()).hexdigest()
    return Path(base) / "appliance" / "images" / key


def ensure_image() -> Path:
    """The cached base image (.tar.zst), built on the first call on a machine."""
    final = image_dir() / "base.tar.zst"
    if final.is_file():
        return final
    _need_root_and("mmdebstrap", "zstd", "tar", "systemctl")
    final.parent.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(final.parent.parent / ".build.lock", timeout=1200, what="another image build"):
        if final.is_file():
            return final
        for stale in final.parent.parent.glob(".tmp-*"):  # a killed build: we hold the build lock, so it is dead
            _remove_tree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent.parent))
        tmp.chmod(0o755)  # apt downloads as the unprivileged _apt user
        try:
            tree = tmp / "root"
            mirror = apt_mirror()
            log(f"building image (first run on this machine, ~1-2 min) from {mirror} ...")
            t0 = time.monotonic()
            _run(
                [
                    "mmdebstrap",
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    # The cache then holds MIRRORED only: apt installs them offline, as if from the mirror.
                    '--customize-hook=chroot "$1" apt-get clean',
                    f'--customize-hook=chroot "$1" apt-get install --download-only --yes --no-install-recommends '
                    f'{" ".join(MIRRORED)}',
                    # Keep the package lists and that cache: Ansible's apt module resolves packages against the lists.
                    "--skip=cleanup/apt",
                    *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")),
                    SUITE,
                    str(tree),
                    mirror,
                ],
                timeout=1200,
                what="mmdebstrap",
            )
            _customize(tree)
            log(f"bootstrapped in {time.monotonic() - t0:.0f} s; compressing ...")
            _run(
                ["tar", *_TAR_OPTS, "-I", "zstd -T0 -3", "-C", str(tree), "-cf", str(tmp / final.name), "."],
                timeout=600,
            )
            (tmp / "packages.txt").write_text(f"installed: {' '.join(PACKAGES)}\nmirrored: {' '.join(MIRRORED)}\n")
            _remove_tree(tree)
            _remove_tree(final.parent)  # an incomplete entry someone else left
            tmp.rename(final.parent)  # atomic: the cache holds a whole image or none
            log(f"image cached at {final} ({final.stat().st_size >> 20} MiB, {time.monotonic() - t0:.0f} s)")
        finally:
            _remove_tree(tmp)
    return final


def _customize(tree: Path) -> None:
    etc = tree / "etc"
    for f in ("resolv.conf", "hostname"):  # mmdebstrap copies the build host's; the lab writes its own per container
        (etc / f).unlink(missing_ok=True)
    # No resolver runs in the lab: lookups fail at once instead of timing out (ssh and Ansible do reverse lookups).
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (etc / "machine-id").write_text("")  # each container writes its own id into its overlay
    (etc / "ssh/sshd_config.d/lab.conf").write_text("UseDNS no\nPasswordAuthentication no\n")
    (tree / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    _run(["systemctl", f"--root={tree}", "enable", "systemd-networkd.service"], timeout=60)
    _run(["systemctl", f"--root={tree}", "mask", *_SLOW_AT_BOOT], timeout=60)


# --- locking and sweeping -------------------------------------------------------------------------------------------


class _Lock:
    """An exclusive flock, waited for with a bound and a message naming the holder."""

    def __init__(self, path: Path, *, timeout: float, what: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for i, _ in enumerate(_ticks(timeout, 1.0)):
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if i == 0:
                        holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
                        log(f"waiting up to {timeout:.0f} s for {what} to finish (lock {path}, pid {holder or '?'})")
            else:
                raise LabError(f"{what} still holds {path} after {timeout:.0f} s; is a stuck run on this machine?")
        except BaseException:
            os.close(self.fd)
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1

    def __enter__(self) -> _Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def lab_lock(timeout: float = 900.0) -> Iterator[None]:
    """Hold the machine-wide lab lock (as Lab does for its whole life)."""
    with _Lock(LOCK_PATH, timeout=timeout, what="another lab"):
        yield


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0]


def _alive(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[1] != "Z"


def _nspawn_pids() -> dict[int, str]:
    """systemd-nspawn processes running a root under WORK_ROOT: pid -> root."""
    pids = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        roots = [a.decode(errors="replace") for a in argv if a.startswith(f"{WORK_ROOT}/".encode())]
        if argv[0].endswith(b"systemd-nspawn") and roots:
            pids[int(p.name)] = roots[0]
    return pids


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below root, deepest first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
        if point == str(root) or point.startswith(f"{root}/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _unmount_all(root: Path) -> None:
    for _ in range(3):
        points = _mounts_under(root)
        if not points:
            return
        for point in points:
            if _run(["umount", point], timeout=30, check=False).returncode != 0:
                _run(["umount", "-l", point], timeout=30, check=False)
    if _mounts_under(root):
        raise LabError(f"cannot unmount {_mounts_under(root)}")


def _remove_tree(path: Path) -> None:
    """rm -rf that never crosses into a mount (a killed mmdebstrap leaves /proc, /sys, /dev bound in its tree)."""
    if not path.exists():
        return
    _unmount_all(path)
    _run(["rm", "-rf", "--one-file-system", str(path)], timeout=300)


def _cgroup_roots() -> list[Path]:
    """The hierarchies each container gets its own cgroup in: name=systemd and cgroup2 (hybrid), or cgroup2 alone."""
    top = Path("/sys/fs/cgroup")
    if (top / "cgroup.controllers").exists():
        return [top]
    return [top / h for h in ("systemd", "unified") if (top / h / "cgroup.procs").exists()]


def _cgroup_pids(dirs: Sequence[Path]) -> set[int]:
    pids: set[int] = set()
    for d in dirs:
        for sub, _, _ in os.walk(d):
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in Path(sub, "cgroup.procs").read_text().split())
    return pids


def _kill_cgroups(dirs: Sequence[Path], timeout: float = 10.0) -> None:
    for _ in _ticks(timeout, 0.1):
        pids = {p for p in _cgroup_pids(dirs) if _alive(p)}
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    raise LabError(f"processes survive SIGKILL in {[str(d) for d in dirs]}: {sorted(_cgroup_pids(dirs))}")


def _lab_cgroups() -> list[Path]:
    return [d for root in _cgroup_roots() for d in root.glob(f"{CGROUP_PREFIX}*")]


def _bridges() -> list[str]:
    return sorted(p.name for p in Path("/sys/class/net").glob(f"{BRIDGE_PREFIX}*") if (p / "bridge").is_dir())


def _veths() -> list[str]:
    """Host ends of nspawn's veth pairs: one can outlive its container while the kernel is slow to free the network
    namespace, and would then make the next container of that name fail ("vb-NAME: File exists")."""
    return sorted(p.name for p in Path("/sys/class/net").glob("vb-*"))


def leftovers() -> list[str]:
    """Every lab resource on this machine (empty when no lab runs and nothing leaked); each names its lab's prefix."""
    found = [f"nspawn pid {p} {root}" for p, root in _nspawn_pids().items() if _alive(p)]
    found += [f"mount {m}" for m in _mounts_under(WORK_ROOT)]
    found += [f"bridge {b}" for b in _bridges()]
    found += [f"veth {v}" for v in _veths()]
    found += [f"cgroup {c}" for c in _lab_cgroups()]
    found += [f"dir {d}" for d in sorted(WORK_ROOT.glob("*"))] if WORK_ROOT.is_dir() else []
    return found


def sweep(stop_timeout: float = 15.0) -> list[str]:
    """Remove every lab resource on this machine: call only while holding the lab lock (then none is in use)."""
    found = leftovers()
    errors: list[str] = []

    def attempt(step: Callable[..., object], *args: Any, **kwargs: Any) -> None:  # every step runs, even after errors
        try:
            step(*args, **kwargs)
        except (OSError, LabError) as e:
            errors.append(str(e))

    pids = [p for p in _nspawn_pids() if _alive(p)]
    for pid in pids:  # SIGTERM lets nspawn power its container off cleanly
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for _ in _ticks(stop_timeout, 0.1):
        if not any(_alive(p) for p in pids):
            break
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    groups = _lab_cgroups()
    attempt(_kill_cgroups, groups)
    attempt(_unmount_all, WORK_ROOT)
    for br in _bridges():
        attempt(_run, ["ip", "link", "del", br], timeout=30)
    for veth in _veths():
        attempt(_run, ["ip", "link", "del", veth], timeout=30)
    for group in groups:
        for sub, _, _ in sorted(os.walk(group), key=lambda w: len(w[0]), reverse=True):
            attempt(os.rmdir, sub)
    for d in sorted(WORK_ROOT.glob("*")):
        attempt(_remove_tree, d)
    if errors:
        raise LabError("sweep left resources behind:\n" + "\n".join(errors))
    return found


# --- the lab --------------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _find_pid1(nspawn_pid: int) -> int | None:
    """The container's init: the descendant of nspawn that is PID 1 in its own PID namespace."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        st = _proc_stat(int(p.name)) if p.name.isdigit() else None
        if st:
            children.setdefault(st[0], []).append(int(p.name))
    level = [nspawn_pid]
    for _ in range(4):
        level = [c for pid in level for c in children.get(pid, [])]
        for pid in level:
            with contextlib.suppress(OSError):
                nspid = re.search(r"^NSpid:\s+(.*)$", Path(f"/proc/{pid}/status").read_text(), re.M)
                if nspid and len(nspid[1].split()) > 1 and nspid[1].split()[-1] == "1":
                    return pid
    return None


class Lab:
    """Containers booted with systemd as PID 1 on a private bridge; a context manager that cleans up everything.

    hosts maps container name (also its hostname) -> IPv4 address in 198.18.0.0/15 inside bridge_cidr's network.
    """

    def __init__(
        self,
        name_prefix: str,
        hosts: dict[str, str],
        *,
        bridge_cidr: str = "198.18.0.1/24",
        boot_timeout: float = 90.0,
        lock_timeout: float = 900.0,
    ) -> None:
        bridge = ipaddress.ip_interface(bridge_cidr)
        if not _NAME.fullmatch(name_prefix) or not hosts or not all(_NAME.fullmatch(n) for n in hosts):
            raise ValueError(f"names must match {_NAME.pattern} and hosts must not be empty")
        if bridge.ip not in LAB_NET:
            raise ValueError(f"bridge address {bridge.ip} is not in {LAB_NET}")
        taken = {bridge.ip, bridge.network.network_address, bridge.network.broadcast_address}
        for n, a in hosts.items():
            ip = ipaddress.ip_address(a)
            if ip not in LAB_NET or ip not in bridge.network or ip in taken:
                raise ValueError(f"{n}: {a} is not a free host address of {bridge.network} (within {LAB_NET})")
            taken.add(ip)
        self.prefix = name_prefix
        self.hosts = dict(hosts)
        self.bridge_cidr = bridge_cidr
        self.bridge = BRIDGE_PREFIX + name_prefix[:10]
        self.boot_timeout = boot_timeout
        self.lock_timeout = lock_timeout
        self._prefixlen = bridge.network.prefixlen
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pid1: dict[str, int] = {}
        self._lock: _Lock | None = None
        self._work: Path | None = None
        self._inventories = 0
        self._old_handlers: dict[int, Any] = {}

    # -- lifecycle

    def __enter__(self) -> Lab:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        if self._lock is not None:
            raise LabError("the lab is already open")
        _need_root_and("systemd-nspawn", "nsenter", "ip", "mount", "ssh", "ssh-keygen", "tar", "zstd")
        image = ensure_image()
        self._lock = _Lock(LOCK_PATH, timeout=self.lock_timeout, what="another lab")
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():  # SIGTERM/SIGHUP clean up too, via SystemExit
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) == signal.SIG_DFL:
                    self._old_handlers[sig] = signal.signal(sig, _exit_on_signal)
        if stale := sweep():
            log(f"swept leftovers of an earlier run: {', '.join(stale)}")
        t0 = time.monotonic()
        WORK_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._work = work = Path(tempfile.mkdtemp(prefix=f"{self.prefix}.", dir=WORK_ROOT))
        base = work / "base"
        base.mkdir()
        _run(["tar", *_TAR_OPTS, "-I", "zstd", "-C", str(base), "-xf", str(image)], timeout=300, what="extract image")
        _run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"lab-{self.prefix}", "-f", str(work / "id_ed25519")],
            timeout=30,
        )
        # Lab-wide files go into the shared lower layer, before any overlay is mounted over it.
        (base / "root/.ssh/authorized_keys").write_text((work / "id_ed25519.pub").read_text())
        (base / "root/.ssh/authorized_keys").chmod(0o600)
        names = "".join(f"{a} {n}\n" for n, a in self.hosts.items())
        bridge_ip = self.bridge_cidr.split("/")[0]
        loopback = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
        (base / "etc/hosts").write_text(f"{loopback}{bridge_ip} lab-controller\n{names}")
        (work / "ssh_config").write_text("".join(self._ssh_entry(n) for n in self.hosts))
        _run(["ip", "link", "add", self.bridge, "type", "bridge"], timeout=30)
        _run(["ip", "addr", "add", self.bridge_cidr, "dev", self.bridge], timeout=30)
        _run(["ip", "link", "set", self.bridge, "up"], timeout=30)
        for name in self.hosts:
            self._make_root(name)
        for name in self.hosts:  # boot all at once, then wait for each
            self._launch(name)
        for name in self.hosts:
            self._wait_booted(name)
        log(f"{len(self.hosts)} containers up in {time.monotonic() - t0:.1f} s")

    def close(self) -> None:
        """Power everything off and remove it; idempotent, also run at exit."""
        atexit.unregister(self.close)
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
        if self._lock is None:
            return
        try:
            self._stop_all(self._procs)
            self._procs.clear()
            self._pid1.clear()
            sweep()
        finally:
            self._work = None
            self._lock.release()
            self._lock = None

    def stop(self, name: str, timeout: float = 20.0) -> None:
        """Power one container off cleanly (SIGKILL after timeout); its overlay is kept for start()."""
        self._check(name)
        self._pid1.pop(name, None)
        self._stop_all({name: self._procs.pop(name)} if name in self._procs else {}, timeout)
        _kill_cgroups(self._cgroups(name))

    def start(self, name: str) -> None:
        """Boot a stopped container again."""
        self._check(name)
        if name in self._procs:
            raise LabError(f"{name} is running")
        self._launch(name)
        self._wait_booted(name)

    # -- queries and actions

    def address(self, name: str) -> str:
        self._check(name)
        return self.hosts[name]

    def pid1(self, name: str) -> int:
        """The host PID of the container's init (systemd)."""
        self._check(name)
        proc = self._procs.get(name)
        if proc is None or proc.poll() is not None:
            raise LabError(f"{name} is not running")
        if name not in self._pid1 or not _alive(self._pid1[name]):
            pid = _find_pid1(proc.pid)
            if pid is None:
                raise LabError(f"{name} has no init process (yet)")
            self._pid1[name] = pid
        return self._pid1[name]

    def processes(self, name: str) -> list[int]:
        """Host PIDs of every live process in the container's cgroup (empty once it is stopped)."""
        self._check(name)
        return sorted(p for p in _cgroup_pids(self._cgroups(name)) if _alive(p))

    def run(
        self, name: str, cmd: str | list[str], check: bool = True, timeout: float = 120.0, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the container (a string goes to bash -c) with a clean environment."""
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else cmd
        return _run(
            _nsenter(self.pid1(name), argv),
            timeout=timeout,
            check=check,
            input=input,
            what=f"{name}: {cmd}",
        )

    def copy_in(self, name: str, src: Path, dest: str) -> None:
        """Copy a file or directory tree to the absolute path dest in the running container, owned by root."""
        target = PurePosixPath(dest)
        if not target.is_absolute() or target.name in ("", ".", ".."):
            raise ValueError(f"dest must be an absolute path to a file or directory: {dest!r}")

        def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(src, arcname=target.name, filter=as_root)
        # Unpacked inside the container, so symlinks on the way resolve there, never on the host.
        self.run(name, ["sh", "-c", 'mkdir -p "$1" && tar -x -C "$1"', "sh", str(target.parent)], input=buf.getvalue())

    def ssh_config(self) -> Path:
        """An ssh_config with a Host entry per container (matching its name and its address)."""
        return self._path("ssh_config")

    def inventory(self, groups: dict[str, list[str]], vars: dict[str, Any] | None = None) -> Path:
        """An Ansible inventory (YAML; written as JSON, a subset) of all containers, with these groups and vars."""
        for group, members in groups.items():
            for m in members:
                self._check(m, f"group {group}")
        ssh_args = f"-F {self.ssh_config()}"
        hostvars = {
            n: {
                "ansible_host": a,
                "ansible_user": "root",
                "ansible_ssh_common_args": ssh_args,
                "ansible_python_interpreter": "/usr/bin/python3",
            }
            for n, a in self.hosts.items()
        }
        children = {g: {"hosts": dict.fromkeys(members)} for g, members in groups.items()}
        doc = {"all": {"hosts": hostvars, "vars": vars or {}, "children": children}}
        self._inventories += 1
        path = self._path(f"inventory-{self._inventories}.yml")
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    # -- internals

    def _check(self, name: str, where: str = "") -> None:
        if name not in self.hosts:
            raise KeyError(f"{where + ': ' if where else ''}no container {name!r} in this lab")

    def _path(self, name: str) -> Path:
        if self._work is None:
            raise LabError("the lab is not open")
        return self._work / name

    def _ssh_entry(self, name: str) -> str:
        options = {
            "HostName": self.hosts[name],
            "User": "root",
            "IdentityFile": self._path("id_ed25519"),
            "IdentitiesOnly": "yes",
            "StrictHostKeyChecking": "no",
            "UserKnownHostsFile": "/dev/null",
            "LogLevel": "ERROR",
            "BatchMode": "yes",
            "ConnectTimeout": "10",
        }
        return f"Host {name} {self.hosts[name]}\n" + "".join(f"    {k} {v}\n" for k, v in options.items())

    def _cgroups(self, name: str) -> list[Path]:
        return [root / f"{CGROUP_PREFIX}{self.prefix}" / name for root in _cgroup_roots()]

    def _make_root(self, name: str) -> None:
        d = self._path(name)
        for sub in ("upper", "work", "root"):
            (d / sub).mkdir(parents=True)
        opts = f"lowerdir={self._path('base')},upperdir={d / 'upper'},workdir={d / 'work'}"
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(d / "root")], timeout=30)
        root = d / "root"
        (root / "etc/hostname").write_text(f"{name}\n")
        (root / "etc/machine-id").write_text(f"{uuid.uuid4().hex}\n")
        # Static address, no gateway: the container reaches the lab network only. Sorts before nspawn's DHCP default.
        (root / "etc/systemd/network/10-lab-host0.network").write_text(
            f"[Match]\nName=host0\n\n[Network]\nAddress={self.hosts[name]}/{self._prefixlen}\n"
            "LinkLocalAddressing=no\nIPv6AcceptRA=no\n"
        )
        for cg in self._cgroups(name):
            cg.mkdir(parents=True, exist_ok=True)

    def _launch(self, name: str) -> None:
        cgroup_procs = [str(cg / "cgroup.procs") for cg in self._cgroups(name)]

        def preexec() -> None:
            # Its own cgroup per container, or systemd in one container kills units of another. PDEATHSIG: if this
            # process dies without cleaning up, nspawn still powers its container off (it is forked by this thread).
            for f in cgroup_procs:
                with open(f, "w") as fh:
                    fh.write(str(os.getpid()))
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

        root = self._path(name) / "root"
        argv = [
            "systemd-nspawn",
            "-b",
            "-D",
            str(root),
            "-M",
            name,
            "--register=no",
            "--keep-unit",
            f"--network-bridge={self.bridge}",
            "--console=read-only",  # passive would drop the boot log that errors quote
            "--resolv-conf=off",
            "--link-journal=no",
        ]
        with open(self._path(name) / "console.log", "ab") as console:
            self._procs[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec,
                start_new_session=True,  # Ctrl-C reaches only this process, which then cleans up in order
            )

    def _console(self, name: str) -> str:
        with contextlib.suppress(OSError):
            text = re.sub(r"\x1b\[[0-9;]*m|\r", "", (self._path(name) / "console.log").read_text(errors="replace"))
            return _tail("\n".join(line for line in text.splitlines() if line.strip()))
        return ""

    def _wait_booted(self, name: str) -> None:
        proc = self._procs[name]
        state = "no init process yet"
        for left in _ticks(self.boot_timeout, 0.2):
            if proc.poll() is not None:
                del self._procs[name]
                raise LabError(f"{name}: systemd-nspawn exited with {proc.returncode}; console:\n{self._console(name)}")
            pid = _find_pid1(proc.pid)
            if pid is None:
                continue
            try:  # --wait blocks until boot is done; before systemd's bus is up it fails at once
                res = _run(_nsenter(pid, ["systemctl", "is-system-running", "--wait"]), timeout=left, check=False)
                state = (res.stdout.strip() or res.stderr.strip())[-200:]
            except LabError:
                state = "no answer from systemctl is-system-running"
            if state in ("running", "degraded"):
                break
        else:
            raise LabError(
                f"{name}: not booted after {self.boot_timeout:.0f} s (state: {state}); "
                f"{self._diagnose(name)}console:\n{self._console(name)}"
            )
        ssh = ["ssh", "-F", str(self.ssh_config()), "-o", "ConnectTimeout=2", name, "true"]
        detail = ""
        for _ in _ticks(30, 0.2):
            out = _run(ssh, timeout=10, check=False, what=f"ssh {name}")
            if out.returncode == 0:
                return
            detail = _tail(out.stdout + out.stderr)
        raise LabError(f"{name}: sshd does not answer at {self.hosts[name]}: {detail}\n{self._diagnose(name)}")

    def _diagnose(self, name: str) -> str:
        with contextlib.suppress(LabError):
            cmd = "systemctl --failed --no-pager; systemctl list-jobs --no-pager; journalctl -b -n 30 --no-pager"
            return f"inside:\n{self.run(name, cmd, check=False, timeout=15).stdout[-4000:]}\n"
        return ""

    @staticmethod
    def _stop_all(procs: dict[str, subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
        for p in procs.values():  # all at once: a clean poweroff takes ~2 s each
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def _nsenter(pid: int, argv: Sequence[str]) -> list[str]:
    """argv run in every namespace of pid (the container's init) with a clean environment."""
    return ["nsenter", "-t", str(pid), "-a", "env", "-i", CONTAINER_PATH, "HOME=/root", "LANG=C.UTF-8", *argv]


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
