"""Who runs next: requests wait in a queue for a row of the batch, and work asked for from other threads (adapter
loads and unloads) waits for the gap between two steps, never a forward pass.

The engine thread asks `next_work` for what to do; it blocks until there is something: commands to run, requests to
admit (up to `max_batch` rows in all, none while `hold` is on), or rows still decoding (`busy`).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterator

from peftkit.serve.request import Generation, ServeError

__all__ = ["Scheduler"]


class Scheduler:
    """The waiting requests and the commands for the engine thread, under the engine's lock (`cv`).

    Args:
        cv: the engine's lock and condition (every change here notifies it).
        max_batch: rows decoded together at most.
        max_queue: requests waiting for a row at most; more are refused (429).
        stats: the engine's counters (requests, rejected).
    """

    def __init__(self, cv: threading.Condition, max_batch: int, max_queue: int,
                 stats: collections.Counter) -> None:
        self.cv = cv
        self.max_batch, self.max_queue = max_batch, max_queue
        self.stats = stats
        self.waiting: collections.deque[Generation] = collections.deque()
        self.accepting = True
        self.aborted = False
        self._commands: list[Callable[[], None]] = []
        self._held = 0

    def queue(self, gen: Generation, decoding: int) -> None:
        """Put `gen` in the queue (the caller holds `cv`); `decoding`: rows in the batch now.

        Raises:
            ServeError: shutting down (503), the queue is full (429).
        """
        if not self.accepting:
            raise ServeError("the server is shutting down", status=503, code="shutting_down")
        free_rows = self.max_batch - decoding
        if len(self.waiting) - free_rows >= self.max_queue:
            self.stats["rejected"] += 1
            raise ServeError(f"the server is busy ({decoding} requests decoding, {len(self.waiting)} waiting); "
                             "retry later", status=429, code="server_busy")
        self.waiting.append(gen)
        self.stats["requests"] += 1
        self.cv.notify_all()

    def command(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine thread before its next step."""
        with self.cv:
            self._commands.append(fn)
            self.cv.notify_all()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Admit no waiting request while inside (rows already decoding go on)."""
        with self.cv:
            self._held += 1
        try:
            yield
        finally:
            with self.cv:
                self._held -= 1
                self.cv.notify_all()

    def close(self) -> None:
        """Take no new requests."""
        with self.cv:
            self.accepting = False
            self.cv.notify_all()

    def abort(self) -> None:
        """Make the engine thread stop at its next `next_work`."""
        with self.cv:
            self.aborted = True
            self.cv.notify_all()

    def next_work(self, busy: Callable[[], bool], decoding: int) -> tuple[list[Callable[[], None]],
                                                                          list[Generation]] | None:
        """Wait for work: (commands to run, requests admitted), or None once aborted (the engine thread ends).

        `busy()` says whether the engine has work of its own (rows decoding, adapters to detach); `decoding`: rows in
        the batch now.
        """
        with self.cv:
            while not self.aborted and not self._commands and not busy() and (not self.waiting or self._held):
                self.cv.wait()
            if self.aborted:
                return None
            commands, self._commands = self._commands, []
            admitted = []
            while self.waiting and not self._held and decoding + len(admitted) < self.max_batch:
                admitted.append(self.waiting.popleft())
            return commands, admitted
