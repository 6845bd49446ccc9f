"""Run mypy --strict on callerid.agent and callerid.bus.

The source tree maps `agent/` -> callerid.agent and `bus/` -> callerid.bus (setuptools
package-dir), which mypy cannot follow through an editable install; a tiny tree of symlinks
gives it the real package layout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

top = Path(__file__).resolve().parent.parent
root = top / "typecheck-root" / "callerid"
root.mkdir(parents=True, exist_ok=True)
for name in ("agent", "bus"):
    link = root / name
    if not link.is_symlink():
        link.symlink_to(top / name)
env = dict(os.environ, MYPYPATH=str(root.parent))
cmd = [
    sys.executable,
    "-m",
    "mypy",
    "--config-file",
    str(top / "pyproject.toml"),
    "-p",
    "callerid.agent",
    "-p",
    "callerid.bus",
]
sys.exit(subprocess.call(cmd, env=env, cwd=top))
