"""The scale benchmark's zygote: import the agent once, then fork one agent per request.

    python -m bench._zygote        (bench/scale.py starts it, from the repo top)

Prints "ready" once the agent's modules are imported; then, for every "CONFIG LOG" line on
stdin, forks a real agent (`callerid.agent.daemon.run(CONFIG)`, its output appended to LOG)
and prints the child's pid. The children share the interpreter's and the modules' pages, as
a pre-forking server's do; the kernel reaps them (SIGCHLD ignored).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import callerid.agent.backends.cgroup  # noqa: F401  (imported once, before the forks)
from callerid.agent import daemon


def agent(cfg: str, out: str) -> NoReturn:
    """In the forked child: a session of its own, output to ``out``, run the agent."""
    rc = 1
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        logging.basicConfig(
            level="INFO", stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )
        rc = daemon.run(Path(cfg))
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(rc)


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children
    gc.freeze()
    print("ready", flush=True)
    for line in sys.stdin:
        cfg, out = line.split()
        pid = os.fork()
        if pid == 0:
            agent(cfg, out)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
