"""`Harness`: the context-manager shape the test harnesses share.

Entering calls `_start()`; if that fails part-way, `close()` undoes whatever was made before the
error goes on; leaving calls `close()`. A harness implements both (`close` must cope with a
half-made start).
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Harness:
    def _start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
