"""Several training steps per compiled call (``train.steps_per_call``): a ``lax.scan``
over the step must give what the same steps one call each give — parameters, optimiser
state, metrics and the non-finite guard (which records the global step index)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import compose_train

from relpos.config import OptimSection
from relpos.errors import RelposError
from relpos.model import ModelConfig, TransformerLM
from relpos.runs import check_train_config, default_label, steps_per_call
from relpos.training.step import (
    fresh_guard,
    lm_loss,
    make_optimizer,
    make_train_step,
    position_mask,
)

B, T, N = 4, 16, 5


def fresh(scheme: str):
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2)
    model = TransformerLM(cfg, scheme, rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = make_optimizer(OptimSection(warmup_steps=0), 20, params)
    return graphdef, tx, (params, tx.init(params), fresh_guard())


def one_at_a_time(graphdef, tx, state, tokens, positions, step0):
    step = make_train_step(graphdef, tx)
    metrics = []
    for i in range(tokens.shape[0]):
        pos = positions[i] if positions.ndim == 3 else positions
        *state, m = step(*state, tokens[i], pos, jnp.int32(step0 + i))
        metrics.append(m)
    return state, jax.tree.map(lambda *xs: np.stack(xs), *metrics)


def assert_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("scheme,per_step_positions", [("t5", False), ("alibi", True)])
def test_scan_of_steps_equals_steps_one_call_each(scheme, per_step_positions):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (N, B, T + 1)), jnp.int32)
    if per_step_positions:  # randomized positions: each step its own [B, T]
        positions = jnp.asarray(np.sort(rng.choice(200, (N, B, T)), axis=-1), jnp.int32)
    else:
        positions = jnp.arange(T, dtype=jnp.int32)
    graphdef, tx, state = fresh(scheme)
    ref_state, ref_m = one_at_a_time(graphdef, tx, state, tokens, positions, 3)
    _, _, state = fresh(scheme)  # the state above was donated
    *got_state, got_m = make_train_step(graphdef, tx, multi=True)(*state, tokens, positions,
                                                                  jnp.int32(3))
    assert got_m["loss"].shape == (N,)
    # The scan body and the single step are compiled separately, so they may differ by
    # fp32 rounding. Measured on XLA:CPU (jax 0.10.2): no difference at all, for both
    # cases: loss, grad_norm, parameters and AdamW state bitwise equal (max relative
    # difference 0). 1e-5, as for the loss, leaves room for another backend's fusion
    # order (not measured on a GPU).
    np.testing.assert_allclose(got_m["loss"], ref_m["loss"], rtol=1e-5)
    np.testing.assert_allclose(got_m["grad_norm"], ref_m["grad_norm"], rtol=1e-5)
    assert_close(got_state[:2], ref_state[:2], rtol=1e-5)
    # the parameters moved: the comparison is not between two untouched states
    init = fresh(scheme)[2][0]
    moved = max(float(jnp.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(got_state[0]), jax.tree.leaves(init)))
    assert moved > 1e-3


def test_guard_records_the_global_step_inside_a_call():
    """A non-finite loss at the third step of a call that starts at step 10 is step 12;
    its update is dropped and the other steps still train."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 64, (N, B, T + 1)).astype(np.int32)
    tokens[2, 0, 5] = 10_000  # out of the vocabulary: a NaN embedding (and target) there
    graphdef, tx, state = fresh("alibi")
    params0 = jax.tree.map(np.asarray, state[0])
    step = make_train_step(graphdef, tx, multi=True)
    params, opt, guard, m = step(*state, jnp.asarray(tokens), jnp.arange(T, dtype=jnp.int32),
                                 jnp.int32(10))
    loss = np.asarray(m["loss"])
    assert np.isfinite(loss[[0, 1, 3, 4]]).all() and not np.isfinite(loss[2])
    assert int(guard["bad_step"]) == 12 and int(guard["bad_what"]) == 1
    assert int(guard["skipped"]) == 1
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    assert all(np.isfinite(x).all() for x in leaves)  # the bad update never landed
    assert max(float(np.abs(a - b).max()) for a, b in zip(leaves, jax.tree.leaves(params0))) > 1e-3


def test_steps_per_call_must_divide_the_host_intervals():
    cfg = compose_train(["train.steps_per_call=8", "train.log_every=50",
                         "train.checkpoint_every=200"])
    with pytest.raises(RelposError, match=r"steps_per_call=8 must divide train.log_every=50; "
                                          r"choose one of 2, 5, 10, 25, 50, or null \(auto\)"):
        check_train_config(cfg)
    check_train_config(compose_train(["train.steps_per_call=10", "train.log_every=50",
                                      "train.checkpoint_every=200"]))
    with pytest.raises(RelposError, match="train.steps_per_call"):
        check_train_config(compose_train(["train.steps_per_call=0"]))
    with pytest.raises(RelposError, match="train.eval_every must be an integer >= 0"):
        check_train_config(compose_train(["train.eval_every=-50"]))


@pytest.mark.parametrize("log,ckpt,ev,expected", [
    (50, 200, 0, 25), (4, 10, 0, 2), (4, 8, 0, 4), (7, 200, 0, 1), (50, 200, 30, 10),
    (100, 400, 25, 25), (100, 400, 15, 5), (40, 200, 0, 20)])
def test_auto_steps_per_call_divides_every_host_interval(log, ckpt, ev, expected):
    cfg = compose_train([f"train.log_every={log}", f"train.checkpoint_every={ckpt}",
                         f"train.eval_every={ev}"])
    assert cfg.train.steps_per_call is None  # the default is auto
    check_train_config(cfg)
    assert steps_per_call(cfg.train) == expected
    assert steps_per_call(cfg.train, backend="gpu") == 1  # slower in the trainer on an H100


@pytest.mark.parametrize("scheme,share", [("t5", True), ("fire", False)])
def test_position_lr_scale_scales_only_the_position_schemes_updates(scheme, share):
    """optim.position_lr_scale=k: after one AdamW step the position parameters (T5 table,
    shared; FIRE MLP, one per layer) moved exactly k times as far as with k=1, every other
    parameter the same distance."""
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=2, share_position=share)
    model = TransformerLM(cfg, scheme, rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, cfg.vocab_size)
    grads = jax.jit(jax.grad(lambda p: lm_loss(nnx.merge(graphdef, p), tokens,
                                               jnp.arange(16))))(params)
    mask = position_mask(params)
    owners = {jax.tree_util.keystr(path[:1]) for path, m in
              jax.tree_util.tree_leaves_with_path(mask) if m}
    assert owners == ({"['position']"} if share else {"['position']", "['layer_positions']"})
    moved = {}
    for k in (1.0, 10.0):
        tx, _ = make_optimizer(OptimSection(warmup_steps=0, position_lr_scale=k), 10, params)
        moved[k], _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(moved[1.0]),
                       jax.tree.leaves(moved[10.0])):
        np.testing.assert_allclose(b, (10.0 if m else 1.0) * np.asarray(a), rtol=1e-6)
        assert np.abs(np.asarray(a)).max() > 0


def test_default_label_names_a_position_lr_other_than_the_schemes_default():
    assert default_label("alibi", OptimSection()) == "alibi"
    assert default_label("t5", OptimSection(position_lr_scale=10.0)) == "t5"
    assert default_label("t5", OptimSection(position_lr_scale=1.0)) == "t5 (position lr x1)"
    assert default_label("fire", OptimSection(position_lr_scale=0.5)) == "fire (position lr x0.5)"


@pytest.mark.parametrize("bias,length,lr_scale,max_distance", [
    ("offset", 64, 10.0, None), ("t5", 64, 10.0, 32), ("t5", 32, 10.0, 17), ("t5", 256, 10.0, 128),
    ("alibi", 64, 1.0, None), ("learned_abs", 64, 1.0, None), ("fire", 64, 1.0, None)])
def test_measured_defaults_position_lr_and_t5_max_distance(bias, length, lr_scale, max_distance):
    """The YAML defaults chosen from measurements (configs/optim/adamw.yaml,
    configs/bias/t5.yaml), and a user's override winning over them."""
    cfg = compose_train([f"bias={bias}", f"train.length={length}"])
    assert cfg.optim.position_lr_scale == lr_scale
    if max_distance is not None:
        assert cfg.bias.max_distance == max_distance
    cfg = compose_train([f"bias={bias}", "optim.position_lr_scale=3"])
    assert cfg.optim.position_lr_scale == 3.0
