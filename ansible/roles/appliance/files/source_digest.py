"""Print a short digest of the appliance package's source in the checkout given as the first argument.

The wheel built on the controller carries it as a local version (``0.1.0+src.<digest>``), so every change of the
source reaches the hosts (and a rerun without a change installs nothing), also when VERSION was not bumped. The runtime
lock (requirements.lock) counts as source: the wheelhouse is built from it, so a new lock is a new wheelhouse. The
compiled part's build outputs in a checkout (Cython's .c, the .so) do not: the wheel builds its own.
"""

import hashlib
import sys
from pathlib import Path

root = Path(sys.argv[1])
files = sorted(p for p in (root / "appliance").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".c", ".so"))
digest = hashlib.sha256()
# Absent from older sources: the lock, and setup.py (which declares the compiled part).
optional = [p for p in (root / "requirements.lock", root / "setup.py") if p.exists()]
for path in [*files, root / "pyproject.toml", *optional, root / "VERSION", root / "README.md"]:
    digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
print(digest.hexdigest()[:12])
