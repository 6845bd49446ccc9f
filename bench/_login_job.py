"""The login benchmark's timing loop, run inside the Slurm batch job as the user.

    python3 -m bench._login_job SPEC_JSON     (bench/login.py submits it, from the repo top)

Standard library only: it runs with the system python3, as the throwaway user. Phase 1:
warm-up and interleaved rounds of `ssh -p PORT HOST true` to every target (order reversed
every other round), written to spec["out"]. Phase 2 (spec["stalled"] > 0): it asks to be
stalled (creates spec["ready"]), waits for spec["go"], times the stalled-source logins and
writes everything to spec["stalled_out"].
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GO_TIMEOUT_S = 120


def one(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """One timed ssh login to target ``name``."""
    argv = ["ssh", *spec["ssh_opts"], "-p", str(spec["ports"][name]), spec["host"], "true"]
    t0, w0 = time.perf_counter(), time.time()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    took = (time.perf_counter() - t0) * 1000
    if r.returncode != 0:
        raise SystemExit(f"ssh to {name} failed ({r.returncode}): {r.stderr.decode()}")
    return {"target": name, "ms": took, "start": w0, "end": time.time()}


def dump(out: dict[str, list[dict[str, Any]]], path: str) -> None:
    """Write ``out`` to ``path`` at once (the benchmark polls for the file)."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(out))
    tmp.rename(path)


def main(spec: dict[str, Any]) -> None:
    names = spec["order"]
    out: dict[str, list[dict[str, Any]]] = {"warmup": [], "rounds": [], "stalled": []}
    for _ in range(spec["warmup"]):
        out["warmup"] += [one(spec, n) for n in names]
    for i in range(spec["rounds"]):
        out["rounds"] += [one(spec, n) for n in (names if i % 2 == 0 else names[::-1])]
    dump(out, spec["out"])
    if not spec["stalled"]:
        return
    Path(spec["ready"]).touch()
    deadline = time.monotonic() + GO_TIMEOUT_S
    while not os.path.exists(spec["go"]):
        if time.monotonic() > deadline:
            raise SystemExit("no go for the stalled phase")
        time.sleep(0.05)
    for _ in range(spec["stalled"]):
        out["stalled"] += [one(spec, n) for n in spec["stalled_targets"]]
    dump(out, spec["stalled_out"])


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
