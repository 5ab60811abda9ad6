"""Every registered scheme inside the LM: causality, jit == eager, blockwise == dense
at T = 1024 with blocks of 128 (which is also 32x the 'training length' below, so it
checks that every scheme stays finite there), bad sizes fail at construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import builtin_schemes

from relpos.layers import Linear
from relpos.model import ModelConfig, TransformerLM, count_params
from relpos.positions import RelposConfigError

TRAIN_LENGTH = 32
# Table-based schemes are sized to the training length, so T = 1024 exercises their
# out-of-range policy (clip) as in a real extrapolation run.
OPTIONS = {"offset": {"size": TRAIN_LENGTH}, "learned_abs": {"max_length": TRAIN_LENGTH}}
SCHEMES = builtin_schemes()  # an installed plug-in's scheme is not this suite's to test


def make(scheme, **cfg):
    cfg = ModelConfig(**{**dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4), **cfg})
    return TransformerLM(cfg, scheme, OPTIONS.get(scheme), rngs=nnx.Rngs(0))


def randomize_tables(model, seed=1, std=0.3):
    """Untrained tables start near zero; give every parameter visible values so the
    tests would notice a scheme that silently ignores its positions."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def tokens(b, t, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 61)


def test_contract_names():
    for name in ["none", "sinusoidal", "learned_abs", "offset", "t5", "alibi", "kerple_power",
                 "kerple_log", "sandwich", "fire", "rope", "xpos"]:
        assert name in SCHEMES


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_causality(scheme, impl):
    model = randomize_tables(make(scheme, block_size=16))
    x = tokens(1, 48)
    t = 29
    y = x.at[0, t].set((x[0, t] + 7) % 61)
    a, b = model(x, impl=impl), model(y, impl=impl)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_jit_equals_eager(scheme):
    model = randomize_tables(make(scheme))
    x = tokens(2, 40)
    eager = model(x)
    jitted = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_blockwise_equals_dense_at_32x(scheme):
    # CoPE's positions are sums of up to npos gates, summed in another order by each path
    # (fp32: ~3e-5 apart near the clamp), times q.e: its parameters are drawn at 0.1 as in
    # test_content_schemes' T = 1024 check (CoPE's embeddings start at zero).
    model = randomize_tables(make(scheme, block_size=128), std=0.1 if scheme == "cope" else 0.3)
    x = tokens(1, 32 * TRAIN_LENGTH)
    hidden = nnx.jit(lambda m, x, impl: m.hidden(x, impl=impl), static_argnums=2)
    dense = hidden(model, x, "dense")
    block = hidden(model, x, "blockwise")
    assert np.isfinite(np.asarray(dense)).all()
    np.testing.assert_allclose(block, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["offset", "t5", "alibi", "kerple_log", "fire"])
def test_per_layer_bias_modules(scheme):
    shared = make(scheme, share_position=True)
    per_layer = make(scheme, share_position=False)
    # layer 0 uses model.position; each further layer (here one) has its own copy
    assert len(shared.layer_positions) == 0 and len(per_layer.layer_positions) == 1
    if scheme == "alibi":  # fixed slopes: the copy holds no parameters
        assert count_params(per_layer.layer_positions) == 0
        assert count_params(per_layer) == count_params(shared)
    else:
        assert count_params(per_layer.layer_positions) > 0
        assert count_params(per_layer) > count_params(shared)
    x = tokens(1, 64)
    per_layer = randomize_tables(per_layer)
    np.testing.assert_allclose(per_layer(x, impl="blockwise"), per_layer(x, impl="dense"),
                               rtol=1e-5, atol=1e-5)


def test_learned_abs_error_policy_beyond_table():
    cfg = ModelConfig(vocab_size=61, d_model=32, num_layers=1, num_heads=4)
    model = TransformerLM(cfg, "learned_abs", {"max_length": 16, "policy": "error"},
                          rngs=nnx.Rngs(0))
    assert np.isfinite(model(tokens(1, 16))).all()
    with pytest.raises(RelposConfigError, match="max_length"):
        model(tokens(1, 17))


def test_bias_inside_scale_changes_output_only_for_bias_schemes():
    x = tokens(1, 20)
    for scheme, differs in [("alibi", True), ("rope", False)]:
        a = make(scheme, bias_inside_scale=False)(x)
        b = make(scheme, bias_inside_scale=True)(x)
        assert (not np.allclose(a, b)) == differs


def test_bf16_compute_runs_and_is_close():
    x = tokens(2, 24)
    a = make("alibi")(x)
    b = make("alibi", dtype="bfloat16")(x)
    assert b.dtype == jnp.float32  # logits in fp32
    np.testing.assert_allclose(b, a, atol=5e-2)  # bf16 matmuls: ~3 significant digits


@pytest.mark.parametrize("bad, match", [
    (dict(num_heads=5), "num_heads=5 must divide model.d_model=32"),
    (dict(d_model=0), "model.d_model must be an integer >= 1"),
    (dict(num_layers=-1), "model.num_layers must be an integer >= 1"),
    (dict(dtype="float16"), "model.dtype must be one of"),
    (dict(attn_impl="flashy"), "model.attn_impl must be one of"),
])
def test_bad_sizes_fail_at_construction(bad, match):
    with pytest.raises(RelposConfigError, match=match):
        make("alibi", **bad)


def test_bad_scheme_option_fails_at_construction():
    with pytest.raises(RelposConfigError, match="num_buckets"):
        TransformerLM(ModelConfig(), "t5", {"num_buckets": 1}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="available: .*alibi"):
        TransformerLM(ModelConfig(), "alibii", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("use_bias", [False, True])
def test_linear_flattens_without_changing_value_gradient_or_parameters(use_bias):
    """relpos's Linear (input flattened to [N, D] for XLA:CPU's sake) is nnx.Linear:
    same parameter names and shapes, and value and gradients equal a NumPy oracle."""
    ours = Linear(6, 5, use_bias=use_bias, rngs=nnx.Rngs(0),
                  bias_init=nnx.initializers.normal(1.0))
    ref = nnx.Linear(6, 5, use_bias=use_bias, rngs=nnx.Rngs(0),
                     bias_init=nnx.initializers.normal(1.0))
    ours_p, ref_p = nnx.state(ours, nnx.Param), nnx.state(ref, nnx.Param)
    assert jax.tree.structure(ours_p) == jax.tree.structure(ref_p)
    for a, b in zip(jax.tree.leaves(ours_p), jax.tree.leaves(ref_p)):
        np.testing.assert_array_equal(a, b)  # same names, shapes and initial values
    x = jax.random.normal(jax.random.key(1), (3, 4, 6))
    w = np.asarray(ours.kernel[...], np.float64)
    b = np.asarray(ours.bias[...], np.float64) if use_bias else 0.0
    want = np.einsum("btd,dn->btn", np.asarray(x, np.float64), w) + b
    np.testing.assert_allclose(ours(x), want, rtol=1e-5, atol=1e-5)
    # d/dW of sum(y * g) = sum over (b, t) of x^T g; d/dx = g W^T
    g = jax.random.normal(jax.random.key(2), (3, 4, 5))
    gd = np.asarray(g, np.float64)
    graphdef, params = nnx.split(ours, nnx.Param)
    dparams, dx = jax.grad(lambda p, x: (nnx.merge(graphdef, p)(x) * g).sum(),
                           argnums=(0, 1))(params, x)
    np.testing.assert_allclose(dparams["kernel"][...],
                               np.einsum("btd,btn->dn", np.asarray(x, np.float64), gd),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, np.einsum("btn,dn->btd", gd, w), rtol=1e-5, atol=1e-5)
    if use_bias:
        np.testing.assert_allclose(dparams["bias"][...], gd.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_linear_products_are_two_dimensional_for_any_input_rank():
    """The point of relpos's Linear: every dot_general of the forward and backward pass
    sees 2-D operands (XLA:CPU is slow on the 3-D weight gradient); 1-D to 4-D inputs
    keep their leading shape, and bf16 compute gives bf16 like nnx.Linear."""
    for dtype in (jnp.float32, jnp.bfloat16):
        lin = Linear(6, 5, dtype=dtype, rngs=nnx.Rngs(0))
        ref = nnx.Linear(6, 5, dtype=dtype, rngs=nnx.Rngs(0))
        for shape in [(6,), (4, 6), (3, 4, 6), (2, 3, 4, 6)]:
            x = jax.random.normal(jax.random.key(1), shape)
            y = lin(x)
            assert y.shape == shape[:-1] + (5,) and y.dtype == ref(x).dtype
            np.testing.assert_allclose(np.asarray(y, np.float32),
                                       np.asarray(ref(x), np.float32), rtol=1e-2 if
                                       dtype == jnp.bfloat16 else 1e-6, atol=1e-2)
    graphdef, params = nnx.split(Linear(6, 5, rngs=nnx.Rngs(0)), nnx.Param)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, x: nnx.merge(graphdef, p)(x).sum(),
                                    argnums=(0, 1)))(params, jnp.ones((3, 4, 6)))
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # forward, d/dx, d/dW
    assert all(v.aval.ndim == 2 for e in dots for v in e.invars), dots


@pytest.mark.parametrize("tie", [True, False])
def test_logits_equal_hidden_times_output_matrix(tie):
    cfg = ModelConfig(vocab_size=11, d_model=8, num_layers=1, num_heads=2, tie_embeddings=tie)
    model = TransformerLM(cfg, "alibi", rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(3), (2, 5, 8))
    out = (model.embed.embedding[...].T if tie else model.head.kernel[...])
    want = np.einsum("btd,dv->btv", np.asarray(h, np.float64), np.asarray(out, np.float64))
    got = model.logits(h)
    assert got.shape == (2, 5, 11) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# one scheme of each mechanism: embedding, rotation, bias, and every score hook, on both paths
WINDOW_CASES = ([(s, "blockwise") for s in ("sinusoidal", "alibi", "cope", "dape", "fox",
                                              "stickbreaking")]
                + [(s, "dense") for s in ("rope", "ssmax")])


@pytest.mark.parametrize("scheme,impl", WINDOW_CASES)
def test_attention_window_equals_the_truncated_context(scheme, impl):
    """``attention_window`` W: in a one-layer model the logits at query i equal those of
    the model run on its last W tokens alone, at their own positions (the oracle of a
    window), for every scheme: the hooks see the window in their mask, so CoPE counts
    and stick-breaking breaks sticks within it."""
    t, w = 24, 5
    model = randomize_tables(make(scheme, num_layers=1, block_size=8))
    windowed = randomize_tables(make(scheme, num_layers=1, block_size=8, attention_window=w))
    x = tokens(1, t)
    pos = jnp.arange(t, dtype=jnp.int32)
    got = np.asarray(windowed(x, pos, impl=impl))
    assert np.isfinite(got).all()
    for i in (0, 3, w - 1, w, 13, t - 1):
        lo = max(0, i - w + 1)
        want = np.asarray(model(x[:, lo:i + 1], pos[lo:i + 1], impl="dense"))[:, -1]
        np.testing.assert_allclose(got[:, i], want, rtol=2e-5, atol=2e-5, err_msg=f"i={i}")
