"""The flash kernel (relpos.nn.flash) in Pallas interpret mode against the dense path:
values and gradients (queries, keys, values, the scheme's parameters, a token bias) per
scheme, ragged and per-example positions, causality, refusals, and the LM end to end.

Shapes are small (interpret mode runs the kernels as XLA loops on CPU): blocks of 16-32,
a few blocks per axis, so padding, causal block skipping and Tq < Tk are all exercised.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from relpos import positions
from relpos.model import ModelConfig, TransformerLM
from relpos.nn import flash
from relpos.nn.attention import ScoreHooks, causal_attention, choose_impl, dense_attention
from relpos.positions import RelposConfigError

H, D = 2, 16
VALUE_TOL, GRAD_TOL = 1e-5, 1e-4
OPTIONS = {"offset": {"size": 48}, "t5": {"num_buckets": 8, "max_distance": 40}}


def run(fn, *args):
    """``jax.jit(fn)(*args)`` compiled by XLA:CPU at -O0: interpret-mode kernels are XLA
    loops whose compilation, not their run (milliseconds here), is this file's cost;
    -O0 halves it."""
    return jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})(*args)


def scheme_state(name: str, seed: int = 3, options=None):
    """A scheme with every parameter moved off its initialisation (tables start near 0)."""
    scheme = positions.build(name, num_heads=H, head_dim=D, rngs=nnx.Rngs(0),
                             **(OPTIONS.get(name, {}) if options is None else options))
    graphdef, state = nnx.split(scheme)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    leaves = [x + 0.3 * jax.random.normal(kk, x.shape, x.dtype) for x, kk in zip(leaves, keys)]
    return graphdef, jax.tree.unflatten(treedef, leaves)


def qkvw(b, tq, tk, seed=1):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, tq, H, D))
    k, v = (jax.random.normal(kk, (b, tk, H, D)) for kk in ks[1:3])
    return q, k, v, jax.random.normal(ks[3], (b, tq, H, D))


def ragged_positions(b, tk, seed=2):
    """Strictly increasing positions per example, starting past 0 with gaps (as a
    randomised-position or sliding-window run gives)."""
    steps = jax.random.randint(jax.random.key(seed), (b, tk), 1, 4)
    return 5 + jnp.cumsum(steps, axis=1)


def compare(name, *, b=1, tq=80, tk=80, ragged=False, inside=False, token_bias=False,
            block=32, window=0, options=None):
    """Max abs errors (values, every gradient) of flash against dense for one scheme."""
    graphdef, state = scheme_state(name, options=options)
    q, k, v, w = qkvw(b, tq, tk)
    k_pos = ragged_positions(b, tk) if ragged else jnp.arange(tk)
    q_pos = k_pos[..., tk - tq:]
    c = 0.5 * jax.random.normal(jax.random.key(7), (b, tk, H)) if token_bias else None

    def loss(state, q, k, v, c, impl):
        scheme = nnx.merge(graphdef, state)
        has_bias = callable(getattr(scheme, "bias", None))
        if impl == "dense":
            out = dense_attention(q, k, v, bias=scheme.bias if has_bias else None, q_pos=q_pos,
                                  k_pos=k_pos, scale=D ** -0.5, bias_inside_scale=inside,
                                  hooks=None if c is None else ScoreHooks(token_bias=c),
                                  window=window)
        else:
            out = flash.flash_attention(
                q, k, v, q_pos=q_pos, k_pos=k_pos, bias=flash.kernel_bias(scheme, H),
                token_bias=c, bias_inside_scale=inside, block_q=block, block_k=block,
                window=window)
        return (out * w).sum(), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    (_, ref), gref = run(lambda *a: grad(*a, "dense"), state, q, k, v, c)
    (_, got), ggot = run(lambda *a: grad(*a, "flash"), state, q, k, v, c)
    assert np.isfinite(np.asarray(got)).all()
    grads = {jax.tree_util.keystr(p): float(jnp.abs(a - r).max())
             for (p, a), r in zip(jax.tree_util.tree_leaves_with_path(ggot),
                                  jax.tree.leaves(gref))}
    scale = {jax.tree_util.keystr(p): float(jnp.abs(r).max())
             for p, r in jax.tree_util.tree_leaves_with_path(gref)}
    return float(jnp.abs(got - ref).max()), grads, scale


def check(errs):
    value, grads, scale = errs
    assert value <= VALUE_TOL, value
    bad = {k: (e, scale[k]) for k, e in grads.items() if e > GRAD_TOL * max(1.0, scale[k])}
    assert not bad, bad
    # the parameter gradients are there and not all zero where the scheme learns
    assert any(s > 0 for k, s in scale.items() if k.startswith("[0]")) or not any(
        k.startswith("[0]") for k in scale)


# Shared arange positions for most, ragged per-example positions with Tq < Tk for the
# rest, so each kernel path (shared / batched positions, Tq == Tk / Tq < Tk) is covered.
CASES = [
    ("none", {}),
    ("alibi", dict(ragged=True, b=2, tq=48)),
    # offsets beyond the table (clip), and an attention window (model.attention_window)
    ("offset", dict(ragged=True, b=2, tq=56, window=40)),
    ("t5", dict(token_bias=True, tq=48)),  # with the separable c_i - c_j (FoX's hook)
    ("kerple_power", dict(inside=True)),
    ("kerple_log", dict(ragged=True, b=2, tq=48)),
    ("sandwich", {}),
    ("fire", dict(ragged=True, b=2, tq=56)),  # query positions normalise the input
]


@pytest.mark.parametrize("name, kw", CASES, ids=[c[0] for c in CASES])
def test_flash_equals_dense(name, kw):
    check(compare(name, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["none", "alibi", "hard_alibi", "offset", "t5", "kerple_power",
                                  "kerple_log", "sandwich", "fire"])
@pytest.mark.parametrize("kw", [dict(b=2, tq=200, tk=256, ragged=True, block=64),
                                dict(tq=256, tk=256, inside=True, token_bias=True, block=64)])
def test_flash_equals_dense_longer(name, kw):
    check(compare(name, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["clip", "zero", "mask"])
def test_offset_policies_longer(policy):
    """Offsets beyond the table: its last entry, no bias, or masked (ragged positions)."""
    check(compare("offset", b=2, tq=200, tk=256, ragged=True, block=64,
                  options={"size": 64, "policy": policy}))


@pytest.mark.slow
def test_generic_route_equals_dense():
    """A scheme without an adapter: parameters split off, the module rebuilt in-kernel."""
    graphdef, state = scheme_state("t5")
    q, k, v, w = qkvw(1, 64, 64)
    pos = jnp.arange(64)

    def loss(state, impl):
        scheme = nnx.merge(graphdef, state)
        if impl == "dense":
            out = dense_attention(q, k, v, bias=scheme.bias, q_pos=pos, k_pos=pos, scale=0.25)
        else:
            out = flash.flash_attention(q, k, v, q_pos=pos, k_pos=pos, scale=0.25,
                                        bias=flash._generic(scheme, H), block_q=32, block_k=32)
        return (out * w).sum()

    g_ref, g = (run(lambda s, i=i: jax.grad(loss)(s, i), state) for i in ("dense", "flash"))
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, r, atol=GRAD_TOL)


def test_causal_and_blocks_skipped():
    """Changing keys/values at index t leaves every earlier query's output unchanged,
    and a query block never reads key blocks in its future (NaN there stays out)."""
    q, k, v, _ = qkvw(1, 96, 96)
    pos = jnp.arange(96)
    scheme = positions.build("alibi", num_heads=H, head_dim=D, rngs=nnx.Rngs(0))
    attend = jax.jit(lambda k, v: causal_attention(q, k, v, q_pos=pos, k_pos=pos,
                                                   bias=scheme.bias, impl="flash"))
    base = attend(k, v)
    t = 70
    poisoned = attend(k.at[:, t:].set(jnp.nan), v.at[:, t:].set(jnp.nan))
    np.testing.assert_array_equal(poisoned[:, :64], base[:, :64])  # query block 0 (64 rows)
    changed = attend(k.at[:, t].add(1.0), v.at[:, t].add(1.0))
    np.testing.assert_array_equal(changed[:, :t], base[:, :t])
    assert not np.allclose(changed[:, t:], base[:, t:])
    # backward: the dq of query block 0 reads key block 0 only
    dq = jax.jit(jax.grad(lambda q, k, v: causal_attention(
        q, k, v, q_pos=pos, k_pos=pos, bias=scheme.bias, impl="flash")[:, :64].sum()))
    poisoned = dq(q, k.at[:, t:].set(jnp.nan), v.at[:, t:].set(jnp.nan))
    np.testing.assert_array_equal(poisoned[:, :64], dq(q, k, v)[:, :64])


def test_memory_is_linear_in_length():
    """XLA's temp memory for values and gradients (FIRE: an MLP per (i, j) pair) at
    T = 4096 stays far below one [T, T] fp32 array (64 MiB; the dense path holds
    several per head)."""
    graphdef, state = scheme_state("fire")
    t = 4096
    q = k = v = jnp.ones((1, t, H, D))
    pos = jnp.arange(t)

    def loss(state, q, k, v):
        bias = flash.kernel_bias(nnx.merge(graphdef, state), H)
        return flash.flash_attention(q, k, v, q_pos=pos, k_pos=pos, bias=bias).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(state, q, k, v).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    assert compiled.memory_analysis().temp_size_in_bytes < t * t * 4 / 4


def test_kernels_lower_to_triton_for_gpu(monkeypatch):
    """Every kernel (forward, dk/dv, dq) of every adapted scheme goes through the Pallas
    Triton lowering and its Triton module verifies, on this CPU-only machine (lowering
    for the cuda platform, nothing compiled or run): no primitive without a Triton rule,
    no non-power-of-two tensor. bf16 at GPT-2 head size, one case with a token bias, an
    attention window and ragged positions."""
    from jax import export
    from jax._src.pallas.triton import lowering

    verified = []
    lower = lowering.lower_jaxpr_to_triton_module

    def checked(*args, **kwargs):
        result = lower(*args, **kwargs)
        assert result.module.operation.verify()
        verified.append(1)
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", checked)
    h, d, t = 4, 64, 192
    q = k = v = jnp.ones((2, t, h, d), jnp.bfloat16)
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    for name in ["none", "alibi", "hard_alibi", "offset", "t5", "kerple_power", "kerple_log",
                 "sandwich", "fire"]:
        scheme = None if name == "none" else positions.build(name, num_heads=h, head_dim=d,
                                                              rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(scheme) if scheme is not None else (None, None)
        extra = {}
        if name == "fire":
            extra = dict(token_bias=jnp.zeros((2, t, h)), window=100,
                         q_pos=jnp.arange(t)[None, 32:] * 2, k_pos=jnp.arange(t)[None] * 2)

        def loss(state, q, k, v, extra=extra, graphdef=graphdef):
            bias = None if state is None else flash.kernel_bias(nnx.merge(graphdef, state), h)
            kw = {"q_pos": jnp.arange(t), "k_pos": jnp.arange(t), **extra}
            q = q[:, -kw["q_pos"].shape[-1]:]
            return flash.flash_attention(q, k, v, bias=bias, interpret=False,
                                         **kw).astype(jnp.float32).sum()

        before = len(verified)
        export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), platforms=["cuda"],
                      disabled_checks=[triton])(state, q, k, v)
        assert len(verified) - before == 3, name  # forward, dk/dv, dq


def test_refuses_what_it_cannot_evaluate():
    cfg = ModelConfig(vocab_size=61, d_model=32, num_layers=1, num_heads=H, attn_impl="flash")
    for name, hook in [("cope", "modify_logits"), ("stickbreaking", "normalize"),
                       ("ssmax", "logit_scale"), ("dape", "modify_logits")]:
        with pytest.raises(RelposConfigError, match=f"cannot evaluate the {hook} hook of "
                           f"position scheme '{name}'; valid impls for it: dense or blockwise"):
            TransformerLM(cfg, name, rngs=nnx.Rngs(0))
    # and on a model built for another path, asked for flash at call time
    model = TransformerLM(ModelConfig(vocab_size=61, d_model=32, num_layers=1, num_heads=H),
                          "cope", rngs=nnx.Rngs(0))
    with pytest.raises(RelposConfigError, match="'cope'.*dense or blockwise"):
        model(jnp.zeros((1, 8), jnp.int32), impl="flash")
    q, k, v, _ = qkvw(1, 8, 8)
    with pytest.raises(ValueError, match="dense bias array needs impl dense, blockwise or cudnn"):
        causal_attention(q, k, v, q_pos=jnp.arange(8), k_pos=jnp.arange(8),
                         bias=jnp.zeros((H, 8, 8)), impl="flash")


def test_auto_never_picks_flash_on_cpu_and_says_why(caplog):
    flash.log_not_auto.cache_clear()
    with caplog.at_level(logging.INFO, logger="relpos.nn.flash"):
        for length in (64, 10_000):
            impl = choose_impl("auto", length=length, dtype=jnp.float32, dense_max_len=2048)
            assert impl in ("dense", "blockwise")
    msgs = [r.getMessage() for r in caplog.records if "flash not picked" in r.getMessage()]
    assert len(msgs) == 1 and "interpret mode" in msgs[0]
    assert choose_impl("flash", length=1, dtype=jnp.float32, dense_max_len=1) == "flash"


@pytest.mark.parametrize("scheme", ["kerple_log", pytest.param("fox", marks=pytest.mark.slow)])
def test_model_flash_equals_dense(scheme):
    """TransformerLM(tokens, positions, impl="flash") == impl="dense": logits and the
    gradient of every parameter (the scheme's included; FoX: the token bias's)."""
    cfg = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=H)
    model = TransformerLM(cfg, scheme, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    keys = jax.random.split(jax.random.key(4), len(jax.tree.leaves(state)))
    state = jax.tree.unflatten(jax.tree.structure(state), [
        x + 0.1 * jax.random.normal(kk, x.shape, x.dtype)
        for x, kk in zip(jax.tree.leaves(state), keys)])
    tokens = jax.random.randint(jax.random.key(5), (1, 72), 0, 61)
    pos = 3 + jnp.arange(72)

    def loss(state, impl):
        logits = nnx.merge(graphdef, state)(tokens, pos, impl=impl)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, ref), g_ref = run(lambda s: jax.value_and_grad(loss, has_aux=True)(s, "dense"), state)
    (_, got), g = run(lambda s: jax.value_and_grad(loss, has_aux=True)(s, "flash"), state)
    np.testing.assert_allclose(got, ref, atol=VALUE_TOL, rtol=0)
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, r, atol=GRAD_TOL, rtol=0)
    assert model.attention_impl(72, impl="flash") == "flash"
