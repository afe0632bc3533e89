"""The work queue that `Engine` and `LoraEngine` share between their worker threads."""

from __future__ import annotations

import threading
from collections.abc import Callable


class WorkQueue:
    """Hands out the indexes of `count` items to worker threads, one at a time, until the items run out or a worker
    fails; keeps the first error, and calls `on_progress(bytes read, tensors finished)` from one thread at a time
    (a worker writing its outputs does not stall the others)."""

    def __init__(self, count: int, on_progress: Callable[[int, int], None] | None = None) -> None:
        self.count = count
        self.error: BaseException | None = None
        self._on_progress = on_progress
        self._lock = threading.Lock()  # the next item, and the first error
        self._progress_lock = threading.Lock()
        self._next = 0

    def take(self) -> int | None:
        """The next item's index, or None when there is none left or a worker failed."""
        with self._lock:
            if self.error is not None or self._next == self.count:
                return None
            self._next += 1
            return self._next - 1

    def fail(self, error: BaseException) -> None:
        """Record `error` unless one was recorded before; the other workers then stop at their next `take`."""
        with self._lock:
            if self.error is None:
                self.error = error

    def progress(self, nbytes: int, ntensors: int) -> None:
        if self._on_progress is not None:
            with self._progress_lock:
                self._on_progress(nbytes, ntensors)

    def raise_error(self) -> None:
        """Re-raise the first error any worker met, if any."""
        if self.error is not None:
            raise self.error
