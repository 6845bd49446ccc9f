"""Where a call runs: on the event loop, or in a worker thread when it may wait.

The agent decides logins on its event loop; only what may wait on another process goes to the
executor: an NSS look-up, and every call of a *blocking* backend (`Backend.blocking`: the slurm
backend's slurmstepd RPCs). A non-blocking backend (cgroupfs reads and writes) is called
inline: a thread hop costs more than its calls do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from callerid.agent.backends.base import Backend

__all__ = ["backend_call", "in_thread", "shielded_call"]

T = TypeVar("T")


async def in_thread(executor: Executor | None, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a worker thread of ``executor`` (None: the loop's default one)."""
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


async def backend_call(
    backend: Backend, executor: Executor | None, fn: Callable[..., T], *args: object
) -> T:
    """A call of ``backend``: inline when it never waits, else in a worker thread."""
    if backend.blocking:
        return await in_thread(executor, fn, *args)
    return fn(*args)


async def shielded_call(
    backend: Backend,
    executor: Executor | None,
    on_cancel: Callable[[], None],
    fn: Callable[..., T],
    *args: object,
) -> T:
    """`backend_call` for a login: if the login is cancelled while a worker thread runs the
    call, the thread is not (it cannot be), and ``on_cancel`` runs once it is done (what it
    fetched is dropped)."""
    if not backend.blocking:
        return fn(*args)
    task = asyncio.ensure_future(in_thread(executor, fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda _t: on_cancel())
        raise
