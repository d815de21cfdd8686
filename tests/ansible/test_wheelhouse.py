"""The wheelhouse the role builds on the controller: a source that would build an appliance wheel without its compiled
module fails the build, before any host is touched, and leaves no wheelhouse behind to be reused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.ansible.test_tls_templates import ANSIBLE, REPO, ROLES


def test_a_source_without_setup_py_fails_the_build_naming_the_missing_module(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(REPO / "appliance", src / "appliance",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    for name in ("pyproject.toml", "README.md", "VERSION"):
        shutil.copy(REPO / name, src / name)
    # No dependency to fetch: the appliance wheel alone is what is checked.
    (src / "requirements.lock").write_text("")
    built = tmp_path / "wheelhouse"
    play = [{"name": "wheelhouse", "hosts": "localhost", "gather_facts": False,
             "tasks": [{"ansible.builtin.import_tasks": str(ROLES / "appliance" / "tasks" / "wheelhouse.yml")}]}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    extra = {"appliance_wheelhouse": "", "appliance_source_dir": str(src), "__appliance_wheelhouse_built": str(built),
             "__appliance_package_version": "0.0.0+test"}
    r = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", "-c", "local",
                        "-e", json.dumps(extra), str(tmp_path / "play.yml")],
                       capture_output=True, text=True, cwd=ANSIBLE, timeout=600,
                       env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_PYTHON_INTERPRETER": sys.executable})
    assert r.returncode != 0, r.stdout
    assert "the appliance wheel has no compiled appliance/policy/_requestpath: its source needs setup.py" in r.stdout, (
        r.stdout)
    assert not built.exists()  # the next run builds anew
