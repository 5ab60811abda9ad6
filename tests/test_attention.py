"""Attention paths against a NumPy oracle and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import relpos.nn.attention as A
from relpos.model import ModelConfig, TransformerLM
from relpos.nn.attention import (
    add_batch_shared,
    bias_grad_matches,
    blockwise_attention,
    causal_attention,
    choose_impl,
    cudnn_attention,
    dense_attention,
)


def naive_attention(q, k, v, bias, scale, inside):
    """Double loop over (query, key), float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                s = np.array([q[bi, i, hi] @ k[bi, j, hi] for j in range(i + 1)])
                bb = bias[hi, i, : i + 1] if bias is not None else 0.0
                s = (s + bb) * scale if inside else s * scale + bb
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, hi] = p @ v[bi, : i + 1, hi]
    return out


def rand_qkv(b=2, t=37, h=3, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(kk, (b, t, h, d), jnp.float32) for kk in ks]


@pytest.mark.parametrize("inside", [False, True])
def test_dense_and_blockwise_match_naive(inside):
    q, k, v = rand_qkv()
    t = q.shape[1]
    bias = np.random.default_rng(0).normal(size=(3, t, t)).astype(np.float32)
    pos = jnp.arange(t)
    want = naive_attention(q, k, v, bias, 0.3, inside)
    kw = dict(bias=jnp.asarray(bias), q_pos=pos, k_pos=pos, scale=0.3, bias_inside_scale=inside)
    np.testing.assert_allclose(dense_attention(q, k, v, **kw), want, rtol=1e-5, atol=1e-5)
    got = blockwise_attention(q, k, v, block_q=8, block_k=16, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,query_block,max_blocks", [(37, 8, 8), (37, 5, 3), (64, 16, 8)])
def test_dense_query_blocks_match_naive(t, query_block, max_blocks):
    """Causal query blocks (uneven last block included) == the float64 double loop."""
    q, k, v = rand_qkv(t=t)
    bias = np.random.default_rng(1).normal(size=(3, t, t)).astype(np.float32)
    pos = jnp.arange(t)
    got = dense_attention(q, k, v, bias=jnp.asarray(bias), q_pos=pos, k_pos=pos, scale=0.3,
                          query_block=query_block, max_query_blocks=max_blocks)
    np.testing.assert_allclose(got, naive_attention(q, k, v, bias, 0.3, False),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_row", [False, True])
def test_dense_query_blocks_offset_positions_and_gradients(per_row):
    """Tq < Tk, shared ([H, Tq, Tk] bias, batch-shared add) or per-row ([B, H, Tq, Tk])
    positions, a learned bias: blocked == one block, values and gradients of q, k, v and
    the bias table."""
    q, k, v = rand_qkv(t=45)
    q = q[:, 13:]  # queries continue a prefix of 13 keys
    pos = jnp.stack([jnp.arange(45), jnp.arange(45) * 2 + 5]) if per_row else jnp.arange(45)
    table = jax.random.normal(jax.random.key(7), (3, 128)) * 0.5

    def run(q, k, v, table, **kw):
        fn = lambda qp, kp: table[:, jnp.clip(qp[:, None] - kp[None, :], 0, 127)]
        out = dense_attention(q, k, v, bias=fn, q_pos=pos[..., 13:], k_pos=pos, scale=0.3,
                              **kw)
        return (out ** 2).sum(), out

    grad = jax.grad(run, argnums=(0, 1, 2, 3), has_aux=True)
    (g1, o1), (g4, o4) = (grad(q, k, v, table, query_block=1, max_query_blocks=m)
                          for m in (1, 4))
    np.testing.assert_allclose(o4, o1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g4, g1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("b_shape", [(3, 4, 6), (1, 4, 6)])
def test_add_batch_shared_matches_broadcast_add(b_shape):
    """Value, reverse- and forward-mode derivatives equal those of ``x + b``."""
    x = jax.random.normal(jax.random.key(0), (5, 3, 4, 6))
    b = jax.random.normal(jax.random.key(1), b_shape)
    w = jax.random.normal(jax.random.key(2), (5, 3, 4, 6))
    plain = lambda x, b: x + b
    loss = lambda add: lambda x, b: (jnp.tanh(add(x, b)) * w).sum()
    np.testing.assert_array_equal(add_batch_shared(x, b), x + b)
    for got, want in zip(jax.grad(loss(add_batch_shared), (0, 1))(x, b),
                         jax.grad(loss(plain), (0, 1))(x, b)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    tangents = (w, jnp.ones(b_shape))
    _, got = jax.jvp(add_batch_shared, (x, b), tangents)
    _, want = jax.jvp(plain, (x, b), tangents)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="x.ndim - 1"):
        add_batch_shared(x, b[0])


def test_blockwise_callable_bias_and_batched_positions():
    q, k, v = rand_qkv(t=50)
    pos = jnp.stack([jnp.arange(50), jnp.arange(50) * 3 + 7])  # [B, T], per-row positions
    def bias_fn(qp, kp):
        return -0.1 * jnp.abs(qp[:, None] - kp[None, :]).astype(jnp.float32)[None].repeat(3, 0)

    kw = dict(bias=bias_fn, q_pos=pos, k_pos=pos, scale=0.35)
    dense = dense_attention(q, k, v, **kw)
    block = blockwise_attention(q, k, v, block_q=16, block_k=16, **kw)
    np.testing.assert_allclose(block, dense, rtol=1e-5, atol=1e-6)
    for row in range(2):
        b = np.asarray(bias_fn(pos[row], pos[row]))
        want = naive_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], b, 0.35, False)
        np.testing.assert_allclose(dense[row:row + 1], want, rtol=1e-5, atol=1e-5)


def test_softmax_shift_invariance():
    """Adding a per-query constant to every score leaves the output unchanged."""
    q, k, v = rand_qkv(t=40)
    pos = jnp.arange(40)
    shift = jax.random.normal(jax.random.key(3), (3, 40, 1)) * 10.0
    base = jnp.zeros((3, 40, 40))
    a = dense_attention(q, k, v, bias=base, q_pos=pos, k_pos=pos, scale=0.3)
    b = dense_attention(q, k, v, bias=base + shift, q_pos=pos, k_pos=pos, scale=0.3)
    c = blockwise_attention(q, k, v, bias=base + shift, q_pos=pos, k_pos=pos, scale=0.3,
                            block_q=8, block_k=8)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


def test_blockwise_gradient_matches_dense():
    q, k, v = rand_qkv(t=33)
    pos = jnp.arange(33)
    bias = jax.random.normal(jax.random.key(5), (3, 33, 33))
    f = lambda fn, **kw: jax.grad(lambda q, b: (fn(q, k, v, bias=b, q_pos=pos, k_pos=pos,
                                                    scale=0.3, **kw) ** 2).sum(), (0, 1))(q, bias)
    gd = f(dense_attention)
    gb = f(blockwise_attention, block_q=8, block_k=8)
    for x, y in zip(gd, gb):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_queries_aligned_to_last_keys():
    """Tq < Tk: query r sits at key index Tk - Tq + r (continuation of a prefix)."""
    q, k, v = rand_qkv(t=24)
    pos = jnp.arange(24)
    full = dense_attention(q, k, v, bias=None, q_pos=pos, k_pos=pos, scale=0.3)
    part = blockwise_attention(q[:, 16:], k, v, bias=None, q_pos=pos[16:], k_pos=pos,
                               scale=0.3, block_q=4, block_k=8)
    np.testing.assert_allclose(part, full[:, 16:], rtol=1e-5, atol=1e-6)


def test_choose_impl():
    assert choose_impl("auto", length=128, dtype=jnp.float32, dense_max_len=256) == "dense"
    assert choose_impl("auto", length=512, dtype=jnp.float32, dense_max_len=256) == "blockwise"
    assert choose_impl("dense", length=10**6, dtype=jnp.float32, dense_max_len=1) == "dense"
    with pytest.raises(ValueError, match="one of auto, dense, blockwise, cudnn, flash"):
        choose_impl("flashy", length=1, dtype=jnp.float32, dense_max_len=1)


def test_auto_sends_learned_biases_to_cudnn_only_if_its_gradient_checks_out(monkeypatch):
    """On a GPU in bf16, auto picks cuDNN for a learned bias only when the bias-gradient
    check passes for that bias layout (shared or per example)."""
    monkeypatch.setattr(A.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(A, "cudnn_bias_grad_ok", lambda batched, head_dim: not batched)
    kw = dict(length=512, dtype=jnp.bfloat16, dense_max_len=2048)
    assert choose_impl("auto", learned_bias=False, **kw) == "cudnn"
    assert choose_impl("auto", learned_bias=False, batched_bias=True, **kw) == "cudnn"
    assert choose_impl("auto", learned_bias=True, **kw) == "cudnn"
    assert choose_impl("auto", learned_bias=True, batched_bias=True, **kw) == "dense"
    assert choose_impl("auto", learned_bias=False, length=512, dtype=jnp.float32,
                       dense_max_len=2048) == "dense"
    assert choose_impl("cudnn", learned_bias=True, batched_bias=True, **kw) == "cudnn"


@pytest.fixture
def on_fake_gpu(monkeypatch):
    """A GPU backend whose cuDNN path is the dense path, recording what auto asks the
    bias-gradient check (``asked``) and which calls took cuDNN (``taken``); the check
    answers ``answer(batched)``."""
    rec = {"asked": [], "taken": [], "answer": lambda batched: batched}
    monkeypatch.setattr(A.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(A, "cudnn_bias_grad_ok", lambda batched, head_dim: rec["asked"].append(
        (batched, head_dim)) or rec["answer"](batched))

    def cudnn_stand_in(q, k, v, **kw):
        rec["taken"].append("cudnn")
        return A.dense_attention(q, k, v, **kw)

    monkeypatch.setattr(A, "cudnn_attention", cudnn_stand_in)
    return rec


def test_model_asks_the_check_for_its_bias_layout_and_head_size(on_fake_gpu):
    """The model resolves auto per forward: shared positions ([T]) ask about a shared
    bias, per-example positions ([B, T], randomized positions) about per-example ones,
    at the model's head size; a failed check sends the learned bias to dense."""
    asked, taken = on_fake_gpu["asked"], on_fake_gpu["taken"]
    cfg = ModelConfig(d_model=32, num_layers=1, num_heads=2, dtype="bfloat16")
    model = TransformerLM(cfg, "t5", rngs=nnx.Rngs(params=0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    model(tokens, jnp.arange(8))
    assert asked == [(False, 16)] and taken == []
    model(tokens, jnp.arange(16).reshape(2, 8))
    assert asked[-1] == (True, 16) and taken == ["cudnn"]
    assert model.attention_impl(8, batched=True) == "cudnn"
    assert model.attention_impl(8) == "dense"


def test_direct_auto_caller_with_a_bias_runs_the_gradient_check(on_fake_gpu):
    """causal_attention(impl="auto") called directly, not through TransformerLM, treats
    any bias as learned: cuDNN only where its bias gradient checked out."""
    asked, taken = on_fake_gpu["asked"], on_fake_gpu["taken"]
    on_fake_gpu["answer"] = lambda batched: False
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 8, 2, 16), jnp.bfloat16)
               for i in range(3))
    pos = jnp.arange(8)
    A.causal_attention(q, k, v, q_pos=pos, k_pos=pos, bias=jnp.zeros((2, 8, 8)))
    assert asked == [(False, 16)] and taken == []  # the check failed: dense, not cuDNN
    A.causal_attention(q, k, v, q_pos=jnp.stack([pos, pos]), k_pos=jnp.stack([pos, pos]),
                       bias=lambda qp, kp: jnp.zeros((2, len(qp), len(kp))))
    assert asked[-1] == (True, 16) and taken == []
    A.causal_attention(q, k, v, q_pos=pos, k_pos=pos)  # no bias: nothing to check
    assert len(asked) == 2 and taken == ["cudnn"]


@pytest.mark.parametrize("batched", [False, True])
def test_bias_grad_check_accepts_a_correct_gradient_and_rejects_broken_ones(batched):
    """The check behind auto's cuDNN choice, with stand-ins for cuDNN: the dense path in
    bf16 passes; a zero, a wrong and a failing bias gradient do not; and the check runs
    eagerly inside a jit trace (auto is resolved while the model is traced)."""

    def zero_grad(q, k, v, *, bias, **kw):
        return dense_attention(q, k, v, bias=jax.lax.stop_gradient(bias), **kw)

    def half_grad(q, k, v, *, bias, **kw):  # right value, gradient scaled by 1/2
        b = 0.5 * bias + jax.lax.stop_gradient(0.5 * bias)
        return dense_attention(q, k, v, bias=b, **kw)

    def fails(q, k, v, **kw):
        raise NotImplementedError("no dbias for this layout")

    kw = dict(batched=batched, t=64, h=2, d=32)
    assert bias_grad_matches(dense_attention, **kw)
    assert not bias_grad_matches(zero_grad, **kw)
    assert not bias_grad_matches(half_grad, **kw)
    assert not bias_grad_matches(fails, **kw)
    seen = []

    @jax.jit
    def traced(x):
        seen.append(bias_grad_matches(dense_attention, **kw))
        return x

    traced(jnp.ones(()))
    assert seen == [True]


@pytest.mark.parametrize("layout", ["shared", "per_example", "callable"])
@pytest.mark.parametrize("inside", [False, True])
def test_cudnn_path_applies_the_bias_like_the_dense_path(monkeypatch, inside, layout):
    """cuDNN takes one dense bias added after the scale, so with bias_inside_scale the
    path passes b * s: (q.k + b) * s == q.k * s + b * s. On CPU, with XLA's
    dot_product_attention standing in for cuDNN's (same call, same bias), the result is
    the dense path's and the float64 double loop's, for a shared [H, T, T], a
    per-example [B, H, T, T] and a callable bias."""
    real = jax.nn.dot_product_attention
    calls = []

    def xla_for_cudnn(q, k, v, *, bias, scale, is_causal, implementation):
        calls.append((implementation, is_causal, bias.shape))
        return real(q, k, v, bias=bias, scale=scale, is_causal=is_causal, implementation="xla")

    monkeypatch.setattr(A.jax.nn, "dot_product_attention", xla_for_cudnn)
    q, k, v = rand_qkv(t=40)
    pos = jnp.arange(40)
    table = jax.random.normal(jax.random.key(9), (2, 3, 40, 40))  # unit-scale biases
    bias = {"shared": table[0], "per_example": table,
            "callable": lambda qp, kp: table[0][:, qp][:, :, kp]}[layout]
    kw = dict(bias=bias, q_pos=pos, k_pos=pos, scale=0.3, bias_inside_scale=inside)
    got = cudnn_attention(q, k, v, **kw)
    want_shape = (2, 3, 40, 40) if layout == "per_example" else (1, 3, 40, 40)
    assert calls == [("cudnn", True, want_shape)]
    np.testing.assert_allclose(got, dense_attention(q, k, v, **kw), rtol=1e-5, atol=1e-5)
    examples = ([(slice(r, r + 1), table[r]) for r in range(2)] if layout == "per_example"
                else [(slice(None), table[0])])
    for r, b in examples:
        want = naive_attention(q[r], k[r], v[r], np.asarray(b), 0.3, inside)
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN path needs a GPU")
@pytest.mark.gpu
def test_cudnn_matches_dense_bf16():
    q, k, v = (x.astype(jnp.bfloat16) for x in rand_qkv(b=2, t=256, h=4, d=64))
    pos = jnp.arange(256)
    bias = -0.05 * jnp.maximum(pos[:, None] - pos[None], 0).astype(jnp.float32)[None].repeat(4, 0)
    ref = causal_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                           q_pos=pos, k_pos=pos, bias=bias, impl="dense")
    got = causal_attention(q, k, v, q_pos=pos, k_pos=pos, bias=bias, impl="cudnn")
    np.testing.assert_allclose(got.astype(jnp.float32), ref, atol=3e-2)  # bf16 inputs


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN path needs a GPU")
@pytest.mark.gpu
def test_cudnn_bias_gradient_matches_dense():
    """A learned bias (T5, offset) trains through the cuDNN path only if cuDNN returns
    the bias gradient; compare it with the dense fp32 path."""
    q, k, v = rand_qkv(b=2, t=128, h=4, d=64)
    pos = jnp.arange(128)
    bias = 0.1 * jax.random.normal(jax.random.key(7), (4, 128, 128))
    w = jax.random.normal(jax.random.key(8), (2, 128, 4, 64))

    def loss(b, impl, dtype):
        out = causal_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), q_pos=pos,
                               k_pos=pos, bias=b, impl=impl)
        return (out.astype(jnp.float32) * w).sum()

    ref = jax.grad(loss)(bias, "dense", jnp.float32)
    got = jax.grad(loss)(bias, "cudnn", jnp.bfloat16)
    assert np.abs(np.asarray(got)).max() > 0
    np.testing.assert_allclose(got, ref, atol=0.05 * float(np.abs(np.asarray(ref)).max()))
    assert A.cudnn_bias_grad_ok(False)  # so auto sends a shared learned bias to cuDNN


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN path needs a GPU")
@pytest.mark.gpu
def test_cudnn_bias_grad_check_agrees_for_per_example_biases():
    """Per-example biases ([B, H, T, T], randomized positions): auto's check must agree
    with the same comparison on another case (3 examples, 256 positions)."""
    direct = A.bias_grad_matches(A.cudnn_attention, batched=True, b=3, t=256, h=4, d=64)
    assert A.cudnn_bias_grad_ok(True) == direct
