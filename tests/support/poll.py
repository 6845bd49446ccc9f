"""Deadline polling for tests: wait for a condition instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.01,
    what: str = "condition",
) -> T:
    """Call ``predicate`` until it returns a truthy value; return that value.

    Raises AssertionError naming ``what`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            msg = f"timed out after {timeout:.1f}s waiting for {what} (last value: {value!r})"
            raise AssertionError(msg)
        time.sleep(interval)


async def async_wait_for(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.01,
    what: str = "condition",
) -> T:
    """`wait_for` for coroutines: yields to the event loop between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            msg = f"timed out after {timeout:.1f}s waiting for {what} (last value: {value!r})"
            raise AssertionError(msg)
        await asyncio.sleep(interval)
