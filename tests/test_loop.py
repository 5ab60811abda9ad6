"""The training loop with no per-step host work (issue 19.1): windows gathered on the
device from (seed, step) window starts equal the host sampler's bit for bit (so committed
runs replay), the prefetching feed hands the loop each call's inputs in plan order, log
rows run while the next call computes, and a run trains to the same state with the
windows gathered on the device or on the host."""

from __future__ import annotations

import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_equal, compose_train, loss_rows, restore_state

from relpos import data
from relpos import runs as train_lib
from relpos.errors import RelposError
from relpos.training.feed import Prefetch, call_plan
from relpos.training.loop import STOP_SIGNALS, Preempted, Trainer, TrainState
from relpos.training.step import gather_windows


def old_train_batch(tokens, *, seed, step, batch_size, length):
    """relpos.data.train_batch as committed before the device sampler (f730597): the
    sampler of every run in the repository."""
    n = tokens.shape[0] - length - 1
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, n + 1, size=batch_size)
    idx = starts[:, None] + np.arange(length + 1)[None, :]
    return np.asarray(tokens[idx], np.int32)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_device_windows_are_the_host_samplers_bit_for_bit(dtype):
    tokens = np.random.default_rng(0).integers(0, 50_000, 10_007).astype(dtype)
    corpus = jnp.asarray(tokens)
    gather = jax.jit(gather_windows, static_argnums=2)
    for seed, step, B, L in [(0, 0, 16, 128), (3, 17, 4, 64), (1, 599, 8, 10_006 - 1)]:
        starts = data.window_starts(tokens.size, seed=seed, step=step, batch_size=B, length=L)
        got = np.asarray(gather(corpus, jnp.asarray(starts, jnp.int32), L))
        want = old_train_batch(tokens, seed=seed, step=step, batch_size=B, length=L)
        assert got.dtype == np.int32 and got.shape == (B, L + 1)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(
            data.train_batch(tokens, seed=seed, step=step, batch_size=B, length=L), want)
    # n steps' starts [n, B] in one gather: each step's windows
    many = np.stack([data.window_starts(tokens.size, seed=2, step=s, batch_size=4, length=32)
                     for s in range(5, 8)])
    got = np.asarray(gather(corpus, jnp.asarray(many, jnp.int32), 32))
    for k, s in enumerate(range(5, 8)):
        np.testing.assert_array_equal(
            got[k], old_train_batch(tokens, seed=2, step=s, batch_size=4, length=32))


def test_call_inputs_on_device_give_the_host_batches():
    """The trainer's inputs with the split on the device gather exactly the windows of
    the host path, one step per call and stacked, with shared and randomized positions."""
    tokens = np.random.default_rng(1).integers(0, 257, 5_000).astype(np.uint16)
    for extra in ([], ["train.randomized_positions=64"]):
        cfg = compose_train(["train.length=16", "train.batch_size=4", *extra])
        for multi, (step, n) in ((False, (7, 1)), (True, (3, 4))):
            dev = train_lib.call_inputs(cfg, tokens, multi, None, on_device=True)(step, n)
            host = train_lib.call_inputs(cfg, tokens, multi, None, on_device=False)(step, n)
            starts, pos, step_arg, corpus = dev
            np.testing.assert_array_equal(np.asarray(gather_windows(corpus, starts, 16)),
                                          np.asarray(host[0]))
            np.testing.assert_array_equal(np.asarray(pos), np.asarray(host[1]))
            assert int(step_arg) == int(host[2]) == step
            ref = train_lib._batches(cfg, tokens, multi, lambda x, p: (x, p))(step, n)
            np.testing.assert_array_equal(np.asarray(host[0]), ref[0])
            np.testing.assert_array_equal(np.asarray(pos), np.asarray(ref[1]))


def test_prefetch_follows_the_plan_and_reraises():
    made = []

    def make(step, n):
        made.append((step, n))
        return (step * 10 + n,)

    plan = list(call_plan(3, 20, 4, lambda s: (s // 5 + 1) * 5))  # a hook every 5 steps
    assert plan == [(3, 2), (5, 4), (9, 1), (10, 4), (14, 1), (15, 4), (19, 1)]
    feed = Prefetch(make, plan, depth=2)
    assert [feed.get(s, n) for s, n in plan] == [(s * 10 + n,) for s, n in plan]
    feed.close()

    def broken(step, n):
        if step == 5:
            raise ValueError("bad batch")
        return (step,)

    feed = Prefetch(broken, plan, depth=2)
    assert feed.get(3, 2) == (3,)
    with pytest.raises(ValueError, match="bad batch"):
        feed.get(5, 4)
    feed.close()
    # closing early stops the producer, which never runs far ahead
    made.clear()
    feed = Prefetch(make, call_plan(0, 10**6, 1, lambda s: 10**6), depth=2)
    feed.get(0, 1)
    time.sleep(0.2)
    feed.close()
    assert len(made) <= 4
    assert not [t for t in threading.enumerate() if t.name == "relpos-prefetch"]


class _FakeStep:
    """A 'step' on scalars: params += tokens; records when each call was dispatched."""

    def __init__(self):
        self.calls = []

    def __call__(self, params, opt_state, guard, tokens, positions, step):
        self.calls.append(int(step))
        loss = jnp.float32(int(step))
        return params + tokens.sum(), opt_state, guard, {"loss": loss}


def test_log_rows_run_while_the_next_call_computes():
    """A hook with state=False at step s runs after the call from s was dispatched (and
    sees the metrics of the call that ended at s); hooks that need the state run before
    it; both see every due step once, and the result is the plain loop's."""
    events = []
    fake = _FakeStep()
    batches = lambda step, n: (jnp.full((2,), step, jnp.float32), None, jnp.int32(step))
    trainer = Trainer(fake, batches, total_steps=12, prefetch=2)
    trainer.add_hook(lambda i: events.append(("log", i.state.step, len(fake.calls),
                                              float(i.metrics["loss"]))), 3, state=False)
    trainer.add_hook(lambda i: events.append(("save", i.state.step, len(fake.calls),
                                              float(i.metrics["loss"]))), 6)
    state = trainer.run(TrainState(jnp.float32(0), None, {}, 0))
    assert float(state.params) == 2 * sum(range(12)) and state.step == 12
    # log at 3 and 9 after one more call; at 6 and 12 (a save is due) before it
    assert events == [("log", 3, 4, 2.0), ("log", 6, 6, 5.0), ("save", 6, 6, 5.0),
                      ("log", 9, 10, 8.0), ("log", 12, 12, 11.0), ("save", 12, 12, 11.0)]


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM])
def test_a_stop_signal_runs_the_stop_hooks_at_the_current_step(signum):
    """SIGUSR2 (SLURM's time-limit warning, submitit's requeue signal) and SIGTERM stop
    the loop after the call in flight: the stop hooks (the checkpoint) see that step,
    and the handler installed before the loop comes back as Preempted.resubmit."""
    assert signum in STOP_SIGNALS
    seen, chained = [], []
    old = signal.signal(signum, lambda s, f: chained.append(s))
    try:
        def batches(step, n):
            if step == 4:
                signal.raise_signal(signum)
            return jnp.full((2,), step, jnp.float32), None, jnp.int32(step)

        trainer = Trainer(_FakeStep(), batches, total_steps=100, prefetch=0)
        trainer.add_hook(lambda i: seen.append((i.state.step, i.stopping)), 50, on_stop=True)
        with pytest.raises(Preempted) as stop:
            trainer.run(TrainState(jnp.float32(0), None, {}, 0))
        assert stop.value.signum == signum and stop.value.step == 5 and seen == [(5, True)]
        stop.value.resubmit(signum)  # the caller hands over to the earlier handler
        assert chained == [signum]
        assert signal.getsignal(signum) is not None and not seen[1:]
    finally:
        signal.signal(signum, old)


def test_device_and_host_windows_train_to_the_same_state(ws):
    """train.loader=device (windows gathered in the step) against train.loader=host (the
    windows built on the host, as before): the same losses, lr rows and final state bit
    for bit; a stop-and-resume of the device path too."""
    base = ws.args + ["train.steps=12", "train.log_every=4", "train.checkpoint_every=8",
                      "eval.modes=[nonoverlap]", "train.steps_per_call=2"]
    out = {}
    for loader in ("device", "host"):
        out[loader] = train_lib.train(compose_train(base + [f"train.loader={loader}"]),
                                      ws.root / f"loader-{loader}")
    assert out["device"]["final_train_loss"] == out["host"]["final_train_loss"]
    a, b = loss_rows(ws.root / "loader-device"), loss_rows(ws.root / "loader-host")
    assert [(r["step"], r["loss"], r["lr"]) for r in a] == [(r["step"], r["loss"], r["lr"])
                                                           for r in b]
    assert_trees_equal(restore_state(ws.root / "loader-device", 12),
                       restore_state(ws.root / "loader-host", 12))


def test_loader_device_for_a_task_is_one_clear_error():
    cfg = compose_train(["task=copy", "train.loader=device"])
    with pytest.raises(RelposError, match="train.loader=device needs the corpus LM"):
        train_lib.check_train_config(cfg)
    with pytest.raises(RelposError, match="train.prefetch"):
        train_lib.check_train_config(compose_train(["train.prefetch=-1"]))
