"""A bound on log lines that strangers can cause (the mesh server's and the PAM server's).

Anyone who can open a TCP connection to the mesh port can make the server refuse a CURVE
handshake, and each refusal is worth a line in the journal: but not a million of them.
`LogBudget` lets ``burst`` lines through per ``window_s`` seconds; what it holds back is
counted and said in one summary line ("N more ... since HH:MM:SS") once the window is over
(at the next event, or when the owner calls `summary` from a timer). Pure: no I/O, the time
comes from the clock passed in. `QuietLog` is a logger of one kind of line that keeps such a
budget, with the summary timer on the running loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["LogBudget", "QuietLog", "Verdict"]

DEFAULT_BURST: Final = 5
DEFAULT_WINDOW_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to log for one event: the event's own line (``log``) and, before it, the summary
    of the previous window's held-back events (``held``, held since ``since``; 0: none)."""

    log: bool
    held: int = 0
    since: float = 0.0


class LogBudget:
    """At most ``burst`` log lines per ``window_s``; the rest counted (see the module doc)."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        burst: int = DEFAULT_BURST,
        window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        self.clock = clock
        self.burst = burst
        self.window_s = window_s
        self._start = -window_s  # no window open yet
        self._used = 0
        self._held = 0
        self._held_since = 0.0
        self.suppressed = 0  # every line held back, ever

    def event(self) -> Verdict:
        """One event: may its line be logged, and is a summary due first?"""
        now = self.clock()
        held, since = 0, 0.0
        if now - self._start >= self.window_s:
            held, since = self._take_held()
            self._start, self._used = now, 0
        if self._used < self.burst:
            self._used += 1
            return Verdict(True, held, since)
        if self._held == 0:
            self._held_since = now
        self._held += 1
        self.suppressed += 1
        return Verdict(False, held, since)

    def summary(self) -> tuple[int, float]:
        """(events held back, since when) once their window is over, and forget them; (0, 0.0)
        while the window lasts or when nothing was held back."""
        if self._held and self.clock() - self._start >= self.window_s:
            return self._take_held()
        return 0, 0.0

    @property
    def pending(self) -> int:
        """Events held back and not yet summarised."""
        return self._held

    def _take_held(self) -> tuple[int, float]:
        held, since = self._held, self._held_since
        self._held = 0
        return held, since


class QuietLog:
    """One kind of log line that strangers can cause, within a `LogBudget`.

    ``quiet(fmt, *args)`` logs the line while the budget allows (returns True) and otherwise
    counts it; what was held back is said in one line, "N more <what> in the last S s", at
    the next line after the window or from a timer on the running loop (so it is said even
    when the flood stops). `close()` cancels the timer.
    """

    def __init__(self, logger: logging.Logger, level: int, what: str, budget: LogBudget) -> None:
        self.logger = logger
        self.level = level
        self.what = what
        self.budget = budget
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, fmt: str, *args: object) -> bool:
        verdict = self.budget.event()
        if verdict.held:
            self._log_held(verdict.held, verdict.since)
        if verdict.log:
            self.logger.log(self.level, fmt, *args)
            return True
        self._summary_later()
        return False

    def _summary_later(self) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: said at the next line instead
            return
        self._timer = loop.call_later(self.budget.window_s, self._summary_due)

    def _summary_due(self) -> None:
        self._timer = None
        held, since = self.budget.summary()
        if held:
            self._log_held(held, since)
        elif self.budget.pending:
            self._summary_later()

    def _log_held(self, held: int, since: float) -> None:
        self.logger.log(
            self.level, "%d more %s in the last %.0f s (not logged one by one)",
            held, self.what, self.budget.clock() - since,
        )  # fmt: skip

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
