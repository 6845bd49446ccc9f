"""The `slurm` backend: jobs and adoption through each job's slurmstepd unix socket.

What pam_slurm_adopt does, with our own bounds and checks (reference/slurm.md sections 4, 5):

- Jobs of a uid: the extern-step sockets ``<SlurmdSpoolDir>/<NodeName>_<jobid>.4294967292``
  (they exist with ``PrologFlags=contain``); the owner of each is asked with STEP_UID (one
  connection per extern step, all at once), the start time is the socket's ctime (as 26.05
  does; ties go to the higher job id, `Job.sort_key`). A stale socket (no listener, or gone) is
  skipped; so is a stepd that does not answer in time (logged: it could not adopt anyway).
  A step's owner never changes, so an answer is remembered for OWNER_TTL_S by the socket
  file's identity (path, inode, ctime: a requeued job's new stepd makes a new file); the
  listing itself is read at every call, so an ended step drops out at once. (A stepd that
  died without removing its socket is still listed until the memory expires; adopting into
  it fails, as it would have.)
- The job of a pid: ``/proc/<pid>/cgroup`` when it shows ``.../job_<J>/step_...`` (Slurm's
  cgroup layouts, v1 and v2), confirmed and described by job J's stepd; otherwise every stepd
  of the node is asked PID_IN_CONTAINER and DAEMON_PID (as slurmd's own pid-to-job lookup does).
- Adoption, on one connection: STEP_UID must equal the job's uid (defence in depth:
  pam_slurm_adopt does not check) and STATE must not be ending; then ADD_EXTERN_PID and
  PID_IN_CONTAINER (to confirm) pipelined.
  A 22.05 stepd refuses with rc -1, a 26.05 one closes the connection: both are BackendError;
  a job whose socket is gone raises JobVanished.

NodeName: ``backend.slurm.node_name`` when set; otherwise the short hostname, except when the
spool dir holds sockets of exactly one other node name and none of the hostname's (NodeName
differs from the hostname): then that name. ``%n`` and ``%h`` in ``spool_dir`` are replaced
by the node name (configured, else the short hostname) and the short hostname, as slurmd does.

Every public call is bounded by ``timeout_ms`` in total (connect, send and every reply; Slurm
sets no timeout on these sockets), however many stepds it talks to: connections are
non-blocking and driven together by one selector with one deadline (`drive`). The backend
keeps no connection between calls and may be called from several threads at once.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import selectors
import socket
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from callerid.agent._procfs import read_proc
from callerid.agent.backends import stepd
from callerid.agent.backends.base import BackendError, Job, JobVanished
from callerid.agent.config import SlurmBackendConfig

__all__ = [
    "SlurmBackend",
    "StaleSocket",
    "StepSocket",
    "StepdClosed",
    "StepdConnection",
    "StepdTimeout",
    "drive",
    "guess_node_name",
    "job_from_cgroup",
    "list_step_sockets",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_SOCKET_NAME = re.compile(r"(?P<node>.+)_(?P<job>\d+)\.(?P<step>\d+)(?:\.(?P<het>\d+))?")
_STALE_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR})
_CLOSED_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET})
_RECV_SIZE = 65536


OWNER_TTL_S = 10.0  # how long a step's owner (STEP_UID) is remembered
_MAX_OWNERS = 65536


def _identity(sock: StepSocket) -> tuple[str, int, float]:
    return (str(sock.path), sock.inode, sock.ctime)


class StaleSocket(JobVanished):
    """The stepd socket file is gone, or nothing listens on it any more (the step ended)."""


class StepdClosed(BackendError):
    """The stepd closed the connection before answering (a 26.05 refusal, or it is exiting)."""

    def __init__(self, message: str, waiting_for: str) -> None:
        super().__init__(message)
        self.waiting_for = waiting_for


class StepdTimeout(BackendError):
    """The stepd did not answer before the deadline."""


# --------------------------------------------------------------------------- the socket adapter


class StepdConnection:
    """A non-blocking connection to one slurmstepd: queued requests, replies decoded in order.

    `queue()` adds a request and returns its reply `Reader`; `drive()` does the I/O. Failures
    are kept in `error` (the connection is then settled). `transcript` records every chunk sent
    and received, as ``("send" | "recv", bytes)``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: BackendError | None = None
        self.transcript: list[tuple[str, bytes]] = []
        self._out = bytearray()
        self._readers: list[tuple[str, stepd.Reader[Any]]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            if exc.errno in _STALE_ERRNOS:
                msg = f"stale slurmstepd socket {path}: {exc.strerror}"
                raise StaleSocket(msg) from exc
            if exc.errno == errno.EAGAIN:
                msg = f"slurmstepd {path} is busy (its listen queue is full)"
                raise BackendError(msg) from exc
            msg = f"cannot connect to slurmstepd {path}: {exc.strerror or exc}"
            raise BackendError(msg) from exc

    def queue(self, exchange: stepd.Exchange[T]) -> stepd.Reader[T]:
        """Send ``exchange`` after what is queued already; its reply comes in that order."""
        reader = exchange.reader()
        self._out += exchange.data
        self._readers.append((exchange.name, reader))
        return reader

    @property
    def waiting_for(self) -> str | None:
        """The name of the first request still without a complete reply."""
        return next((name for name, r in self._readers if not r.done), None)

    @property
    def settled(self) -> bool:
        return self.error is not None or (not self._out and self.waiting_for is None)

    @property
    def events(self) -> int:
        ev = selectors.EVENT_WRITE if self._out else 0
        return ev | (selectors.EVENT_READ if self.waiting_for is not None else 0)

    def fail(self, error: BackendError) -> None:
        if self.error is None:
            self.error = error

    def on_ready(self, mask: int) -> None:
        """Do the I/O the selector reported ready; failures go to `error`."""
        try:
            if mask & selectors.EVENT_WRITE and self._out:
                sent = self.sock.send(self._out)
                self.transcript.append(("send", bytes(self._out[:sent])))
                del self._out[:sent]
            if mask & selectors.EVENT_READ and self.waiting_for is not None:
                self._receive()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in _CLOSED_ERRNOS:
                self._closed()
            else:
                self.fail(BackendError(f"slurmstepd {self.path}: {exc.strerror}"))
        except stepd.StepdProtocolError as exc:
            self.fail(BackendError(f"slurmstepd {self.path} sent garbage: {exc}"))

    def _receive(self) -> None:
        data = self.sock.recv(_RECV_SIZE)
        if not data:
            self._closed()
            return
        self.transcript.append(("recv", data))
        for _name, reader in self._readers:
            if data and not reader.done:
                data = data[reader.feed(data) :]
        if data:
            msg = f"slurmstepd {self.path} sent {len(data)} bytes nobody asked for"
            raise stepd.StepdProtocolError(msg)

    def _closed(self) -> None:
        waiting = self.waiting_for or "a reply"
        msg = f"slurmstepd {self.path} closed the connection instead of answering {waiting}"
        self.fail(StepdClosed(msg, waiting))

    def close(self) -> None:
        self.sock.close()


def drive(conns: Iterable[StepdConnection], deadline: float) -> None:
    """Exchange bytes on every connection until each is settled or ``deadline`` passes.

    ``deadline`` is a `time.monotonic()` value. A connection still waiting then fails with
    `StepdTimeout`; the others are unaffected.
    """
    pending = [c for c in conns if not c.settled]
    with selectors.DefaultSelector() as sel:
        for conn in pending:
            sel.register(conn.sock, conn.events, conn)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for conn in pending:
                    what = conn.waiting_for or "the connection"
                    conn.fail(StepdTimeout(f"slurmstepd {conn.path}: no answer to {what} in time"))
                return
            for key, mask in sel.select(remaining):
                conn = key.data
                conn.on_ready(mask)
                if conn.settled:
                    sel.unregister(conn.sock)
                elif conn.events != key.events:
                    sel.modify(conn.sock, conn.events, conn)
            pending = [c for c in pending if not c.settled]


def _outcome(
    conn: StepdConnection, greeting: stepd.Reader[int], reader: stepd.Reader[T], version: int
) -> T:
    """The value of ``reader``, or the most telling error (a refused handshake first)."""
    if greeting.done and greeting.value < 0:
        msg = (
            f"slurmstepd {conn.path} refused our protocol version {version} "
            f"({stepd.version_name(version)}); set backend.slurm.protocol_version"
        )
        raise BackendError(msg)
    if conn.error is not None:
        raise conn.error
    return reader.value


# --------------------------------------------------------------------------- socket listing


@dataclass(frozen=True, slots=True)
class StepSocket:
    """One stepd socket file in the spool dir."""

    path: Path
    node: str
    job: str
    step: int
    ctime: float
    inode: int = 0

    @property
    def is_extern(self) -> bool:
        return self.step == stepd.EXTERN_STEP


def list_step_sockets(spool_dir: Path) -> list[StepSocket]:
    """Every stepd socket in ``spool_dir`` (any node name); [] when the dir does not exist."""
    found = []
    try:
        entries = list(os.scandir(spool_dir))
    except FileNotFoundError:
        log.warning("slurm spool dir %s does not exist: no jobs", spool_dir)
        return []
    except OSError as exc:
        msg = f"cannot list the slurm spool dir {spool_dir}: {exc.strerror}"
        raise BackendError(msg) from exc
    for entry in entries:
        m = _SOCKET_NAME.fullmatch(entry.name)
        if m is None or m.group("het"):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # the step ended meanwhile
        if stat.S_ISSOCK(st.st_mode):
            found.append(
                StepSocket(
                    Path(entry.path), m["node"], m["job"], int(m["step"]), st.st_ctime, st.st_ino
                )
            )
    return sorted(found, key=lambda s: (not s.is_extern, int(s.job), s.step))


def guess_node_name(nodes: Iterable[str], hostname: str) -> str:
    """This node's NodeName from the node names of the sockets present and the short hostname.

    The hostname, unless the sockets belong to exactly one other name (and none to it).
    """
    names = set(nodes)
    if hostname in names or len(names) != 1:
        return hostname
    return names.pop()


# --------------------------------------------------------------------------- the backend


class SlurmBackend:
    """Jobs from slurmstepd extern steps; adoption with ADD_EXTERN_PID."""

    name = "slurm"
    blocking = True  # every call is an RPC to a slurmstepd

    def __init__(self, cfg: SlurmBackendConfig, *, proc_root: Path = Path("/proc")) -> None:
        self._proc = proc_root
        self._timeout = cfg.timeout_ms / 1000
        self._uids: dict[tuple[str, int, float], tuple[float, int]] = {}  # socket -> owner
        self._version = cfg.protocol_version or stepd.DEFAULT_PROTOCOL_VERSION
        self._host = socket.gethostname().split(".")[0]
        self._node = cfg.node_name
        self._guessed: str | None = None
        expanded = str(cfg.spool_dir).replace("%n", cfg.node_name or self._host)
        self._spool = Path(expanded.replace("%h", self._host))
        log.info(
            "slurm backend: spool dir %s, node %s, protocol %s, timeout %d ms",
            self._spool,
            self._node or f"guessed (hostname {self._host})",
            stepd.version_name(self._version),
            cfg.timeout_ms,
        )

    def jobs_of(self, uid: int) -> list[Job]:
        """``uid``'s jobs: the extern steps whose stepd says STEP_UID == uid."""
        deadline = time.monotonic() + self._timeout
        externs = [s for s in self._sockets() if s.is_extern]
        owners = self._owners(externs, deadline)
        jobs = sorted(
            (Job(s.job, uid, s.ctime) for s in externs if owners.get(s.path) == uid),
            key=Job.sort_key,
        )
        log.debug("uid %d: %d extern steps, jobs %s", uid, len(externs), [j.id for j in jobs])
        return jobs

    def job_of_pid(self, pid: int) -> Job | None:
        """The job ``pid`` runs in (any step), or None."""
        deadline = time.monotonic() + self._timeout
        text = read_proc(f"{self._proc}/{pid}/cgroup")
        if text is None:
            return None  # the process is gone
        sockets = self._sockets()
        job_id = job_from_cgroup(text)
        if job_id is not None:
            return self._describe(job_id, sockets, deadline)
        return self._search(pid, sockets, deadline)

    def adopt(self, pid: int, job: Job) -> None:
        """Adopt ``pid`` into ``job``'s extern step, if the stepd says the job is ``job.uid``'s."""
        if not job.id.isdigit():
            msg = f"invalid job id {job.id!r}"
            raise BackendError(msg)
        if pid <= 0:
            msg = f"invalid pid {pid}"
            raise BackendError(msg)
        deadline = time.monotonic() + self._timeout
        sock = next((s for s in self._sockets() if s.is_extern and s.job == job.id), None)
        if sock is None:
            msg = f"job {job.id} has no extern step on this node (ended, or no PrologFlags=contain)"
            raise JobVanished(msg)
        try:
            self._adopt(pid, job, sock.path, deadline)
        except BackendError as exc:
            if isinstance(exc, JobVanished) or sock.path.exists():
                raise
            msg = f"job {job.id} ended while adopting pid {pid}: {exc}"
            raise JobVanished(msg) from exc
        log.debug("adopted pid %d into job %s (%s)", pid, job.id, sock.path)

    def close(self) -> None:
        """Nothing to release: every connection is closed when its call ends."""

    # ----------------------------------------------------------------------- internals

    def _sockets(self) -> list[StepSocket]:
        """This node's stepd sockets."""
        found = list_step_sockets(self._spool)
        node = self._node
        if node is None:
            node = guess_node_name((s.node for s in found), self._host)
            if node != self._guessed:
                log.info("slurm node name guessed as %r (hostname %r)", node, self._host)
                self._guessed = node
        return [s for s in found if s.node == node]

    def _owners(self, sockets: list[StepSocket], deadline: float) -> dict[Path, int]:
        """STEP_UID of every socket that answers in time (the others are skipped); answers
        are remembered for OWNER_TTL_S by the socket file's identity."""
        now = time.monotonic()
        owners: dict[Path, int] = {}
        unknown = []
        for sock in sockets:
            hit = self._uids.get(_identity(sock))
            if hit is not None and now < hit[0]:
                owners[sock.path] = hit[1]
            else:
                unknown.append(sock)
        if unknown:
            asked = self._ask(unknown, lambda _s: [stepd.step_uid()], deadline)
            if len(self._uids) + len(asked) > _MAX_OWNERS:
                self._uids.clear()
            for sock, values in asked.items():
                owners[sock.path] = values[0]
                self._uids[_identity(sock)] = (now + OWNER_TTL_S, values[0])
        return owners

    def _ask(
        self,
        sockets: list[StepSocket],
        requests: Callable[[StepSocket], list[stepd.Exchange[Any]]],
        deadline: float,
    ) -> dict[StepSocket, list[Any]]:
        """Handshake plus ``requests(sock)`` on every socket at once; the replies of those that
        answered. Stale sockets are skipped quietly, other failures with a warning."""
        talks: list[tuple[StepSocket, StepdConnection, stepd.Reader[int], list[Any]]] = []
        for sock in sockets:
            try:
                conn = StepdConnection(sock.path)
            except BackendError as exc:
                _skip(sock, exc)
                continue
            greeting = conn.queue(stepd.hello(self._version))
            talks.append((sock, conn, greeting, [conn.queue(r) for r in requests(sock)]))
        try:
            drive((t[1] for t in talks), deadline)
        finally:
            for _sock, conn, _g, _r in talks:
                conn.close()
        answers: dict[StepSocket, list[Any]] = {}
        for sock, conn, greeting, readers in talks:
            try:
                answers[sock] = [_outcome(conn, greeting, r, self._version) for r in readers]
            except BackendError as exc:
                _skip(sock, exc)
        return answers

    def _describe(self, job_id: str, sockets: list[StepSocket], deadline: float) -> Job | None:
        """Job ``job_id`` (owner from its stepd), or None when it has no live stepd here."""
        mine = [s for s in sockets if s.job == job_id]  # extern first (list order)
        if not mine:
            log.debug("job %s has no stepd socket on this node", job_id)
            return None
        owners = self._owners(mine[:1], deadline)
        if not owners:
            return None
        return Job(job_id, owners[mine[0].path], mine[0].ctime)

    def _search(self, pid: int, sockets: list[StepSocket], deadline: float) -> Job | None:
        """Ask every stepd whether ``pid`` is in its container (or is the stepd itself)."""

        def requests(_s: StepSocket) -> list[stepd.Exchange[Any]]:
            return [stepd.pid_in_container(pid), stepd.daemon_pid(), stepd.step_uid()]

        asked = self._ask(sockets, requests, deadline)
        for sock in sockets:  # extern steps first
            values = asked.get(sock)
            if values is not None and (values[0] or values[1] == pid):
                extern = next((s for s in sockets if s.is_extern and s.job == sock.job), sock)
                return Job(sock.job, values[2], extern.ctime)
        return None

    def _adopt(self, pid: int, job: Job, path: Path, deadline: float) -> None:
        conn = StepdConnection(path)
        try:
            greeting = conn.queue(stepd.hello(self._version))
            owner = conn.queue(stepd.step_uid())
            state = conn.queue(stepd.state())
            drive([conn], deadline)
            uid = _outcome(conn, greeting, owner, self._version)
            if uid != job.uid:
                msg = f"job {job.id} belongs to uid {uid}, not {job.uid}: not adopting pid {pid}"
                raise BackendError(msg)
            step_state = stepd.state_name(
                _outcome(conn, greeting, state, self._version), greeting.value
            )
            if step_state in ("cancelled", "ending"):
                msg = f"job {job.id} is ending (extern step {step_state})"
                raise JobVanished(msg)
            added = conn.queue(stepd.add_extern_pid(pid))
            inside = conn.queue(stepd.pid_in_container(pid))
            drive([conn], deadline)
        finally:
            conn.close()
        gone = "" if (self._proc / str(pid)).exists() else f" (process {pid} is gone)"
        if added.done and added.value != 0:
            msg = f"slurmstepd of job {job.id} refused to adopt pid {pid} (rc {added.value}){gone}"
            raise BackendError(msg)
        if not added.done and isinstance(conn.error, StepdClosed):
            msg = (
                f"slurmstepd of job {job.id} refused to adopt pid {pid}: it closed the "
                f"connection (not root/SlurmUser, or the step is ending){gone}"
            )
            raise BackendError(msg) from conn.error
        if conn.error is not None:
            raise conn.error
        if not inside.value:
            msg = f"slurmstepd of job {job.id} accepted pid {pid} but does not contain it"
            raise BackendError(msg)


def _skip(sock: StepSocket, exc: BackendError) -> None:
    if isinstance(exc, StaleSocket):
        log.debug("job %s: %s; skipped", sock.job, exc)
    else:
        log.warning("job %s: %s; skipped", sock.job, exc)


_CGROUP_JOB = re.compile(r"/job_(\d+)/step_[^/]+(?:/|$)")


def job_from_cgroup(text: str) -> str | None:
    """The Slurm job id a /proc/<pid>/cgroup text shows (``.../job_<J>/step_...``), or None.

    None too when lines disagree (then the stepds are asked instead).
    """
    found = {m.group(1) for line in text.splitlines() if (m := _CGROUP_JOB.search(line))}
    return found.pop() if len(found) == 1 else None
