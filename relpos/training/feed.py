"""The inputs of the training calls, prepared ahead of the loop in a background thread.

The trainer knows from the start which steps each compiled call will run (its call
plan: up to ``steps_per_call`` steps, never past a step at which a hook is due), and every
call's inputs are a function of its first step and its step count alone (the samplers
draw from ``(seed, step)``). So a thread can build and ``device_put`` the inputs of the
next ``depth`` calls while the device runs the current one (double buffering with
``depth=2``), and the loop's critical path holds no batch work: it takes the next call's
inputs, already on the device, and dispatches. Because the inputs depend on the steps
only, a resumed run (whose plan starts at the checkpoint's step) is fed the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator


class Prefetch:
    """``make(step, n)`` for every ``(step, n)`` of ``plan``, computed up to ``depth``
    calls ahead in a daemon thread; :meth:`get` returns them in order. An exception in
    ``make`` is raised by the :meth:`get` that would have returned its result."""

    _DONE = object()

    def __init__(self, make: Callable[[int, int], tuple], plan: Iterable[tuple[int, int]],
                 depth: int = 2):
        self._make, self._plan = make, iter(plan)
        self._q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relpos-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for step, n in self._plan:
                if self._stop.is_set() or not self._put((step, n, self._make(step, n))):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put((None, None, e))
            return
        self._put((None, None, self._DONE))

    def get(self, step: int, n: int) -> tuple:
        """The inputs of the call of ``n`` steps from ``step`` (the plan's next call)."""
        got_step, got_n, item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        if item is self._DONE or (got_step, got_n) != (step, n):
            raise RuntimeError(f"prefetched call {(got_step, got_n)} is not the call "
                               f"{(step, n)} the loop runs")  # a bug, not a user error
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


class Direct:
    """:class:`Prefetch`'s interface without the thread: ``make`` on demand."""

    def __init__(self, make: Callable[[int, int], tuple], plan=None, depth: int = 0):
        self._make = make

    def get(self, step: int, n: int) -> tuple:
        return self._make(step, n)

    def close(self) -> None:
        pass


def call_plan(start: int, total: int, per_call: int,
              next_stop: Callable[[int], int]) -> Iterator[tuple[int, int]]:
    """The trainer's calls ``(first step, steps)`` from ``start`` to ``total``: up to
    ``per_call`` steps each, none past ``next_stop(step)`` (the next step at which a hook
    is due)."""
    step = start
    while step < total:
        n = min(per_call, next_stop(step) - step)
        yield step, n
        step += n
