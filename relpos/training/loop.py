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

from relpos.errors import RelposError


class Preempted(Exception):
    """Training stopped by a signal after its checkpoint was written."""

    def __init__(self, signum: int, step: int, resume_hint: str):
        self.signum, self.step = signum, step
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
    (device arrays, ``[n]`` for an n-step call)."""

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

    def due(self, step: int, final: bool, stopping: bool) -> bool:
        return bool((self.every and step % self.every == 0) or (final and self.at_end)
                    or (stopping and self.on_stop))


class Clock:
    """Training time: wall time of step calls up to each host sync, less compilation
    (the dispatch time of a call with a new shape) and less the time hooks take."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds  # cumulative, across resumes
        self.steady_seconds = 0.0  # this process
        self.steady_steps = 0
        self._since = time.perf_counter()
        self._pending_steps = 0

    def ran(self, steps: int, compile_seconds: float = 0.0) -> None:
        self._pending_steps += steps
        self._since += compile_seconds  # compiling is not training

    def sync(self, result) -> None:
        """Wait for ``result`` and book the time since the last sync as training."""
        jax.block_until_ready(result)
        now = time.perf_counter()
        dt = max(now - self._since, 0.0)
        self.seconds += dt
        self.steady_seconds += dt
        self.steady_steps += self._pending_steps
        self._pending_steps = 0
        self._since = now

    def resume(self) -> None:
        """After the hooks: restart the training clock (hook time is not training)."""
        self._since = time.perf_counter()


class _SignalFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between calls."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): leave as is
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Trainer:
    """``step_fn(params, opt_state, guard, tokens, positions, step) -> (params, opt_state,
    guard, metrics)``, called with ``batches(step, n)`` for ``n`` steps at a time (``n``
    up to ``steps_per_call``; ``n > 1`` needs a multi-step ``step_fn``)."""

    def __init__(self, step_fn, batches: Callable[[int, int], tuple], *, total_steps: int,
                 steps_per_call: int = 1, progress=None):
        self.step_fn, self.batches = step_fn, batches
        self.total_steps, self.steps_per_call = total_steps, steps_per_call
        self.hooks: list[Hook] = []
        self.progress = progress

    def add_hook(self, fn: Callable[[StepInfo], None], every: int = 0, *, at_end: bool = True,
                 on_stop: bool = False) -> None:
        self.hooks.append(Hook(fn, every, at_end, on_stop))

    def _next_stop(self, step: int) -> int:
        stops = [self.total_steps] + [(step // h.every + 1) * h.every
                                      for h in self.hooks if h.every]
        return min(stops)

    def run(self, state: TrainState, *, stop_hint: str = "") -> TrainState:
        """Train from ``state.step`` to ``total_steps``; on SIGTERM/SIGINT run the
        ``on_stop`` hooks and raise :class:`Preempted` (with ``stop_hint``)."""
        clock = Clock(state.train_seconds)
        seen_shapes = set()
        with _SignalFlag() as sig:
            while state.step < self.total_steps:
                n = min(self.steps_per_call, self._next_stop(state.step) - state.step)
                tokens, positions = self.batches(state.step, n)
                t0 = time.perf_counter()
                state.params, state.opt_state, state.guard, metrics = self.step_fn(
                    state.params, state.opt_state, state.guard, tokens, positions,
                    jax.numpy.int32(state.step))  # dispatch is asynchronous
                new_shape = tokens.shape not in seen_shapes  # compiled now: not training
                seen_shapes.add(tokens.shape)
                clock.ran(n, time.perf_counter() - t0 if new_shape else 0.0)
                state.step += n
                if self.progress is not None:
                    self.progress.update(n)
                final, stopping = state.step >= self.total_steps, sig.signum is not None
                due = [h for h in self.hooks if h.due(state.step, final, stopping)]
                if due:
                    clock.sync(metrics)
                    state.train_seconds = clock.seconds
                    info = StepInfo(state, metrics, clock, final, stopping)
                    for h in due:
                        h.fn(info)
                    clock.resume()
                if stopping:
                    raise Preempted(sig.signum, state.step, stop_hint)
        return state


def check_guard(guard, policy: str, step: int) -> None:
    """Raise if the step's guard recorded a non-finite loss or gradient under ``error``."""
    bad = int(guard["bad_step"])
    if bad >= 0 and policy == "error":
        what = {1: "loss", 2: "grad_norm"}[int(guard["bad_what"])]
        raise RelposError(
            f"non-finite {what} at step {bad + 1}; training stopped, the last good checkpoint "
            "is kept (lower optim.lr, or train.on_nonfinite=skip to skip such steps)")


def tokens_per_second(tokens: int, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 and math.isfinite(seconds) else None
