"""Hostile clients of the agent's PAM socket, for tests/integration/test_attacks.py.

Each attack is bounded in count and in time and returns what it saw (a `Counter` of
outcomes, close times), never asserting: the test decides what must hold. An outcome is the
reply's ``verdict=... reason=...``, or ``eof`` (closed without an answer), ``reset``
(ECONNRESET), ``epipe`` (the agent closed before we finished sending) or ``timeout``.

Mesh attackers (zmq and raw TCP) are in `tests.support.mesh_attackers`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import select
import selectors
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.agents import USER_PYTHON
from tests.support.users import ThrowawayUser

__all__ = [
    "CRAFTED_LINES",
    "BacklogFlood",
    "IdleFlood",
    "as_user",
    "exchange",
    "garbage",
    "huge_lines",
    "opened_to_everyone",
    "trickle",
]

ROOT_LINE = b"CALLERID/1 op=account user=root service=sshd\n"

# well-formed enough to reach the parser, each wrong in its own way: every one must be answered
# bad_request (or, for a name that is only impossible on this host, deny unknown_user)
CRAFTED_LINES: tuple[bytes, ...] = (
    b"\n",
    b"\r\n",
    b"\x00\n",
    b"CALLERID/1\n",
    b"CALLERID/2 op=account user=root\n",
    b"CALLERID/1 op=account user=%00 service=sshd\n",
    b"CALLERID/1 op=account user=root%00 service=sshd\n",
    b"CALLERID/1 op=account user=%0a service=sshd\n",
    b"CALLERID/1 op=account user=%zz\n",
    b"CALLERID/1 op=account user=%\n",
    b"CALLERID/1 op=account user=root user=root\n",
    b"CALLERID/1 op=account user=\n",
    b"CALLERID/1 op=account\n",
    b"CALLERID/1 op=nope user=root\n",
    b"CALLERID/1  op=account user=root\n",
    b"CALLERID/1 op=account user=r\xc3\xa9\n",
    b"CALLERID/1 op=account user=%E2%80%AEroot\n",
    b"CALLERID/1 op=account user=%ff%fe\n",
    b"CALLERID/1 op=account user=../../etc/passwd\n",
    b"CALLERID/1 op=account user=" + b"%41" * 1100 + b"\n",
    b"CALLERID/1 op=account user=root service=%07%1b[2J rhost=x tty=y\n",
    b"CALLERID/1 op=account user=root x" + b"y" * 40 + b"=1\n",
    b"CALLERID/1 op=account user=root\x00 service=sshd\n",
    b"CALLERID/1 op=account user=root\rservice=sshd\n",
)


def _connect_as_the_module(s: socket.socket, path: Path, deadline: float) -> None:
    """connect(), retried every 10 ms while the listen backlog is full (EAGAIN), up to the
    deadline: what pam/client.c does (CONNECT_RETRY_MS)."""
    while True:
        try:
            s.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError from None
            time.sleep(0.01)  # the module's pause between tries, not a synchronisation


def exchange(
    path: Path, payload: bytes, timeout: float, *, shut_wr: bool = True
) -> tuple[str, bytes]:
    """Connect, send ``payload`` (then EOF), read one line: (outcome, reply line)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        try:
            _connect_as_the_module(s, path, time.monotonic() + timeout)
            try:
                s.sendall(payload)
                if shut_wr:
                    s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError) as exc:
                # the agent stopped reading and closed: its answer may still be queued for us
                line = _queued_line(s)
                return (_outcome(line), line) if line else (_errname(exc), b"")
            with s.makefile("rb") as f:
                line = f.readline()
        except ConnectionResetError:
            return "reset", b""
        except TimeoutError:
            return "timeout", b""
    return _outcome(line), line


def _queued_line(s: socket.socket) -> bytes:
    try:
        return s.recv(4096, socket.MSG_DONTWAIT).split(b"\n")[0]
    except OSError:
        return b""


def _outcome(line: bytes) -> str:
    if not line:
        return "eof"
    words = line.decode(errors="replace").split(" ")
    return " ".join(w for w in words[1:] if w.startswith(("verdict=", "reason="))).strip()


def garbage(
    path: Path, *, count: int, max_len: int, seconds: float, seed: int
) -> tuple[Counter[str], dict[bytes, str]]:
    """The crafted lines once each, then random bytes (1..max_len, newline or not).

    Returns the outcomes of the random ones and each crafted line's reply.
    """
    crafted = {line: exchange(path, line, 5.0)[0] for line in CRAFTED_LINES}
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    for _ in range(count):
        if time.monotonic() >= deadline:
            break
        data = rng.randbytes(rng.randint(1, max_len))
        outcomes[exchange(path, data, 5.0)[0]] += 1
    return outcomes, crafted


def huge_lines(path: Path, *, parallel: int, total: int, size: int, seconds: float) -> Counter[str]:
    """``total`` requests of one ``size``-byte line each (then EOF), ``parallel`` at a time."""
    body = b"CALLERID/1 op=account user=" + b"x" * size + b"\n"
    deadline = time.monotonic() + seconds
    outcomes: Counter[str] = Counter()

    def one(_: int) -> str:
        if time.monotonic() >= deadline:
            return "not sent (time)"
        return exchange(path, body, 5.0)[0]

    with ThreadPoolExecutor(parallel) as pool:
        for outcome in pool.map(one, range(total)):
            outcomes[outcome] += 1
    return outcomes


class IdleFlood:
    """``count`` connections opened and left silent (or holding a partial line)."""

    def __init__(self, path: Path, count: int, *, partial: bytes = b"") -> None:
        self.socks: list[socket.socket] = []
        self.opened: list[float] = []
        self.closed_at: dict[int, float] = {}
        self.answered = 0  # a silent or unfinished client must never get an answer
        try:
            for _ in range(count):
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(path))
                if partial:
                    s.sendall(partial)
                s.setblocking(False)
                self.socks.append(s)
                self.opened.append(time.monotonic())
        except BaseException:
            self.close()
            raise

    def poll_closed(self) -> int:
        """Note which connections the agent has closed (EOF or reset); how many so far."""
        now = time.monotonic()
        for i, s in enumerate(self.socks):
            if i in self.closed_at:
                continue
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if data:
                self.answered += 1
            else:
                self.closed_at[i] = now
        return len(self.closed_at)

    def close_latencies_ms(self) -> list[float]:
        return [(t - self.opened[i]) * 1000 for i, t in self.closed_at.items()]

    def close(self) -> None:
        for s in self.socks:
            s.close()


def trickle(
    path: Path, *, clients: int, line: bytes, interval: float, seconds: float
) -> dict[str, Any]:
    """``clients`` connections each sending ``line`` one byte every ``interval`` s.

    Runs until every connection is closed by the agent or ``seconds`` pass. Returns the
    outcomes (``eof``, ``reset``, ``epipe`` or a reply), bytes sent before the end, and when
    (ms after connecting) each connection ended.
    """
    socks = []
    for _ in range(clients):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.setblocking(False)
        socks.append(s)
    start = time.monotonic()
    sent = [0] * clients
    ended: dict[int, tuple[str, float]] = {}
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        sel.register(s, selectors.EVENT_READ, i)
    next_tick = start
    try:
        while len(ended) < clients and time.monotonic() - start < seconds:
            for key, _ in sel.select(timeout=max(0.0, next_tick - time.monotonic())):
                i = key.data
                outcome = _recv_outcome(socks[i])
                if outcome is not None:
                    ended[i] = (outcome, (time.monotonic() - start) * 1000)
                    sel.unregister(socks[i])
            if time.monotonic() < next_tick:
                continue
            next_tick += interval
            for i, s in enumerate(socks):
                if i in ended or sent[i] >= len(line):
                    continue
                try:
                    s.send(line[sent[i] : sent[i] + 1])
                    sent[i] += 1
                except (BrokenPipeError, ConnectionResetError) as exc:
                    ended[i] = (_errname(exc), (time.monotonic() - start) * 1000)
                    sel.unregister(s)
    finally:
        sel.close()
        for s in socks:
            s.close()
    outcomes = Counter(o for o, _ in ended.values())
    outcomes["still open"] = clients - len(ended)
    return {
        "outcomes": dict(outcomes),
        "bytes_sent_max": max(sent),
        "ended_ms": sorted(t for _, t in ended.values()),
    }


def _recv_outcome(s: socket.socket) -> str | None:
    try:
        data = s.recv(4096)
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return "reset"
    return _outcome(data)


def _errname(exc: OSError) -> str:
    return "epipe" if isinstance(exc, BrokenPipeError) else "reset"


class BacklogFlood:
    """Silent connections made as fast as possible until connect would block (EAGAIN: the
    listen backlog is full) or fails; `fill()` again first drops the connections the agent
    has closed, then tops the backlog up. At most ``cap`` connections are held; `close()`
    releases them all."""

    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.cap = cap
        self.socks: dict[int, socket.socket] = {}
        self.made = 0
        self.closed_by_agent = 0
        self.stops: Counter[str] = Counter()  # why each fill() stopped: eagain, cap, ...
        self._poll = select.poll()

    def fill(self) -> None:
        for fd, _ in self._poll.poll(0):  # EOF or hang-up: the agent closed it
            self._poll.unregister(fd)
            self.socks.pop(fd).close()
            self.closed_by_agent += 1
        while len(self.socks) < self.cap:
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(str(self.path))
            except OSError as exc:
                s.close()
                self.stops[errno.errorcode.get(exc.errno or 0, str(exc)).lower()] += 1
                return
            self.socks[s.fileno()] = s
            self._poll.register(s, select.POLLIN)
            self.made += 1
        self.stops["cap"] += 1

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks.clear()


@contextmanager
def opened_to_everyone(path: Path) -> Iterator[None]:
    """Loosen the socket to 0666 and its directory to 0711 (what a careless admin might do):
    then only SO_PEERCRED stands between other users and the agent."""
    old_sock = path.stat().st_mode & 0o7777
    old_dir = path.parent.stat().st_mode & 0o7777
    os.chmod(path, 0o666)
    os.chmod(path.parent, 0o711)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, old_sock)
        os.chmod(path.parent, old_dir)


# Runs as the throwaway user (maybe as "root" of its own user namespace): ``count`` requests,
# each claiming to be root's login; prints {"uid": <uid in its namespace>, "outcomes": {...}}.
_AS_USER = r"""
import json, os, socket, sys
from collections import Counter
path, count = sys.argv[1], int(sys.argv[2])
out = Counter()
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(path)
        s.sendall(b"CALLERID/1 op=account user=root service=sshd\n")
        line = s.makefile("rb").readline().decode()
        words = line.split(" ")[1:3]
        out[" ".join(words).strip() or "eof"] += 1
    except OSError as exc:
        out[type(exc).__name__] += 1
    finally:
        s.close()
print(json.dumps({"uid": os.getuid(), "outcomes": out}))
"""


def as_user(
    user: ThrowawayUser, path: Path, count: int, *, wrapper: Sequence[str] = ()
) -> dict[str, Any]:
    """Run ``count`` root-login requests to ``path`` as ``user`` (through ``wrapper``, e.g.
    ``unshare -Ur``, a user namespace where the user is uid 0); returns the script's report."""
    proc = subprocess.run(
        [*wrapper, USER_PYTHON, "-c", _AS_USER, str(path), str(count)],
        capture_output=True,
        text=True,
        timeout=60,
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "HOME": "/", "LC_ALL": "C.UTF-8"},
        cwd="/",
        check=False,
    )
    if proc.returncode:
        msg = f"{[*wrapper, 'python']} as {user.name} exited {proc.returncode}: {proc.stderr}"
        raise RuntimeError(msg)
    report: dict[str, Any] = json.loads(proc.stdout)
    return report
