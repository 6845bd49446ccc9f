"""Watching a live agent while it is attacked: probe logins, and its RSS and fd count.

    login = CrossLogin(agents, trees["a"], user, job="42")  # a real login b <- a, as FakeSshd
    with Prober(agents.socket("b"), pid=agents.procs["b"].pid, login=login.run) as probe:
        ...attack...
    summary = probe.summary()      # latencies (worst, median), replies, failures, peak vitals

The prober is a thread of the test process: it makes one root login on the PAM socket
(`CALLERID/1 op=account user=root service=sshd` -> `verdict=allow reason=root`) after another,
and every ``login_every_s`` one real cross-node login (a client process inside a job on node
"a" connects to a stand-in sshd on node "b", whose monitor asks b's agent, which asks a's over
the mesh). Each probe's latency is measured from connect to reply; a probe that gets no answer
(timeout, reset, refused) is recorded as a failure with its error. The thread also samples the
attacked agent's vitals (`/proc/<pid>/status` VmRSS, `/proc/<pid>/fd`) for their peak.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.agents import ADDRESSES, USER_PYTHON, FakeSshd, LoopbackAgents
from tests.support.cgroups import JobTree
from tests.support.users import ThrowawayUser

__all__ = [
    "ROOT_PROBE",
    "CrossLogin",
    "Prober",
    "Vitals",
    "pam_exchange",
    "vitals",
]

ROOT_PROBE = b"CALLERID/1 op=account user=root service=sshd\n"
ROOT_ANSWER = b"CALLERID/1 verdict=allow reason=root"
CONNECT_RETRY_S = 0.01  # pam/client.c CONNECT_RETRY_MS


@dataclass(frozen=True)
class Vitals:
    rss_kb: int
    fds: int

    def as_dict(self) -> dict[str, int]:
        return {"rss_kb": self.rss_kb, "fds": self.fds}


def vitals(pid: int) -> Vitals:
    """The process's resident memory (VmRSS, KiB) and number of open fds."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Vitals(rss, len(os.listdir(f"/proc/{pid}/fd")))


def pam_exchange(path: Path, payload: bytes, timeout: float) -> bytes:
    """One PAM socket request as pam_callerid.so makes it: the reply line (b"" on EOF).

    Like pam/client.c, one deadline covers it all, and a connect that finds the listen
    backlog full (EAGAIN: AF_UNIX has no EINPROGRESS) is retried every 10 ms until then.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX) as s:
        s.setblocking(False)
        while True:
            try:
                s.connect(str(path))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    msg = "connect: the backlog stayed full"
                    raise TimeoutError(errno.ETIMEDOUT, msg) from None
                time.sleep(CONNECT_RETRY_S)  # the module's own pacing, not a synchronisation
        s.settimeout(max(0.001, deadline - time.monotonic()))
        s.sendall(payload)
        with s.makefile("rb") as f:
            return f.readline()


_MULTI_CLIENT = r"""
import socket, sys
src, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = None
for _ in sys.stdin:
    if s is not None:
        s.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((src, 0))
    s.connect((host, port))
    print(s.getsockname()[1], flush=True)
"""


class CrossLogin:
    """Real cross-node logins, one per `run()`: a client in a job on "a" -> sshd on "b".

    One client process (as ``user``, inside ``job``'s batch step on node "a") opens a new TCP
    connection to the stand-in sshd for each login (closing the previous one); the sshd's
    monitor for that connection asks b's agent, which asks a's agent over the mesh.
    """

    def __init__(
        self, agents: LoopbackAgents, tree_a: JobTree, user: ThrowawayUser, job: str
    ) -> None:
        self.user = user
        self.sshd: FakeSshd = agents.sshd("b")
        argv = [USER_PYTHON, "-c", _MULTI_CLIENT, ADDRESSES["a"], ADDRESSES["b"]]
        self.client = tree_a.spawn_in(
            job,
            "step_batch",
            [*argv, str(self.sshd.port)],
            user=user,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._lock = threading.Lock()

    def run(self) -> dict[str, str]:
        """One login; returns the reply's fields (verdict, reason, job, ...)."""
        assert self.client.stdin is not None and self.client.stdout is not None
        with self._lock:
            self.client.stdin.write(b"connect\n")
            self.client.stdin.flush()
            assert self.client.stdout.readline(), "the login client died"
            fields: dict[str, str] = self.sshd.login(self.user.name)["fields"]
            return fields

    def close(self) -> None:
        for pipe in (self.client.stdin, self.client.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        with contextlib.suppress(ProcessLookupError):
            self.client.kill()
        self.client.wait(timeout=10)
        self.sshd.close()


@dataclass
class _Series:
    latencies_ms: list[float] = field(default_factory=list)
    replies: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "count": len(lat),
            "max_ms": round(max(lat), 1) if lat else None,
            "median_ms": round(statistics.median(lat), 1) if lat else None,
            "replies": dict(self.replies),
            "failures": self.failures[:10],
            "failure_count": len(self.failures),
        }


class Prober:
    """Probe logins from a thread while an attack runs; see the module docstring."""

    def __init__(
        self,
        pam_socket: Path,
        *,
        pid: int,
        timeout_s: float,
        login: Callable[[], dict[str, str]] | None = None,
        login_every_s: float = 0.1,
        pause_s: float = 0.01,
    ) -> None:
        self.pam_socket = pam_socket
        self.pid = pid
        self.timeout_s = timeout_s
        self.login = login
        self.login_every_s = login_every_s
        self.pause_s = pause_s
        self.root = _Series()
        self.logins = _Series()
        self.peak = vitals(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        next_login = time.monotonic()
        while not self._stop.is_set():
            self._probe_root()
            if self.login is not None and time.monotonic() >= next_login:
                self._probe_login()
                next_login = time.monotonic() + self.login_every_s
            self._sample()
            self._stop.wait(self.pause_s)

    def _probe_root(self) -> None:
        t0 = time.monotonic()
        try:
            reply = pam_exchange(self.pam_socket, ROOT_PROBE, self.timeout_s + 1.0)
        except OSError as exc:
            self.root.failures.append(f"{type(exc).__name__}: {exc}")
            return
        self.root.latencies_ms.append((time.monotonic() - t0) * 1000)
        text = reply.decode(errors="replace").strip()
        self.root.replies[" ".join(text.split(" ")[1:3]) or "<no answer>"] += 1
        if not reply.startswith(ROOT_ANSWER):
            self.root.failures.append(f"reply {text!r}")

    def _probe_login(self) -> None:
        assert self.login is not None
        t0 = time.monotonic()
        try:
            fields = self.login()
        except Exception as exc:  # recorded, and asserted on by the test
            self.logins.failures.append(f"{type(exc).__name__}: {exc}")
            return
        self.logins.latencies_ms.append((time.monotonic() - t0) * 1000)
        verdict = f"{fields.get('verdict')}/{fields.get('reason')}"
        self.logins.replies[verdict] += 1
        if fields.get("verdict") != "adopt":
            self.logins.failures.append(f"reply {fields}")

    def _sample(self) -> None:
        with contextlib.suppress(OSError):  # the agent died: the test notices it
            now = vitals(self.pid)
            self.peak = Vitals(max(self.peak.rss_kb, now.rss_kb), max(self.peak.fds, now.fds))

    def summary(self) -> dict[str, Any]:
        return {
            "root": self.root.summary(),
            "login": self.logins.summary(),
            "peak": self.peak.as_dict(),
        }
