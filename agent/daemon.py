"""The imperative shell: composition root, event loop, signals, sd_notify.

`build()` is the one place where the pieces are made and wired together (config -> netinfo,
backend, journal, mesh server and client, the source side, the login flow, the PAM server);
tests call it with their own ``proc_root``, ``clock`` and config; in the agent only
`__main__` imports this module. `run()` owns the event loop: every task lives in one
TaskGroup; SIGHUP and SIGTERM become commands on a queue, handled on the loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from callerid.agent import __version__
from callerid.agent import config as config_mod
from callerid.agent.ask import LocalAddresses, SourceAsker, mesh_asker
from callerid.agent.backends import make_backend
from callerid.agent.backends._primer import Primer
from callerid.agent.backends.base import Backend, BackendError
from callerid.agent.config import Config, ConfigError
from callerid.agent.journal import Journal
from callerid.agent.login import LoginFlow
from callerid.agent.metrics import Metrics
from callerid.agent.netinfo import ProcReader, SessionFinder, SocketOwners
from callerid.agent.pamserver import PamServer
from callerid.agent.source import SourceAnswer
from callerid.agent.users import Users
from callerid.bus.peers import PeerTable, local_node_name
from callerid.bus.protocol import CallerIdQuery, CallerIdReply
from callerid.bus.transport import KeyPair, MeshClient, MeshServer, PeerIdentity, load_keypair

__all__ = ["Agent", "build", "run"]

log = logging.getLogger(__name__)

WORKER_THREADS = 8
SHUTDOWN_STEP_S = 3.0
FD_LIMIT = 65536
# Collect young objects every 7,000 net allocations instead of Python's 700: a login allocates
# a few hundred, nearly all freed by reference counting when it ends (see `settle_gc`).
GC_THRESHOLD = (7000, 50, 10)
SCHED_POLICIES: dict[str, int] = {"batch": os.SCHED_BATCH, "normal": os.SCHED_OTHER}


@dataclass
class Agent:
    """The running agent's pieces, as `build` wired them, and what SIGHUP and status need."""

    cfg: Config
    cfg_path: Path | None
    node: str
    journal: Journal
    backend: Backend
    users: Users
    flow: LoginFlow
    sessions: SessionFinder
    owners: SocketOwners
    pam: PamServer
    mesh: MeshServer
    client: MeshClient
    peers: PeerTable
    executor: ThreadPoolExecutor
    clock: Callable[[], float]
    commands: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    started: float = 0.0
    metrics: Metrics | None = None

    def status(self) -> dict[str, object]:
        """What `calleridctl status` shows: identity, uptime and the counters that matter."""
        return {
            "node": self.node,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(self.clock() - self.started, 1),
            "backend": self.backend.name,
            "mesh": self.mesh.endpoints,
            "peers": len(self.peers),
            "pooled": len(self.client.connected_peers),
            "served": dataclasses.asdict(self.mesh.stats),
            "asked": dataclasses.asdict(self.client.stats),
            "pam": {
                "in_flight": self.pam.in_flight,
                "waiting": len(self.pam.turns.queued),
                "refused": self.pam.refused,
                "malformed": self.pam.malformed,
                "abandoned": self.pam.turns.abandoned,
                "accept_errors": self.pam.accept_errors,
            },
            "scheduling": scheduling_name(os.sched_getscheduler(0)),
            "journald": self.journal.journald_running,
            "journal_lost": self.journal.lost,  # records journald did not get
            "metrics": None if self.metrics is None else self.metrics.endpoint(),
        }

    def reload(self) -> None:
        """SIGHUP: re-read the config file and the keys; keep the old ones on any error.

        Never raises (it runs on the serve loop, where an exception would stop the agent): the
        new config and its peer keys are both read before anything changes, and whatever
        fails, the file (`config.load` raises only ConfigError) or the keys directory, the
        reload is refused with one error line and a ``config_error`` record.
        """
        try:
            new = config_mod.load(self.cfg_path) if self.cfg_path is not None else self.cfg
        except Exception as exc:  # a reload must never stop the agent
            self._refuse(exc)
            return
        try:
            peers = PeerTable.load(new.keys.authorized)
        except Exception as exc:  # a missing or unreadable directory: keep the old table
            self._refuse(exc, "keys.authorized: ")
            return
        built_once = (
            "node_name listen port keys.dir peer pam_socket pam_timeout_ms backend journal metrics "
            "scheduling"
        )
        for key in built_once.split():  # what build() wired in: the policy and keys reload
            if self._dotted(new, key) != self._dotted(self.cfg, key):
                log.warning("reload: %s changed; it takes effect at the next restart", key)
        try:
            # exempt_groups, or the users' groups, may have changed: forget the remembered users
            self.users.reconfigure(new.policy)
            self.flow.cfg = new.policy
            self.flow.mode = new.mode
            self.client.peers = peers
            self.mesh.reload_keys(peers)
        except Exception as exc:  # pragma: no cover - in-memory assignments; never stop
            self._refuse(exc, "applying it: ")
            return
        self.cfg, self.peers = new, peers
        self.journal.event(
            "reloaded", f"configuration and {len(peers)} peer keys reloaded", node=self.node
        )

    @staticmethod
    def _dotted(cfg: Config, key: str) -> object:
        value: object = cfg
        for part in key.split("."):
            value = getattr(value, part)
        return value

    def _refuse(self, exc: Exception, what: str = "") -> None:
        known = isinstance(exc, ConfigError | OSError)
        reason = str(exc) if known else f"{type(exc).__name__}: {exc}"
        reason = " ".join(f"{what}{reason}".split())
        log.error("reload refused, keeping the running config: %s", reason)
        self.journal.event("config_error", f"reload refused: {reason}", node=self.node)

    def close(self) -> None:
        """Release what the pieces hold (after the servers have stopped)."""
        self.backend.close()
        self.sessions.close()
        self.owners.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def build(
    cfg: Config,
    *,
    cfg_path: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
    proc_root: Path = Path("/proc"),
) -> Agent:
    """The composition root: make every piece once and wire them together."""
    node = local_node_name(cfg.node_name)
    keypair: KeyPair = load_keypair(cfg.keys.dir, node)
    peers = PeerTable.load(cfg.keys.authorized)
    journal = Journal(cfg.journal)
    executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="callerid-io")
    backend = make_backend(cfg.backend, proc_root=proc_root, clock=clock)
    client = MeshClient(keypair, peers, cfg.peer, port=cfg.port, clock=clock)
    procs = ProcReader(proc_root)
    owners = SocketOwners(procs)
    source = SourceAnswer(node=node, owners=owners, backend=backend, executor=executor, clock=clock)
    users = Users(cfg.policy, executor=executor, clock=clock)
    sessions = SessionFinder(procs, clock=clock)
    ask_source = SourceAsker(
        ask_peer=mesh_asker(client), is_local=LocalAddresses(cfg.listen, clock), local=source
    )
    primer = Primer.detect(executor, clock, proc_root) if cfg.backend.prime_migration else None
    flow = LoginFlow(
        cfg.policy,
        node=node,
        users=users,
        sessions=sessions,
        procs=procs,
        backend=backend,
        ask_source=ask_source,
        executor=executor,
        clock=clock,
        mode=cfg.mode,
        deadline_s=cfg.pam_timeout_ms / 1000,
        primer=primer.prime if primer is not None else None,
    )

    async def on_query(query: CallerIdQuery, peer: PeerIdentity) -> CallerIdReply:
        return await source.answer(query, peer.node or peer.public_key[:8])

    mesh = MeshServer(
        keypair, on_query, peers=peers, addresses=cfg.listen, port=cfg.port, node=node,
        clock=clock,
    )  # fmt: skip
    metrics = Metrics(cfg.metrics) if cfg.metrics.enabled else None
    sink = journal if metrics is None else metrics.sink(journal)  # counts each record
    pam = PamServer(flow, sink, timeout_s=cfg.pam_timeout_ms / 1000, clock=clock)
    agent = Agent(
        cfg, cfg_path, node, journal, backend, users, flow, sessions, owners, pam, mesh,
        client, peers, executor, clock,
    )  # fmt: skip
    agent.started = clock()
    pam.status = agent.status
    if metrics is not None:
        agent.metrics = metrics
        metrics.watch(agent.status)
    return agent


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s,
    ):
        s.sendto(state.encode(), addr)


async def _watchdog() -> None:
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0:
        return
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2e6)


async def serve(agent: Agent) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    for sig, cmd in ((signal.SIGHUP, "reload"), (signal.SIGTERM, "stop"), (signal.SIGINT, "stop")):
        loop.add_signal_handler(sig, agent.commands.put_nowait, cmd)
    await agent.mesh.start()
    await agent.pam.start(agent.cfg.pam_socket)
    if agent.metrics is not None:
        await agent.metrics.start()
    agent.journal.event(
        "started",
        f"callerid-agent on {agent.node}: mesh {agent.mesh.endpoints}, PAM socket "
        f"{agent.cfg.pam_socket}, backend {agent.backend.name}",
        node=agent.node,
    )
    sd_notify("READY=1")
    settle_gc()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(agent.mesh.serve())
            watchdog = tg.create_task(_watchdog())
            textfile = tg.create_task(agent.metrics.run()) if agent.metrics else None
            while (cmd := await agent.commands.get()) != "stop":
                if cmd == "reload":
                    sd_notify("RELOADING=1")
                    agent.reload()
                    sd_notify("READY=1")
            sd_notify("STOPPING=1")
            agent.journal.event(
                "stopping", f"callerid-agent on {agent.node} stopping", node=agent.node
            )
            await agent.pam.stop()
            await agent.pam.drain(agent.cfg.pam_timeout_ms / 1000)
            watchdog.cancel()
            if textfile is not None:
                textfile.cancel()
            await _bounded(agent.mesh.close(), "closing the mesh server")
    finally:
        if agent.metrics is not None:
            await _bounded(agent.metrics.stop(), "stopping the metrics")
        await _bounded(agent.client.close(), "closing the mesh client")
        agent.close()


def settle_gc() -> None:
    """Keep the cyclic collector off the logins' path, once the agent is up.

    What the agent built to serve (its modules, the config, the backend's watches, the mesh)
    lives until it exits, yet every full collection would walk it again: `gc.freeze` moves it
    (after one last collection, so no garbage is kept) out of the collector's generations, and
    a collection in a storm of logins walks only what the logins made. Young objects are
    collected every `GC_THRESHOLD`[0] net allocations instead of 700, and the middle
    generation after 50 such collections instead of 10: what survives a young collection is
    mostly the state of logins in flight (a storm holds a thousand), which the next one has
    freed, not garbage (a storm's collections collect nothing: a login makes no reference
    cycle), and walking it again is the cost. Nothing is lost: objects made after this (a
    reload's config included) are collected as before, and a frozen object is still freed by
    reference counting. In the storm (bench/storm.py) the collector's time in agent b went
    from 0.09-0.1 s to 0.04 s per 6,000 decisions with the freeze (docs/performance.md,
    section 11), and from 0.028 s to 0.020 s with the middle generation's 50, its one
    10 ms collection gone (section 13).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def _bounded(step: Awaitable[None], what: str) -> None:
    try:
        async with asyncio.timeout(SHUTDOWN_STEP_S):
            await step
    except TimeoutError:
        log.warning("%s took over %.0f s; going on with the shutdown", what, SHUTDOWN_STEP_S)


def set_scheduling(policy: str) -> None:
    """Put this thread, and every thread it starts afterwards (they inherit it), under the
    CPU scheduling ``policy`` (config ``scheduling``: why batch is the default is said there
    and in docs/performance.md, section 11). Refused (a seccomp filter, a container): one
    warning, and the agent runs under the policy it was started with."""
    try:
        os.sched_setscheduler(0, SCHED_POLICIES[policy], os.sched_param(0))
    except OSError as exc:
        log.warning(
            "cannot set the CPU scheduling policy to %s (%s); running under %s",
            policy,
            exc.strerror or exc,
            scheduling_name(os.sched_getscheduler(0)),
        )


def scheduling_name(policy: int) -> str:
    """The config name of a scheduling policy number (another one: its number)."""
    return next((k for k, v in SCHED_POLICIES.items() if v == policy), str(policy))


def _raise_fd_limit(want: int = FD_LIMIT) -> None:
    """Raise the soft limit of open files towards ``want`` (within the hard limit): each login
    holds a PAM connection and each peer a mesh socket; 1024 is far too few for a storm."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run(cfg_path: Path) -> int:
    """Load the config, build the agent and serve; the exit code for __main__.

    Raises ConfigError (__main__ exits 78, EX_CONFIG, which systemd does not restart) when
    the file is refused or what it names cannot be used: this node's name, its keypair, the
    authorized keys directory, the backend's tree.
    """
    cfg = config_mod.load(cfg_path)
    _raise_fd_limit()
    set_scheduling(cfg.scheduling)  # before build(): the threads it starts inherit the policy
    try:
        agent = build(cfg, cfg_path=cfg_path)
    except (OSError, ValueError, BackendError) as exc:
        msg = f"{cfg_path}: {exc}"
        raise ConfigError(msg) from exc
    asyncio.run(serve(agent))
    # A worker thread stuck in a hung read (/proc of a D-state process, a wedged slurmstepd)
    # would keep the interpreter from exiting: the answered logins are done, so exit anyway.
    timer = threading.Timer(SHUTDOWN_STEP_S, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
    return 0
