"""Behind `callerid.agent.metrics`: the threads that serve and write the metrics.

- `LoopCall`: a function of the event loop's state (the agent's counters) called from another
  thread: it runs on the loop's thread, and the caller waits at most `STATUS_WAIT_S`.
- `HttpEndpoint`: prometheus_client's WSGI app (text format, OpenMetrics and gzip by the
  scraper's Accept headers) on the standard library's threaded HTTP server, one thread per
  scrape. prometheus_client's own `start_http_server` returns nothing before 0.17 (Debian 12
  ships 0.16), so it could not be stopped; this one is, and it also bounds what a scraper can
  hold: at most `MAX_SCRAPES` connections at once (more are closed at once), each read or
  write at most `SCRAPE_IO_TIMEOUT_S`, and it never looks its own name up in DNS.
- `write_textfile`: the file for node_exporter's textfile collector, replaced atomically (a
  temporary file in the same directory, mode 0644 whatever the agent's umask, then rename).

Blocking calls only: the loop calls `HttpEndpoint.stop` and the file functions in a thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from socketserver import TCPServer, ThreadingMixIn
from typing import Any, Final, Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app

__all__ = [
    "MAX_SCRAPES",
    "SCRAPE_IO_TIMEOUT_S",
    "STATUS_WAIT_S",
    "HttpEndpoint",
    "LoopCall",
    "remove_textfile",
    "write_textfile",
]

log = logging.getLogger(__name__)

MAX_SCRAPES: Final = 4  # scrape connections served at once; more are closed at once
SCRAPE_IO_TIMEOUT_S: Final = 10.0  # each read or write on a scrape's connection
STATUS_WAIT_S: Final = 1.0  # how long a collection waits for the loop to hand its counters
POLL_S: Final = 0.5  # how often the server thread looks for a shutdown request
TEXTFILE_MODE: Final = 0o644  # node_exporter runs as another user; the agent's umask is 0077

T = TypeVar("T")


class LoopCall(Generic[T]):
    """``fn()`` run on the event loop's thread, whichever thread calls; None when the loop did
    not run it within ``timeout_s`` (stuck) or is closed. Made on the loop's thread."""

    def __init__(
        self,
        fn: Callable[[], T],
        loop: asyncio.AbstractEventLoop,
        timeout_s: float = STATUS_WAIT_S,
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.timeout_s = timeout_s
        self.thread = threading.get_ident()

    def __call__(self) -> T | None:
        if threading.get_ident() == self.thread:
            return self.fn()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(self.fn())
                except Exception as exc:
                    done.set_exception(exc)

        try:
            self.loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed: the agent is stopping
            return None
        try:
            return done.result(self.timeout_s)
        except TimeoutError:
            done.cancel()
            return None


class _Handler(WSGIRequestHandler):
    timeout = SCRAPE_IO_TIMEOUT_S  # socket timeout of each read and write

    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape on stderr."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper's thread never delays the agent's exit
    block_on_close = False  # nor the stop

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self.slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would ask DNS for this host's name (socket.getfqdn)
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # MAX_SCRAPES are being served: close this one
            return
        try:
            super().process_request(request, client_address)  # starts the scrape's thread
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics scrape from %s failed", client_address, exc_info=True)


class HttpEndpoint:
    """The scrape endpoint: bound when made (OSError if it cannot be), served once started."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.server = _Server((address, port), family)
        self.server.set_app(make_wsgi_app(registry))
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": POLL_S},
            name="callerid-metrics-http",
            daemon=True,
        )

    @property
    def address(self) -> str:
        """``host:port`` (``[host]:port`` for IPv6) actually bound."""
        host, port = self.server.server_address[:2]
        host = str(host)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (blocks up to ``POLL_S``: call it off the loop)."""
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


def write_textfile(path: Path, registry: CollectorRegistry) -> None:
    """Replace ``path`` with the registry's metrics in the text format, atomically: a reader
    sees the old file or the new one, never a part. The temporary file is in the same
    directory (rename is atomic only within a file system) and named ``.<name>.*.tmp``, which
    node_exporter's textfile collector (``*.prom`` only) skips."""
    data = generate_latest(registry)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), TEXTFILE_MODE)
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_textfile(path: Path) -> None:
    """Remove the file (a stopped agent leaves no numbers that look current)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("metrics: cannot remove %s: %s", path, exc.strerror or exc)
