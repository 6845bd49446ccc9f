"""`daemon.settle_gc`: what the agent built is frozen, and what comes after is still collected.

Run in a child interpreter: freezing would otherwise change the collector of the test run.
"""

from __future__ import annotations

import subprocess
import sys

_CHILD = r"""
import gc, weakref
from callerid.agent.daemon import GC_THRESHOLD, settle_gc

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

before = cycle()  # garbage made before: collected by settle_gc's last collection, not frozen
kept = Node()  # live when frozen: kept (and now out of the collector's way)
settle_gc()
assert before() is None, "garbage made before the freeze was frozen"
assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
assert gc.get_threshold() == GC_THRESHOLD, gc.get_threshold()
frozen = gc.get_freeze_count()
after = cycle()
assert after() is not None
gc.collect()
assert after() is None, "a cycle made after the freeze was not collected"
assert gc.get_freeze_count() == frozen
print("ok")
"""


def test_settle_gc_freezes_what_is_live_and_collects_what_comes_after() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
