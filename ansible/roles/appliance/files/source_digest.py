"""Print a short digest of the appliance package's source in the checkout given as the first argument.

The wheel built on the controller carries it as a local version (``0.1.0+src.<digest>``), so every change of the
source reaches the hosts (and a rerun without a change installs nothing), also when VERSION was not bumped.
"""

import hashlib
import sys
from pathlib import Path

root = Path(sys.argv[1])
files = sorted(p for p in (root / "appliance").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
digest = hashlib.sha256()
for path in [*files, root / "pyproject.toml", root / "VERSION", root / "README.md"]:
    digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
print(digest.hexdigest()[:12])
