"""The package-dir mapping: a built wheel holds callerid.agent and callerid.bus, never bare
`agent`/`bus` packages, and installs and imports in a fresh virtual environment."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]


def test_wheel_layout_and_import(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(TOP)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = out.glob("callerid-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "callerid/agent/__init__.py" in names
    assert "callerid/bus/protocol.py" in names
    assert "callerid/agent/backends/cgroup.py" in names
    assert not [n for n in names if n.startswith(("agent/", "bus/", "tests/"))]
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    subprocess.run(  # only what the two imported modules need
        [str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel), "msgpack", "pyyaml"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    code = "import callerid.bus.protocol as p, callerid.agent.policy; print(p.PROTOCOL_VERSION)"
    r = subprocess.run(
        [str(py), "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
