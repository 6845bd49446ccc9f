"""The `slurm` backend: jobs and adoption through each job's slurmstepd unix socket.

What pam_slurm_adopt does, with our own bounds and checks (reference/slurm.md sections 4, 5):

- Jobs of a uid: the extern-step sockets ``<SlurmdSpoolDir>/<NodeName>_<jobid>.4294967292``
  (they exist with ``PrologFlags=contain``); the owner of each is asked with STEP_UID (one
  connection per extern step, all at once), the start time is the socket's ctime (as 26.05
  does; ties go to the higher job id, `Job.sort_key`). A stale socket (no listener, or gone) is
  skipped; so is a stepd that does not answer in time (logged: it could not adopt anyway).
  A step's owner never changes, so an answer is remembered for ``owner_ttl_s`` by the socket
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
non-blocking and driven together by one selector with one deadline (`_stepd_io.drive`). The
backend keeps no connection between calls and may be called from several threads at once.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callerid.agent.backends import stepd
from callerid.agent.backends._stepd_io import (
    StaleSocket,
    StepdClosed,
    StepdConnection,
    StepdTimeout,
    drive,
    outcome,
)
from callerid.agent.backends.base import BackendError, Job, JobVanished
from callerid.agent.config import SlurmBackendConfig
from callerid.agent.memo import Memo
from callerid.agent.netinfo import read_proc

__all__ = [
    "SlurmBackend",
    "StaleSocket",
    "StepSocket",
    "StepdClosed",
    "StepdTimeout",
    "guess_node_name",
    "job_from_cgroup",
    "list_step_sockets",
]

log = logging.getLogger(__name__)

_SOCKET_NAME = re.compile(r"(?P<node>.+)_(?P<job>\d+)\.(?P<step>\d+)(?:\.(?P<het>\d+))?")
_CGROUP_JOB = re.compile(r"/job_(\d+)/step_[^/]+(?:/|$)")

# --------------------------------------------------------------------------- socket listing


@dataclass(frozen=True, slots=True)
class StepSocket:
    """One stepd socket file in the spool dir."""

    path: Path
    node: str
    job: str
    step: int
    ctime: float
    inode: int

    @property
    def is_extern(self) -> bool:
        return self.step == stepd.EXTERN_STEP

    @property
    def identity(self) -> tuple[str, int, float]:
        """The socket file's identity: a new stepd of the same step makes a new file."""
        return (str(self.path), self.inode, self.ctime)


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


def job_from_cgroup(text: str) -> str | None:
    """The Slurm job id a /proc/<pid>/cgroup text shows (``.../job_<J>/step_...``), or None.

    None too when lines disagree (then the stepds are asked instead).
    """
    found = {m.group(1) for line in text.splitlines() if (m := _CGROUP_JOB.search(line))}
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------- the backend


class SlurmBackend:
    """Jobs from slurmstepd extern steps; adoption with ADD_EXTERN_PID.

    ``clock`` (seconds, as `time.monotonic`) bounds every call and ages the owner memory;
    ``owner_ttl_s`` and ``max_owners`` bound that memory.
    """

    name = "slurm"
    blocking = True  # every call is an RPC to a slurmstepd

    def __init__(
        self,
        cfg: SlurmBackendConfig,
        *,
        proc_root: Path = Path("/proc"),
        clock: Callable[[], float] = time.monotonic,
        owner_ttl_s: float = 10.0,
        max_owners: int = 65536,
    ) -> None:
        self._proc = proc_root
        self._clock = clock
        self._timeout = cfg.timeout_ms / 1000
        # socket file identity -> STEP_UID: a step's owner never changes, and a new stepd
        # (a requeued job) makes a new socket file; the TTL only lets go of dead stepds' sockets
        self._uids: Memo[tuple[str, int, float], int] = Memo(
            max_entries=max_owners, ttl_s=owner_ttl_s, clock=clock
        )
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
        deadline = self._clock() + self._timeout
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
        deadline = self._clock() + self._timeout
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
        deadline = self._clock() + self._timeout
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
        """STEP_UID of every socket that answers in time (the others are skipped)."""
        owners: dict[Path, int] = {}
        unknown = []
        for sock in sockets:
            uid = self._uids.get(sock.identity)
            if uid is None:
                unknown.append(sock)
            else:
                owners[sock.path] = uid
        if unknown:
            for sock, values in self._ask(unknown, lambda _s: [stepd.step_uid()], deadline).items():
                owners[sock.path] = values[0]
                self._uids.put(sock.identity, values[0])
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
            drive((t[1] for t in talks), deadline, self._clock)
        finally:
            for _sock, conn, _g, _r in talks:
                conn.close()
        answers: dict[StepSocket, list[Any]] = {}
        for sock, conn, greeting, readers in talks:
            try:
                answers[sock] = [outcome(conn, greeting, r, self._version) for r in readers]
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
            drive([conn], deadline, self._clock)
            uid = outcome(conn, greeting, owner, self._version)
            if uid != job.uid:
                msg = f"job {job.id} belongs to uid {uid}, not {job.uid}: not adopting pid {pid}"
                raise BackendError(msg)
            step_state = stepd.state_name(
                outcome(conn, greeting, state, self._version), greeting.value
            )
            if step_state in ("cancelled", "ending"):
                msg = f"job {job.id} is ending (extern step {step_state})"
                raise JobVanished(msg)
            added = conn.queue(stepd.add_extern_pid(pid))
            inside = conn.queue(stepd.pid_in_container(pid))
            drive([conn], deadline, self._clock)
        finally:
            conn.close()
        self._check_adopted(pid, job, conn, added, inside)

    def _check_adopted(
        self,
        pid: int,
        job: Job,
        conn: StepdConnection,
        added: stepd.Reader[int],
        inside: stepd.Reader[bool],
    ) -> None:
        """Raise unless ADD_EXTERN_PID said 0 and PID_IN_CONTAINER then said yes."""
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
