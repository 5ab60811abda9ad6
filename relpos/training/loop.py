"""The training loop: compiled step calls, and hooks that run between them.

:class:`Trainer` owns only the loop: which steps run in one compiled call, when the
host syncs, and how much of the wall time was training. Everything else (logging,
checkpoints, evaluation during training) is a hook added with
:meth:`Trainer.add_hook`, run every ``every`` steps, at the end, or when a stop signal
arrived (levanter's ``TrainerHooks`` is the model). A compiled call never runs past a
step at which a hook is due, so several steps per call change no result.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from relpos.errors import RelposError
from relpos.training.feed import Direct, Prefetch, call_plan


class Preempted(Exception):
    """Training stopped by a signal after its checkpoint was written. ``resubmit``: the
    handler that was in place for the signal before training (submitit's requeue), for
    the caller to run once the run's files are closed; None if there was none."""

    def __init__(self, signum: int, step: int, resume_hint: str,
                 resubmit: Callable[[int], None] | None = None):
        self.signum, self.step, self.resubmit = signum, step, resubmit
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; "
                         f"{resume_hint}")


@dataclasses.dataclass
class TrainState:
    """The pure state between calls, plus the host's step counter and training time."""

    params: Any
    opt_state: Any
    guard: dict
    step: int = 0
    train_seconds: float = 0.0

    @property
    def arrays(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state, "guard": self.guard}


@dataclasses.dataclass
class StepInfo:
    """What a hook sees: the state after ``state.step`` steps and the last call's metrics
    (device arrays, ``[n]`` for an n-step call). A hook added with ``state=False`` runs
    while the next call computes: its ``state`` holds the step and the training seconds
    but no arrays (the next call owns them), and it reads the guard's counters from the
    metrics."""

    state: TrainState
    metrics: dict
    clock: Clock
    final: bool
    stopping: bool = False


@dataclasses.dataclass
class Hook:
    fn: Callable[[StepInfo], None]
    every: int  # 0: never periodically
    at_end: bool = True
    on_stop: bool = False  # also when a stop signal arrived (log, checkpoint)
    state: bool = True  # needs the state arrays: runs before the next call is dispatched

    def due(self, step: int, final: bool, stopping: bool) -> bool:
        return bool((self.every and step % self.every == 0) or (final and self.at_end)
                    or (stopping and self.on_stop))


class Clock:
    """Training time: wall time of step calls up to each host sync, less compilation
    (the dispatch time of a call with a new shape) and less the time hooks take while
    the device waits for them (hooks that need the state; the others run while the next
    call computes, and their time is the loop's)."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds  # cumulative, across resumes
        self.steady_seconds = 0.0  # this process
        self.steady_steps = 0
        self._since = time.perf_counter()
        self._pending_steps = 0

    def ran(self, steps: int, compile_seconds: float = 0.0) -> None:
        self._pending_steps += steps
        self._since += compile_seconds  # compiling is not training

    def sync(self, result, ahead: int = 0) -> None:
        """Wait for ``result`` and book the time since the last sync as training, for
        the steps dispatched so far less ``ahead`` (those of calls dispatched after the
        one that computes ``result``: they start now)."""
        jax.block_until_ready(result)
        now = time.perf_counter()
        dt = max(now - self._since, 0.0)
        self.seconds += dt
        self.steady_seconds += dt
        self.steady_steps += self._pending_steps - ahead
        self._pending_steps = ahead
        self._since = now

    def resume(self) -> None:
        """After the hooks: restart the training clock (hook time is not training)."""
        self._since = time.perf_counter()


# SIGUSR2: what SLURM sends ahead of a job's time limit when asked (``--signal``; submitit
# asks for it), and submitit's requeue signal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class _SignalFlag:
    """Turns SIGTERM/SIGINT/SIGUSR2 into a flag the loop checks between calls. The
    handlers in place before (submitit's requeue handler for SIGUSR2, when launched by
    it) are restored on exit and kept in ``previous``."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in STOP_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): leave as is
                pass
        return self

    @property
    def previous(self):
        return self._old.get(self.signum)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def chained_handler(handler) -> Callable[[int], None] | None:
    """A Python signal handler that was installed before the loop's (submitit's
    checkpoint-and-requeue handler) as ``fn(signum)``; None for the default or ignore
    dispositions and Python's own SIGINT handler."""
    if not callable(handler) or handler is signal.default_int_handler:
        return None
    return lambda signum: handler(signum, None)


class Trainer:
    """``step_fn(params, opt_state, guard, *inputs) -> (params, opt_state, guard,
    metrics)``, with ``inputs = batches(step, n)`` for a call of ``n`` steps from ``step``
    (``n`` up to ``steps_per_call``; ``n > 1`` needs a multi-step ``step_fn``): the batch
    (or window starts), the positions, the step index as a device scalar, and whatever
    else the step takes. ``batches`` must depend on ``(step, n)`` only: with
    ``prefetch`` > 0 it runs that many calls ahead in a background thread
    (:mod:`relpos.training.feed`).

    ``stop_agreement`` (multi-process runs): ``fn(signum or 0) -> device scalar``, the
    largest over the processes (nonzero on every process if any received a stop
    signal); it is dispatched after each call and read one call later, so that every
    process stops after the same step.
    """

    def __init__(self, step_fn, batches: Callable[[int, int], tuple], *, total_steps: int,
                 steps_per_call: int = 1, progress=None, prefetch: int = 2,
                 stop_agreement: Callable[[bool], Any] | None = None):
        self.step_fn, self.batches = step_fn, batches
        self.total_steps, self.steps_per_call = total_steps, steps_per_call
        self.hooks: list[Hook] = []
        self.progress = progress
        self.prefetch = prefetch
        self.stop_agreement = stop_agreement

    def add_hook(self, fn: Callable[[StepInfo], None], every: int = 0, *, at_end: bool = True,
                 on_stop: bool = False, state: bool = True) -> None:
        """``state=False``: ``fn`` reads only the metrics, the step and the clock, and runs
        while the next call computes (its metrics are fetched without stopping the
        device); otherwise it runs before the next call is dispatched."""
        self.hooks.append(Hook(fn, every, at_end, on_stop, state))

    def _next_stop(self, step: int) -> int:
        stops = [self.total_steps] + [(step // h.every + 1) * h.every
                                      for h in self.hooks if h.every]
        return min(stops)

    def plan(self, start: int):
        return call_plan(start, self.total_steps, self.steps_per_call, self._next_stop)

    def run(self, state: TrainState, *, stop_hint: str = "") -> TrainState:
        """Train from ``state.step`` to ``total_steps``; on SIGTERM/SIGINT/SIGUSR2 run the
        ``on_stop`` hooks (a checkpoint at the current step) and raise
        :class:`Preempted` (with ``stop_hint``)."""
        feed = (Prefetch if self.prefetch > 0 else Direct)(
            self.batches, self.plan(state.step), self.prefetch)
        try:
            with _SignalFlag() as sig:
                return self._run(state, feed, sig, stop_hint)
        finally:
            feed.close()

    def _run(self, state: TrainState, feed, sig: _SignalFlag, stop_hint: str) -> TrainState:
        clock = Clock(state.train_seconds)
        seen_shapes = set()
        lagged = None  # (hooks, info) of the previous call, run once the next is dispatched
        agreed = None  # the previous call's stop agreement (multi-process)
        for first, n in self.plan(state.step):
            inputs = feed.get(first, n)
            t0 = time.perf_counter()
            state.params, state.opt_state, state.guard, metrics = self.step_fn(
                state.params, state.opt_state, state.guard, *inputs)  # asynchronous
            shape = tuple(getattr(x, "shape", None) for x in jax.tree.leaves(inputs))
            clock.ran(n, time.perf_counter() - t0 if shape not in seen_shapes else 0.0)
            seen_shapes.add(shape)  # a new shape compiled now: not training
            state.step += n
            if self.progress is not None:
                self.progress.update(n)
            if lagged is not None:  # the previous call's log row, while this one computes
                hooks, info = lagged
                clock.sync(info.metrics, ahead=n)
                info.state.train_seconds = clock.seconds
                for h in hooks:
                    h.fn(info)
                lagged = None
            if self.stop_agreement is not None:  # the previous call's, read one call later
                signum = int(agreed) if agreed is not None else 0
                agreed = self.stop_agreement(sig.signum or 0)
            else:
                signum = sig.signum or 0
            stopping = signum > 0
            final = state.step >= self.total_steps
            due = [h for h in self.hooks if h.due(state.step, final, stopping)]
            if not due:
                continue
            if final or stopping or any(h.state for h in due):
                clock.sync(metrics)
                state.train_seconds = clock.seconds
                info = StepInfo(state, metrics, clock, final, stopping)
                for h in due:
                    h.fn(info)
                clock.resume()
            else:  # fetch the metrics without waiting; the hooks run after the next dispatch
                for x in jax.tree.leaves(metrics):
                    x.copy_to_host_async()
                snapshot = TrainState(None, None, None, state.step, state.train_seconds)
                lagged = (due, StepInfo(snapshot, metrics, clock, final, stopping))
            if stopping:
                raise Preempted(signum, state.step, stop_hint, chained_handler(sig.previous))
        return state


def check_guard(guard, policy: str, step: int) -> None:
    """Raise if the step's guard recorded a non-finite loss or gradient under ``error``
    (``guard``: the guard, or a call's metrics, which carry its counters)."""
    bad = _last(guard["bad_step"])
    if bad >= 0 and policy == "error":
        what = {1: "loss", 2: "grad_norm"}[_last(guard["bad_what"])]
        raise RelposError(
            f"non-finite {what} at step {bad + 1}; training stopped, the last good checkpoint "
            "is kept (lower optim.lr, or train.on_nonfinite=skip to skip such steps)")


def _last(x) -> int:
    """An integer counter's value: a scalar, or the last of an n-step call's ``[n]``."""
    return int(np.asarray(x).reshape(-1)[-1])


def tokens_per_second(tokens: int, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 and math.isfinite(seconds) else None
