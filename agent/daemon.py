"""The imperative shell: composition root, event loop, signals, sd_notify.

`build()` is the one place where the pieces are made and wired together (config -> netinfo,
backend, journal, mesh server and client, adopter, PAM server); tests call it with their own
``proc_root``, ``clock`` and config. `run()` owns the event loop: every task lives in one
TaskGroup; SIGHUP and SIGTERM become commands on a queue, handled on the loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from callerid.agent import __version__
from callerid.agent import config as config_mod
from callerid.agent.adoption import Adopter
from callerid.agent.backends.base import Backend
from callerid.agent.config import Config, ConfigError
from callerid.agent.handlers import PamServer
from callerid.agent.journal import Journal
from callerid.agent.netinfo import NetInfo
from callerid.bus.peers import PeerTable
from callerid.bus.protocol import CallerIdQuery, CallerIdReply
from callerid.bus.transport import KeyPair, MeshClient, MeshServer, PeerIdentity, load_keypair

__all__ = ["Agent", "build", "make_backend", "node_name", "run"]

log = logging.getLogger(__name__)

WORKER_THREADS = 8
SHUTDOWN_STEP_S = 3.0


def node_name(cfg: Config) -> str:
    return cfg.node_name or socket.gethostname().split(".")[0]


def make_backend(cfg: Config, proc_root: Path) -> Backend:
    if cfg.backend.type == "cgroup":
        from callerid.agent.backends.cgroup import CgroupBackend

        return CgroupBackend(cfg.backend.cgroup, proc_root=proc_root)
    from callerid.agent.backends.slurm import SlurmBackend  # type: ignore[import-not-found,unused-ignore]

    backend: Backend = SlurmBackend(cfg.backend.slurm, proc_root=proc_root)
    return backend


class LocalAddresses:
    """Is an IP one of this node's own addresses (so a source there is answered locally)?

    With specific listen addresses, those are this node's; with a wildcard, any address of an
    interface in this network namespace (refreshed lazily) and loopback are.
    """

    def __init__(self, listen: list[str], clock: Callable[[], float], ttl_s: float = 10.0) -> None:
        self.wildcard = any(ipaddress.ip_address(a).is_unspecified for a in listen)
        self.listen = frozenset(str(ipaddress.ip_address(a)) for a in listen)
        self.clock = clock
        self.ttl_s = ttl_s
        self._addrs: frozenset[str] = frozenset()
        self._at = -ttl_s

    def __call__(self, ip: str) -> bool:
        if not self.wildcard:
            return ip in self.listen
        if ipaddress.ip_address(ip).is_loopback:
            return True
        if self.clock() - self._at > self.ttl_s:
            self._addrs = frozenset(
                a.address.split("%")[0]
                for addrs in psutil.net_if_addrs().values()
                for a in addrs
                if a.family in (socket.AF_INET, socket.AF_INET6)
            )
            self._at = self.clock()
        return ip in self._addrs


@dataclass
class Agent:
    cfg: Config
    cfg_path: Path | None
    node: str
    journal: Journal
    backend: Backend
    adopter: Adopter
    pam: PamServer
    mesh: MeshServer
    client: MeshClient
    peers: PeerTable
    executor: ThreadPoolExecutor
    clock: Callable[[], float]
    commands: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    started: float = 0.0

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
                "waiting": len(self.pam.queued),
                "refused": self.pam.refused,
                "malformed": self.pam.malformed,
                "abandoned": self.pam.abandoned,
                "accept_errors": self.pam.accept_errors,
            },
            "journald": self.journal.journald_running,
        }

    def reload(self) -> None:
        """SIGHUP: re-read the config file and the keys; keep the old ones on error."""
        if self.cfg_path is not None:
            try:
                new = config_mod.load(self.cfg_path)
            except ConfigError as exc:
                log.error("reload refused, keeping the running config: %s", exc)
                self.journal.event("config_error", f"reload refused: {exc}", node=self.node)
                return
            for key in ("listen", "port", "pam_socket", "keys", "backend", "node_name"):
                if getattr(new, key) != getattr(self.cfg, key):
                    log.warning("reload: %s changed; it takes effect at the next restart", key)
            self.cfg = new
            self.adopter.cfg = new
        self.adopter.forget_users()  # exempt_groups, or the users' groups, may have changed
        self.peers = PeerTable.load(self.cfg.keys.authorized)
        self.client.peers = self.peers
        self.mesh.reload_keys(self.peers)
        self.journal.event(
            "reloaded", f"configuration and {len(self.peers)} peer keys reloaded", node=self.node
        )


def build(
    cfg: Config,
    *,
    cfg_path: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
    proc_root: Path = Path("/proc"),
) -> Agent:
    """The composition root: make every piece once and wire them together."""
    node = node_name(cfg)
    keypair: KeyPair = load_keypair(cfg.keys.dir, node)
    peers = PeerTable.load(cfg.keys.authorized)
    journal = Journal(cfg.journal)
    executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="callerid-io")
    backend = make_backend(cfg, proc_root)
    client = MeshClient(keypair, peers, cfg.peer, port=cfg.port, clock=clock)

    async def ask(host: str, query: CallerIdQuery) -> tuple[str, CallerIdReply | None]:
        """A destination's question to the source agent at ``host`` (the client's request id)."""
        query = CallerIdQuery(client.next_id(), query.proto, query.src, query.dst, query.uid)
        result = await client.query(host, query)
        reply = result.reply if isinstance(result.reply, CallerIdReply) else None
        return result.status, reply

    adopter = Adopter(
        cfg,
        node=node,
        netinfo=NetInfo(proc_root),
        backend=backend,
        ask_peer=ask,
        is_local=LocalAddresses(cfg.listen, clock),
        executor=executor,
        clock=clock,
    )

    async def on_query(query: CallerIdQuery, peer: PeerIdentity) -> CallerIdReply:
        return await adopter.answer(query, peer.node or peer.public_key[:8])

    mesh = MeshServer(
        keypair, on_query, peers=peers, addresses=cfg.listen, port=cfg.port, node=node
    )
    pam = PamServer(adopter, journal, timeout_s=cfg.pam_timeout_ms / 1000, clock=clock)
    agent = Agent(
        cfg, cfg_path, node, journal, backend, adopter, pam, mesh, client, peers, executor, clock
    )
    agent.started = clock()
    pam.status = agent.status
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
    agent.journal.event(
        "started",
        f"callerid-agent on {agent.node}: mesh {agent.mesh.endpoints}, PAM socket "
        f"{agent.cfg.pam_socket}, backend {agent.backend.name}",
        node=agent.node,
    )
    sd_notify("READY=1")
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(agent.mesh.serve())
            watchdog = tg.create_task(_watchdog())
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
            await _bounded(agent.mesh.close(), "closing the mesh server")
    finally:
        await _bounded(agent.client.close(), "closing the mesh client")
        agent.backend.close()
        agent.adopter.netinfo.close()
        agent.executor.shutdown(wait=False, cancel_futures=True)


async def _bounded(step: Awaitable[None], what: str) -> None:
    try:
        async with asyncio.timeout(SHUTDOWN_STEP_S):
            await step
    except TimeoutError:
        log.warning("%s took over %.0f s; going on with the shutdown", what, SHUTDOWN_STEP_S)


def run(cfg_path: Path) -> int:
    """Load the config, build the agent and serve; the exit code for __main__."""
    cfg = config_mod.load(cfg_path)
    agent = build(cfg, cfg_path=cfg_path)
    asyncio.run(serve(agent))
    # A worker thread stuck in a hung read (/proc of a D-state process, a wedged slurmstepd)
    # would keep the interpreter from exiting: the answered logins are done, so exit anyway.
    timer = threading.Timer(SHUTDOWN_STEP_S, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
    return 0
