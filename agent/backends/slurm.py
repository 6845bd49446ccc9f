"""The `slurm` backend: jobs and adoption through each job's slurmstepd unix socket.

What pam_slurm_adopt does, with our own bounds and checks (reference/slurm.md sections 4, 5):

- Jobs of a uid: the extern-step sockets ``<SlurmdSpoolDir>/<NodeName>_<jobid>.4294967292``
  (they exist with ``PrologFlags=contain``); the owner of each is asked with STEP_UID (one
  connection per extern step, all at once), the start time is the socket's ctime (as 26.05
  does; ties go to the higher job id, `Job.sort_key`). A stale socket (no listener, or gone) is
  skipped; so is a stepd that does not answer in time (logged: it could not adopt anyway).
  A step's owner never changes, so an answer is remembered for ``owner_ttl_s`` by the socket
  file's identity (path, inode, ctime: a requeued job's new stepd makes a new file). The
  listing is read again whenever the spool dir has changed (`SpoolListing`: one stat per call
  otherwise), so an ended step drops out at once. (A stepd that died without removing its
  socket is still listed until the memory expires; adopting into it fails, as it would have.)
- The job's group (`Job.gid`: ``sbatch --gid`` or the submitter's group): GETPW's gid,
  pipelined after STEP_UID and remembered with it (no other request tells it; the extern
  step's ``sleep`` runs as root in 22.05). "Not found" or a failed GETPW: None.
- The job of a pid: ``/proc/<pid>/cgroup`` when it shows ``.../job_<J>/step_...`` (Slurm's
  cgroup layouts, v1 and v2), confirmed and described by job J's stepd; otherwise every stepd
  of the node is asked PID_IN_CONTAINER and DAEMON_PID (as slurmd's own pid-to-job lookup does).
- Adoption, on one connection (`_slurm_adopt.Adoption`): STEP_UID must equal the job's uid
  (defence in depth: pam_slurm_adopt does not check; asked only when that stepd's owner is
  not remembered) and STATE must not be ending; ADD_EXTERN_PID, and PID_IN_CONTAINER to
  confirm the first adoption through a stepd. A 22.05 stepd refuses with rc -1, a 26.05 one
  closes the connection: both are BackendError; a job whose socket is gone raises
  JobVanished. `begin_adoption` sends the requests; `adopt_now` (the calling thread, bounded),
  `adopt_async` (the event loop) or `adopt` (both steps, in a thread) finish it.
- The job's namespaces (``join_container``, as pam_slurm_adopt's): the fds the extern stepd
  passes with GET_NS_FD (job_container/tmpfs, up to 25.05) or GET_NS_FDS (namespace/*, 25.11
  on), after STEP_UID; None when the job has none (`_slurm_ns`).

NodeName: ``backend.slurm.node_name`` when set; otherwise the short hostname, except when the
spool dir holds sockets of exactly one other node name and none of the hostname's (NodeName
differs from the hostname): then that name. ``%n`` and ``%h`` in ``spool_dir`` are replaced
by the node name (configured, else the short hostname) and the short hostname, as slurmd does.

Every public call is bounded by ``timeout_ms`` in total (connect, send and every reply; Slurm
sets no timeout on these sockets), however many stepds it talks to: connections are
non-blocking and driven together in one poll(2) with one deadline (`_stepd_io.drive`); an
adoption's bound counts from `begin_adoption`. The backend keeps no connection between calls
but a begun adoption (its caller's until it is finished or closed), and may be called from
several threads at once.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from callerid.agent.backends import stepd
from callerid.agent.backends._slurm_adopt import Adoption
from callerid.agent.backends._slurm_ns import fetch_namespaces
from callerid.agent.backends._slurm_sockets import (
    SpoolListing,
    StepSocket,
    guess_node_name,
    job_from_cgroup,
    list_step_sockets,
)
from callerid.agent.backends._stepd_io import (
    StaleSocket,
    StepdClosed,
    StepdConnection,
    StepdTimeout,
    drive,
    drive_async,
    outcome,
)
from callerid.agent.backends.base import BackendError, Begun, Job, JobNamespaces, JobVanished
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
        wall: Callable[[], float] = time.time,
        owner_ttl_s: float = 10.0,
        max_owners: int = 65536,
    ) -> None:
        self._proc = proc_root
        self._clock = clock
        self._timeout = cfg.timeout_ms / 1000
        self._join = cfg.join_container
        # socket file identity -> (STEP_UID, its gid): a step's owner and group never change,
        # and a new stepd (a requeued job) makes a new socket file; the TTL only lets go of
        # dead stepds' sockets
        self._ids: Memo[tuple[str, int, float], tuple[int, int | None]] = Memo(
            max_entries=max_owners, ttl_s=owner_ttl_s, clock=clock
        )
        # socket file identity of an extern step found without namespaces: a job's namespace
        # plugin set them up (or not) when the job started and that never changes, so later
        # logins into the job skip the stepd round trip (fds themselves are fetched anew)
        self._no_ns: Memo[tuple[str, int, float], bool] = Memo(
            max_entries=max_owners, ttl_s=owner_ttl_s, clock=clock
        )
        # socket file identity of an extern stepd that has confirmed an adoption with
        # PID_IN_CONTAINER: its proctrack plugin (what can contain a pid) is loaded once for
        # the stepd's life, so later adoptions through it need not ask again
        self._contains: Memo[tuple[str, int, float], bool] = Memo(
            max_entries=max_owners, ttl_s=owner_ttl_s, clock=clock
        )
        self._version = cfg.protocol_version or stepd.DEFAULT_PROTOCOL_VERSION
        self._host = socket.gethostname().split(".")[0]
        self._node = cfg.node_name
        self._guessed: str | None = None
        expanded = str(cfg.spool_dir).replace("%n", cfg.node_name or self._host)
        self._spool = Path(expanded.replace("%h", self._host))
        self._listing = SpoolListing(self._spool, wall)
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
        jobs = self._jobs(uid, externs, self._owners(externs, deadline))
        log.debug("uid %d: %d extern steps, jobs %s", uid, len(externs), [j.id for j in jobs])
        return jobs

    def _jobs(
        self, uid: int, externs: list[StepSocket], owners: dict[Path, tuple[int, int | None]]
    ) -> list[Job]:
        return sorted(
            (
                Job(s.job, uid, s.ctime, ids[1])
                for s in externs
                if (ids := owners.get(s.path)) is not None and ids[0] == uid
            ),
            key=Job.sort_key,
        )

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
        """Adopt ``pid`` into ``job``'s extern step (`Adoption`, driven in the calling thread)."""
        adoption = self.begin_adoption(pid, job)
        self._drive_here(adoption, adoption.deadline)

    def begin_adoption(self, pid: int, job: Job) -> Adoption:
        """The adoption of ``pid`` into ``job``, its requests sent now (`Adoption`), bounded
        from now; the caller finishes it (`adopt_now`, `adopt_async`) or closes it."""
        if not job.id.isdigit():
            msg = f"invalid job id {job.id!r}"
            raise BackendError(msg)
        deadline = self._clock() + self._timeout
        sock = self._extern(job)
        known = self._ids.get(sock.identity)
        return Adoption(
            pid, job, sock, self._version, deadline,
            owner_known=known is not None and known[0] == job.uid, proc_root=self._proc,
            contains_known=bool(self._contains.get(sock.identity)),
            no_namespaces=not self._join or bool(self._no_ns.get(sock.identity)),
        )  # fmt: skip

    def adopt_now(self, begun: Begun, wait_s: float) -> bool:
        """Go on with ``begun`` (`begin_adoption`'s) in this thread, ``wait_s`` at most: True
        once adopted (raises as `adopt` does), False if the stepd has not answered yet."""
        assert isinstance(begun, Adoption)
        return self._drive_here(begun, min(begun.deadline, self._clock() + wait_s))

    async def adopt_async(self, pid: int, job: Job, begun: Begun | None = None) -> None:
        """`adopt`, with the stepd exchange driven by the running event loop (no thread);
        ``begun``: this very adoption from `begin_adoption`, taken over (closed here)."""
        if isinstance(begun, Adoption) and (begun.pid, begun.job) == (pid, job):
            adoption = begun
        else:
            if begun is not None:
                begun.close()
            adoption = self.begin_adoption(pid, job)
        try:  # cancelled mid-exchange: the connection is closed
            with self._ended(job, adoption.sock, f"adopting pid {pid}"):
                while (conns := adoption.advance()) is not None:
                    await drive_async(conns, adoption.deadline, self._clock)
        finally:
            adoption.close()
        self._adopted(adoption)

    def _drive_here(self, adoption: Adoption, until: float) -> bool:
        """Drive ``adoption`` in this thread until ``until`` (its deadline: to the end)."""
        try:
            with self._ended(adoption.job, adoption.sock, f"adopting pid {adoption.pid}"):
                while (conns := adoption.advance()) is not None:
                    if not drive(conns, until, self._clock, expire=until >= adoption.deadline):
                        return False  # left open, to go on with
        except BaseException:
            adoption.close()
            raise
        self._adopted(adoption)
        return True

    def _adopted(self, adoption: Adoption) -> None:
        """A confirmed adoption: closed; this stepd can contain what it adopts (`_contains`)."""
        adoption.close()
        self._contains.put(adoption.sock.identity, True)

    def jobs_now(self, uid: int) -> list[Job] | None:
        """`jobs_of` if it needs no stepd (every extern step's owner remembered), else None."""
        externs = [s for s in self._sockets() if s.is_extern]
        owners = {s.path: ids for s in externs if (ids := self._ids.get(s.identity)) is not None}
        return None if len(owners) < len(externs) else self._jobs(uid, externs, owners)

    def no_namespaces(self, job: Job) -> bool:
        """Whether `namespaces` is known to return None without asking the stepd."""
        if not self._join:
            return True
        sock = next((s for s in self._sockets() if s.is_extern and s.job == job.id), None)
        return sock is not None and bool(self._no_ns.get(sock.identity))

    def namespaces(self, job: Job) -> JobNamespaces | None:
        """``job``'s namespace fds from its extern stepd, or None (none, or join_container
        off); BackendError when it has namespaces that cannot be had."""
        if not self._join:
            return None
        if not job.id.isdigit():
            msg = f"invalid job id {job.id!r}"
            raise BackendError(msg)
        deadline = self._clock() + self._timeout
        sock = self._extern(job)
        if self._no_ns.get(sock.identity):
            return None
        with self._ended(job, sock, "fetching its namespaces"):
            found = fetch_namespaces(sock.path, job, self._version, deadline, self._clock)
        log.debug("job %s: namespaces %s", job.id, found.kinds if found else "none")
        if found is None:
            self._no_ns.put(sock.identity, True)
        return found

    def close(self) -> None:
        """Nothing to release: a call's connections close as it ends (a begun one: its caller's)."""

    # ----------------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _ended(self, job: Job, sock: StepSocket, doing: str) -> Iterator[None]:
        """A failure while the job's socket is gone is the job having ended (JobVanished)."""
        try:
            yield
        except BackendError as exc:
            if isinstance(exc, JobVanished) or sock.path.exists():
                raise
            msg = f"job {job.id} ended while {doing}: {exc}"
            raise JobVanished(msg) from exc

    def _extern(self, job: Job) -> StepSocket:
        sock = next((s for s in self._sockets() if s.is_extern and s.job == job.id), None)
        if sock is None:
            msg = f"job {job.id} has no extern step on this node (ended, or no PrologFlags=contain)"
            raise JobVanished(msg)
        return sock

    def _sockets(self) -> list[StepSocket]:
        """This node's stepd sockets."""
        found = self._listing.sockets()
        node = self._node
        if node is None:
            node = guess_node_name((s.node for s in found), self._host)
            if node != self._guessed:
                log.info("slurm node name guessed as %r (hostname %r)", node, self._host)
                self._guessed = node
        return [s for s in found if s.node == node]

    def _owners(
        self, sockets: list[StepSocket], deadline: float
    ) -> dict[Path, tuple[int, int | None]]:
        """(STEP_UID, the job's gid) of every socket that answers in time (others skipped)."""
        owners: dict[Path, tuple[int, int | None]] = {}
        unknown = []
        for sock in sockets:
            ids = self._ids.get(sock.identity)
            if ids is None:
                unknown.append(sock)
            else:
                owners[sock.path] = ids
        if unknown:
            asked = self._ask(unknown, lambda _s: [stepd.step_uid(), stepd.getpw()], deadline, 1)
            for sock, (uid, pw) in asked.items():
                owners[sock.path] = (uid, _gid_of(sock, uid, pw))
                if pw is not _UNANSWERED:  # a failed GETPW is asked again next time
                    self._ids.put(sock.identity, owners[sock.path])
        return owners

    def _ask(
        self,
        sockets: list[StepSocket],
        requests: Callable[[StepSocket], list[stepd.Exchange[Any]]],
        deadline: float,
        required: int | None = None,
    ) -> dict[StepSocket, list[Any]]:
        """Handshake plus ``requests(sock)`` on every socket at once; the replies of those that
        answered. Stale sockets are skipped quietly, other failures with a warning. With
        ``required``, only the first that many requests must be answered; a later one that
        was not is `_UNANSWERED`."""
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
            must = readers if required is None else readers[:required]
            greeted = greeting.done and greeting.value >= 0
            try:  # a reply that came before a failure stands
                values = [
                    r.value if greeted and r.done else outcome(conn, greeting, r, self._version)
                    for r in must
                ]
            except BackendError as exc:
                _skip(sock, exc)
                continue
            rest = readers[len(must) :]
            answers[sock] = values + [r.value if r.done else _UNANSWERED for r in rest]
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
        uid, gid = owners[mine[0].path]
        return Job(job_id, uid, mine[0].ctime, gid)

    def _search(self, pid: int, sockets: list[StepSocket], deadline: float) -> Job | None:
        """Ask every stepd whether ``pid`` is in its container (or is the stepd itself)."""

        def requests(_s: StepSocket) -> list[stepd.Exchange[Any]]:
            return [
                stepd.pid_in_container(pid), stepd.daemon_pid(), stepd.step_uid(), stepd.getpw()
            ]  # fmt: skip

        asked = self._ask(sockets, requests, deadline, 3)
        for sock in sockets:  # extern steps first
            values = asked.get(sock)
            if values is not None and (values[0] or values[1] == pid):
                extern = next((s for s in sockets if s.is_extern and s.job == sock.job), sock)
                return Job(sock.job, values[2], extern.ctime, _gid_of(sock, values[2], values[3]))
        return None


_UNANSWERED: Any = object()  # a reply `_ask` did not require and did not get


def _gid_of(sock: StepSocket, uid: int, pw: stepd.StepPasswd | None) -> int | None:
    """The job's gid from a GETPW answer, if it has one and it is about the step's owner."""
    if pw is _UNANSWERED or pw is None:
        return None
    if pw.uid != uid:
        log.warning("job %s: GETPW names uid %d, STEP_UID %d: group ignored", sock.job, pw.uid, uid)
        return None
    return pw.gid


def _skip(sock: StepSocket, exc: BackendError) -> None:
    if isinstance(exc, StaleSocket):
        log.debug("job %s: %s; skipped", sock.job, exc)
    else:
        log.warning("job %s: %s; skipped", sock.job, exc)
