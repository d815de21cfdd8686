"""A config's files as validation wants them: the binary (executable) and a model file (which it does not parse)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    (tmp_path / "bin").mkdir()
    (tmp_path / "models").mkdir()
    binary = tmp_path / "bin" / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (tmp_path / "models" / "m.gguf").write_bytes(b"not a gguf")
    return tmp_path
