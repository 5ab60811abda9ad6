"""The schemes that read the content or replace the softmax (CoPE, DAPE, FoX,
stick-breaking, SSMax, Hard-ALiBi, YaRN) and the score hooks they use: naive loops of the
official formulas (values, and gradients of the learned parameters against jax.grad of the
same loop), causality, jit == eager, blockwise == dense at T = 1024 across key blocks of
128 (values 1e-5, gradients 1e-4, fp32), finite at 32x the training length, the cuDNN
refusal and one module per layer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import relpos.positions as P
from relpos.model import ModelConfig, TransformerLM
from relpos.nn import attention as A
from relpos.nn.transformer import score_hooks
from relpos.positions.rotary import rope_frequencies, yarn_frequencies, yarn_mscale

CONTENT = ["cope", "dape", "fox", "stickbreaking", "ssmax", "hard_alibi"]
ALL = CONTENT + ["yarn"]
H, D = 2, 8  # heads, head size of the attention-level tests


def make(name, seed=0, emb_std=1.0, **opts):
    """A scheme with every learned table moved off its initial value (CoPE's embeddings
    start at zero)."""
    s = P.build(name, num_heads=H, head_dim=D, rngs=nnx.Rngs(seed), **opts)
    if name == "cope":
        s.emb[...] = emb_std * jax.random.normal(jax.random.key(seed + 7), s.emb.shape)
    return s


def inputs(t, seed=0, scale=1.0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (scale * jax.random.normal(kx, (1, t, H, D)) for kx in keys[:3])
    x = jax.random.normal(keys[3], (1, t, H * D))
    w = jax.random.normal(keys[4], (1, t, H, D))
    return q, k, v, x, w


def ours(scheme, q, k, v, x, *, impl="dense", block=128):
    pos = jnp.arange(q.shape[1])
    if callable(getattr(scheme, "rotate", None)):
        q, k = scheme.rotate(q, k, pos, pos)
    bias = scheme.bias if callable(getattr(scheme, "bias", None)) else None
    return A.causal_attention(q, k, v, q_pos=pos, k_pos=pos, bias=bias, impl=impl,
                              block_size=block, hooks=score_hooks(scheme, 0, x, pos))


# ----------------------------------------------------------------------------- naive loops


def _sig(z, xp):
    return 1.0 / (1.0 + xp.exp(-z))


def _softmax_out(logits, vals, xp):
    p = xp.exp(logits - logits.max())
    return (p / p.sum()) @ vals


def _arr(x, xp):
    return np.asarray(x, np.float64) if xp is np else x


def naive(name, s, q, k, v, x, xp):
    """The official formula as loops over heads and queries (``xp``: numpy in float64 for
    values, jax.numpy for gradients). q, k, v: ``[T, H, d]``; x: ``[T, H*d]``."""
    q, k, v, x = (_arr(a, xp) for a in (q, k, v, x))
    t = q.shape[0]
    sc = D ** -0.5
    if name == "dape":  # the MLP mixes heads: logits of every (i, j) pair first
        b = _arr(s.base.bias(jnp.arange(t), jnp.arange(t)), xp)
        w1, b1, w2, b2 = (_arr(p[...], xp) for p in (s.fc1.kernel, s.fc1.bias, s.fc2.kernel,
                                                       s.fc2.bias))
        rows = [[None] * t for _ in range(t)]
        for i in range(t):
            for j in range(i + 1):
                a = xp.stack([q[i, h] @ k[j, h] * sc for h in range(H)])
                hid = xp.concatenate([a, b[:, i, j]]) @ w1 + b1
                hid = xp.where(hid > 0, hid, 0.01 * hid)
                rows[i][j] = a + b[:, i, j] + hid @ w2 + b2
    if name == "fox":
        f = x @ _arr(s.gate.kernel[...], xp) + _arr(s.gate.bias[...], xp)  # [T, H]
        log_f = -xp.log(1.0 + xp.exp(-f))
    outs = []
    for i in range(t):
        per_head = []
        for h in range(H):
            z = xp.stack([q[i, h] @ k[j, h] * sc for j in range(i + 1)])
            vals = v[:i + 1, h]
            if name == "cope":
                e = _arr(s.emb[...], xp)  # [npos, d]
                g = _sig(z, xp)
                p = xp.minimum(xp.stack([g[j:].sum() for j in range(i + 1)]), s.npos - 1)
                qe = e @ q[i, h]
                lo = np.floor(np.asarray(jax.lax.stop_gradient(p))).astype(int)
                hi = np.ceil(np.asarray(jax.lax.stop_gradient(p))).astype(int)
                wt = p - lo
                pos_logit = qe[hi] * wt + qe[lo] * (1 - wt)
                out = _softmax_out((z / sc + pos_logit) * sc, vals, xp)
            elif name == "dape":
                out = _softmax_out(xp.stack([rows[i][j][h] for j in range(i + 1)]), vals, xp)
            elif name == "fox":
                decay = xp.stack([sum((log_f[l, h] for l in range(j + 1, i + 1)), 0.0 * z[0])
                                  for j in range(i + 1)])
                out = _softmax_out(z + decay, vals, xp)
            elif name == "ssmax":
                out = _softmax_out(z * _arr(s.s[...], xp)[h] * math.log(i + 1), vals, xp)
            elif name == "hard_alibi":
                win = s.windows[h]
                keep = [j for j in range(i + 1) if win == 0 or i - j < win]
                out = _softmax_out(z[np.array(keep)], vals[np.array(keep)], xp)
            elif name == "stickbreaking":
                last = i if s.attend_current else i - 1  # keys j <= last take part
                weights = []
                for j in range(last + 1):
                    rest = [1.0 - _sig(z[m], xp) for m in range(j + 1, last + 1)]
                    weights.append(_sig(z[j], xp) * (xp.prod(xp.stack(rest)) if rest else 1.0))
                if weights:
                    wts = xp.stack(weights)
                    out = wts @ vals[:last + 1] + (1.0 - wts.sum()) * v[i, h]
                else:
                    out = v[i, h]
            per_head.append(out)
        outs.append(xp.stack(per_head))
    return xp.stack(outs)  # [T, H, d]


def _param_grads(scheme, fn, jit=True):
    graphdef, params, rest = nnx.split(scheme, nnx.Param, ...)
    grad = jax.grad(lambda p: fn(nnx.merge(graphdef, p, rest)))
    return (jax.jit(grad) if jit else grad)(params)


CASES = [("cope", {"npos": 4}), ("dape", {}), ("dape", {"base": "alibi"}), ("fox", {}),
         ("ssmax", {}), ("hard_alibi", {}), ("stickbreaking", {}),
         ("stickbreaking", {"attend_current": False})]


@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_matches_a_naive_loop_of_the_official_formula(name, opts):
    t = 6
    s = make(name, **opts)
    q, k, v, x, w = inputs(t, scale=1.5)
    got = np.asarray(ours(s, q, k, v, x)[0])
    want = naive(name, s, q[0], k[0], v[0], x[0], np)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if not jax.tree.leaves(nnx.state(s, nnx.Param)):  # nothing learned: gradients of q
        g = jax.jit(jax.grad(lambda q: (ours(s, q, k, v, x) * w).sum()))(q)
        g_naive = jax.jit(jax.grad(lambda q: (naive(name, s, q[0], k[0], v[0], x[0], jnp)
                                              * w[0]).sum()))(q)
        np.testing.assert_allclose(g, g_naive, rtol=1e-4, atol=1e-5)
        return
    g = _param_grads(s, lambda m: (ours(m, q, k, v, x) * w).sum())
    g_naive = _param_grads(s, lambda m: (naive(name, m, q[0], k[0], v[0], x[0], jnp)
                                         * w[0]).sum(),
                           jit=name != "cope")  # CoPE's loop indexes by concrete positions
    assert all(np.abs(a).max() > 0 for a in jax.tree.leaves(g))  # every parameter learns
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_naive)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_yarn_follows_the_official_ramp_and_temperature():
    d, base, s, L = 64, 10000.0, 8.0, 128
    theta = rope_frequencies(d, base)
    # official: dims rotating beta_fast=32 / beta_slow=1 times over L bound a linear ramp
    dim = lambda r: d * math.log(L / (r * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(dim(32)), 0), min(math.ceil(dim(1)), d - 1)
    ramp = [min(max((i - low) / (high - low), 0.0), 1.0) for i in range(d // 2)]
    mask = [1 - r for r in ramp]
    want = [th / s * (1 - m) + th * m for th, m in zip(theta, mask)]
    np.testing.assert_allclose(yarn_frequencies(d, base, s, L), want, rtol=1e-12)
    assert yarn_mscale(s) == pytest.approx(0.1 * math.log(s) + 1) and yarn_mscale(1.0) == 1.0
    assert yarn_frequencies(d, base, 1.0, L) == theta  # factor 1 is RoPE
    q, k, *_ = inputs(5)
    pos = jnp.arange(5)
    rope = P.build("rope", num_heads=H, head_dim=D)
    plain = P.build("yarn", num_heads=H, head_dim=D)
    for a, b in zip(plain.rotate(q, k, pos, pos), rope.rotate(q, k, pos, pos)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    ext = P.build("yarn", num_heads=H, head_dim=D, factor=s, original_length=L)
    qy, ky = ext.rotate(q, k, pos, pos)  # the rotation keeps norms: q.q grows by mscale^2
    np.testing.assert_allclose((qy * qy).sum(-1), (q * q).sum(-1) * yarn_mscale(s) ** 2,
                               rtol=1e-5)
    with pytest.raises(P.RelposConfigError, match="yarn factor=4.0 replaces interpolation"):
        P.build("yarn", num_heads=H, head_dim=D, factor=4.0, interpolation=2.0)


def fox_float64(params, q, k, v, x, w):
    """FoX's attention in float64, independent of relpos (one dense softmax): the loss
    sum(out * w), its output and gradients in q, k, v and the gate's parameters, and the
    gradient in each token's gate pre-activation ``u = x @ kernel + bias`` ([1, T, H]):
    the gate parameters' gradients are sums of it over tokens."""
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)

        def loss(qkv, kern, b, du):
            q, k, v = qkv
            c = jnp.cumsum(jax.nn.log_sigmoid(f64(x) @ kern + b + du), axis=1)  # [1, T, H]
            z = jnp.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
            z = z + jnp.swapaxes(c, 1, 2)[..., :, None] - jnp.swapaxes(c, 1, 2)[..., None, :]
            t = q.shape[1]
            z = jnp.where(jnp.tril(jnp.ones((t, t), bool)), z, -jnp.inf)
            out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(z, -1), v)
            return (out * f64(w)).sum(), out

        gate = params["gate"]
        (_, out), (g_qkv, g_k, g_b, g_u) = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(
            tuple(f64(a) for a in (q, k, v)), f64(gate["kernel"][...]), f64(gate["bias"][...]),
            jnp.zeros((1, q.shape[1], q.shape[2]), jnp.float64))
        return np.asarray(out), {"qkv": [np.asarray(g) for g in g_qkv], "per_token": np.asarray(g_u),
                                 "bias": np.asarray(g_b), "kernel": np.asarray(g_k)}


@pytest.mark.parametrize("name", ALL)
def test_blockwise_equals_dense_across_key_blocks(name):
    """T = 1024 with blocks of 128: CoPE's and stick-breaking's sums cross 7 block
    boundaries; values within 1e-5 and gradients (q, k, v and the scheme's parameters)
    within 1e-4 (fp32). One compiled function gives both paths. CoPE's embeddings are drawn
    at std 0.1 (they start at zero): the two paths sum the gates in a different order, so a
    count p <= npos - 1 = 127 differs by fp32 rounding (~1e-5), which moves a logit by that
    times |q.(e[k+1] - e[k])|/sqrt(d), 1.4 for std-1 embeddings (then 2 of 16384 outputs
    differ by 1.2e-5). FoX's forget-gate sums reach -870 here: both paths are also checked
    against float64 (values 1e-5, q/k/v gradients 1e-4; with ``c_i - c_j`` summed from
    ``c``'s fp32 cumulative sum they were 5e-5 and 2.3e-4 (dense), 6.8e-4 (blockwise) away).
    FoX's gate-parameter gradients are sums over 1024 tokens of terms that cancel (bias:
    |terms| sum to ~355 per head, the sum is -0.79), so their fp32 error scales with that
    sum, not with the result: they are checked against 2e-6 x the sum of |terms| (33 fp32
    ulps of it). Measured: dense 2.6e-7, blockwise 5.6e-7, and the float64 reference's own
    formula run in fp32 3.1e-6; an absolute 1e-4 failed on one host (blockwise 2.0e-4 off
    float64, a summation order) and passed on others."""
    t = 1024
    s = make(name, emb_std=0.1)
    q, k, v, x, w = inputs(t, seed=3)
    graphdef, params, rest = nnx.split(s, nnx.Param, ...)

    def loss(qkv, params, impl):
        out = ours(nnx.merge(graphdef, params, rest), *qkv, x, impl=impl, block=128)
        return (out * w).sum(), out

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    both = jax.jit(lambda qkv, p: (grad(qkv, p, "dense"), grad(qkv, p, "blockwise")))
    ((_, out_d), g_d), ((_, out_b), g_b) = both((q, k, v), params)
    assert np.isfinite(np.asarray(out_d)).all()
    np.testing.assert_allclose(out_b, out_d, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_d)):
        assert np.isfinite(np.asarray(b)).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    if name == "fox":
        out64, g64 = fox_float64(params, q, k, v, x, w)
        per_token = np.abs(g64["per_token"][0])  # [T, H]
        scale = [per_token.sum(0), np.abs(np.asarray(x, np.float64)[0]).T @ per_token]
        for out, g in [(out_d, g_d), (out_b, g_b)]:
            np.testing.assert_allclose(out, out64, rtol=1e-5, atol=1e-5)
            for a, b in zip(g[0], g64["qkv"]):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
            gate = [g[1]["gate"]["bias"][...], g[1]["gate"]["kernel"][...]]
            for a, b, c in zip(gate, [g64["bias"], g64["kernel"]], scale):
                err = np.abs(np.asarray(a, np.float64) - b) / c
                assert err.max() <= 2e-6, f"gate gradient {err.max():.2e} x sum|terms| off"


TRAIN = 8


def tiny_model(name, **cfg):
    c = ModelConfig(vocab_size=23, d_model=H * D, num_layers=2, num_heads=H, block_size=64,
                    **cfg)
    m = TransformerLM(c, name, {}, rngs=nnx.Rngs(1))
    if name == "cope":
        for sc in [m.position, *m.layer_positions]:
            sc.emb[...] = jax.random.normal(jax.random.key(2), sc.emb.shape)
    return m


@pytest.mark.parametrize("name", ALL)
def test_model_causal_jit_equals_eager_and_finite_at_32x(name):
    m = tiny_model(name)
    toks = jax.random.randint(jax.random.key(0), (2, 2 * TRAIN), 0, 23)
    eager = m(toks, impl="dense")
    jitted = nnx.jit(lambda m, t: m(t, impl="dense"))(m, toks)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    changed = m(toks.at[:, TRAIN + 3].set((toks[:, TRAIN + 3] + 1) % 23), impl="dense")
    np.testing.assert_allclose(changed[:, :TRAIN + 3], eager[:, :TRAIN + 3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(changed[:, TRAIN + 3:], eager[:, TRAIN + 3:])
    long = jax.random.randint(jax.random.key(1), (1, 32 * TRAIN), 0, 23)
    out = nnx.jit(lambda m, t: m(t, impl="blockwise"))(m, long)
    assert np.isfinite(np.asarray(out)).all()


def test_cudnn_refuses_score_hooks_and_auto_avoids_it(monkeypatch):
    s = make("stickbreaking")
    q, k, v, x, _ = inputs(4)
    with pytest.raises(ValueError, match="attention impl 'cudnn' cannot evaluate the normalize "
                                         "hook of position scheme 'stickbreaking'"):
        ours(s, q, k, v, x, impl="cudnn")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    kw = dict(length=64, dtype=jnp.bfloat16, dense_max_len=128)
    assert A.choose_impl("auto", **kw, score_hooks=True) == "dense"
    assert A.choose_impl("auto", **kw) == "cudnn"
    assert A.choose_impl("auto", **{**kw, "length": 256}, score_hooks=True) == "blockwise"
    m = tiny_model("fox")
    assert m.attention_impl(64) == "dense" and m.attention_impl(4096) == "blockwise"


@pytest.mark.parametrize("name", ["fox", "ssmax", "cope"])
def test_share_position_false_gives_every_layer_its_own_module(name):
    shared, per_layer = tiny_model(name), tiny_model(name, share_position=False)
    assert len(shared.layer_positions) == 0 and len(per_layer.layer_positions) == 1
    toks = jax.random.randint(jax.random.key(0), (1, 12), 0, 23)
    before = per_layer(toks, impl="dense")
    # scaled, not shifted: a shift of all of CoPE's embeddings is constant along a row
    moved = jax.tree.map(lambda p: 1.5 * p + 0.5,
                         nnx.state(per_layer.layer_positions, nnx.Param))
    nnx.update(per_layer.layer_positions, moved)  # layer 1's module only
    after = per_layer(toks, impl="dense")
    assert not np.allclose(after, before)
    np.testing.assert_allclose(per_layer(toks, impl="blockwise"), after, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["stickbreaking", "cope"])
def test_observed_weights_are_the_layers_true_weights(name):
    """What the attention-mass diagnostic reads: attention_weights of the observed
    LayerScores reproduce the layer's output (weights @ v) and rows sum to one."""
    s = make(name)
    q, k, v, x, _ = inputs(7)
    pos = jnp.arange(7)
    layer = A.LayerScores(None, score_hooks(s, 0, x, pos))
    p = A.attention_weights(q, k, bias=layer, q_pos=pos, k_pos=pos, scale=D ** -0.5)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    assert (np.triu(np.asarray(p)[0, 0], 1) == 0).all()  # causal
    np.testing.assert_allclose(jnp.einsum("bhqk,bkhd->bqhd", p, v), ours(s, q, k, v, x),
                               rtol=1e-5, atol=1e-5)
