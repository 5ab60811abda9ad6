"""Position schemes: registry contract, numeric oracles and properties.

Oracles are hard-coded values for small cases and NumPy double loops over (i, j) in
float64; float32 results are compared at rtol 1e-5 / atol 1e-6 unless a test says why
not. Positions include non-contiguous (sorted random) vectors and q/k blocks of a
longer sequence, since blockwise attention and randomized positions call the hooks so.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import builtin_schemes

import relpos.positions as P
from relpos.positions import RelposConfigError
from relpos.positions.alibi import alibi_slopes
from relpos.positions.kerple import KERPLE_FLOOR, kerple_power_bias
from relpos.positions.rotary import rope_frequencies
from relpos.positions.t5 import t5_bucket

NAMES = {"none", "sinusoidal", "learned_abs", "offset", "t5", "alibi", "kerple_power",
         "kerple_log", "sandwich", "fire", "rope", "xpos",
         "cope", "dape", "fox", "stickbreaking", "ssmax", "hard_alibi", "yarn"}
BIAS_NAMES = ["offset", "t5", "alibi", "kerple_power", "kerple_log", "sandwich", "fire"]
RTOL, ATOL = 1e-5, 1e-6


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def position_cases():
    """(q_pos, k_pos) pairs: contiguous, sorted random (non-contiguous), and blocks."""
    rng = np.random.default_rng(0)
    rand = np.sort(rng.choice(120, size=16, replace=False))
    return [
        (np.arange(9), np.arange(9)),
        (rand, rand),
        (rand[8:13], rand[:10]),  # a query block against an earlier/overlapping key block
        (np.arange(40, 45), np.arange(30, 37)),
    ]


def loop_bias(value, q_pos, k_pos, num_heads):
    """``[H, Tq, Tk]`` float64 from ``value(h, i, j, d)`` with ``d = max(i - j, 0)``."""
    out = np.zeros((num_heads, len(q_pos), len(k_pos)))
    for h in range(num_heads):
        for a, i in enumerate(q_pos):
            for b, j in enumerate(k_pos):
                out[h, a, b] = value(h, int(i), int(j), max(int(i) - int(j), 0))
    return out


# --------------------------------------------------------------------------- registry


def test_available_names_exact():
    """The built-in schemes (classes in relpos.positions.*) are exactly NAMES; names an
    installed plug-in adds (entry point group relpos.positions) are not counted."""
    assert builtin_schemes() == sorted(NAMES)
    assert set(NAMES) <= set(P.available())


@pytest.mark.parametrize("name", sorted(NAMES))
def test_build_every_scheme(name):
    scheme = P.build(name, num_heads=4, head_dim=8)
    assert isinstance(scheme, P.PositionScheme)
    assert scheme.name == name


@pytest.mark.parametrize("name", BIAS_NAMES)
def test_bias_shape_and_dtype(name):
    scheme = P.build(name, num_heads=4, head_dim=8)
    b = scheme.bias(jnp.arange(5) + 2, jnp.arange(7))
    assert b.shape == (4, 5, 7) and b.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(b)))


def test_hooks_per_scheme():
    hooks = {n: {h for h in ("embed", "rotate", "bias")
                 if callable(getattr(P.build(n, num_heads=2, head_dim=4), h, None))}
             for n in NAMES}
    assert hooks["none"] == set()
    assert hooks["sinusoidal"] == hooks["learned_abs"] == {"embed"}
    assert hooks["rope"] == hooks["xpos"] == {"rotate"}
    for n in BIAS_NAMES:
        assert hooks[n] == {"bias"}


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="alibi.*kerple_log") as e:
        P.build("no_such_bias", num_heads=2, head_dim=4)
    assert "sandwich" in str(e.value)


def test_unknown_option_is_named():
    with pytest.raises(RelposConfigError, match="num_bucket") as e:
        P.build("t5", num_heads=2, head_dim=4, num_bucket=8)
    assert "num_buckets" in str(e.value)  # the valid options are listed


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("name, options, option", [
    ("t5", dict(num_buckets=1), "num_buckets"),
    ("t5", dict(num_buckets=32, max_distance=16), "max_distance"),
    ("t5", dict(max_distance=-5), "max_distance"),
    ("offset", dict(policy="wrap"), "policy"),
    ("offset", dict(size=0), "size"),
    ("offset", dict(size=-3), "size"),
    ("offset", dict(size=2.5), "size"),
    ("offset", dict(init_std=-0.1), "init_std"),
    ("learned_abs", dict(policy="zero"), "policy"),
    ("learned_abs", dict(max_length=-1), "max_length"),
    ("rope", dict(layout="diagonal"), "layout"),
    ("rope", dict(interpolation=0.5), "interpolation"),
    ("rope", dict(ntk_factor=0.0), "ntk_factor"),
    ("rope", dict(base=-1.0), "base"),
    ("xpos", dict(scale_base=0.0), "scale_base"),
    ("sandwich", dict(dim=7), "dim"),
    ("fire", dict(hidden=0), "hidden"),
    ("fire", dict(eps=-1e-6), "eps"),
])
def test_bad_option_fails_at_construction(name, options, option):
    with pytest.raises(RelposConfigError, match=option):
        P.build(name, num_heads=4, head_dim=8, **options)


@pytest.mark.parametrize("name", ["rope", "xpos"])
def test_rotary_needs_even_head_dim(name):
    with pytest.raises(RelposConfigError, match="head_dim"):
        P.build(name, num_heads=4, head_dim=7)


def test_sinusoidal_needs_even_model_size():
    with pytest.raises(RelposConfigError, match="num_heads\\*head_dim"):
        P.build("sinusoidal", num_heads=1, head_dim=3)


# --------------------------------------------------------------------------- T5


def t5_bucket_reference(n: int, num_buckets: int, max_distance: int) -> int:
    """HF T5Attention._relative_position_bucket, bidirectional=False, float32 log."""
    n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return n
    f32 = np.float32
    ratio = np.log(f32(n) / f32(max_exact)) / f32(math.log(max_distance / max_exact))
    large = max_exact + int(ratio * f32(num_buckets - max_exact))
    return min(large, num_buckets - 1)


def test_t5_buckets_match_reference():
    n = np.arange(0, 4097)
    got = np.asarray(t5_bucket(jnp.asarray(n), 32, 128))
    want = np.array([t5_bucket_reference(int(x), 32, 128) for x in n])
    np.testing.assert_array_equal(got, want)
    # Negative offsets (future keys) fall in bucket 0.
    assert int(t5_bucket(jnp.asarray(-5), 32, 128)) == 0


def test_t5_buckets_hard_coded():
    # max_exact = 16; bucket = 16 + floor(log(n/16) / log(8) * 16):
    # n=20: log(1.25)/log(8)*16 = 1.72 -> 17; n=32: 5.33 -> 21; n=64: 10.67 -> 26;
    # n=127: 15.94 -> 31; n=128: 16 -> 32, capped at 31.
    n = jnp.asarray(list(range(16)) + [20, 32, 64, 127, 128, 129, 1000, 10**6])
    want = list(range(16)) + [17, 21, 26, 31, 31, 31, 31, 31]
    np.testing.assert_array_equal(np.asarray(t5_bucket(n, 32, 128)), want)


@pytest.mark.parametrize("num_buckets, max_distance", [(2, 2), (8, 20), (33, 100)])
def test_t5_buckets_other_sizes(num_buckets, max_distance):
    n = np.arange(0, 300)
    got = np.asarray(t5_bucket(jnp.asarray(n), num_buckets, max_distance))
    want = [t5_bucket_reference(int(x), num_buckets, max_distance) for x in n]
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- ALiBi


def get_slopes_reference(n):
    """ofirpress/attention_with_linear_biases get_slopes, reimplemented."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + get_slopes_reference(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("num_heads", list(range(1, 17)) + [20, 24])
def test_alibi_slopes_match_reference(num_heads):
    np.testing.assert_allclose(alibi_slopes(num_heads), get_slopes_reference(num_heads),
                               rtol=1e-12)


def test_alibi_slopes_hard_coded():
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-k for k in range(1, 9)], rtol=1e-12)
    # 12 heads: the 8-head slopes, then every other slope of 16 heads (non-monotonic).
    want12 = [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    np.testing.assert_allclose(alibi_slopes(12), want12, rtol=1e-12)


def test_alibi_softmax_shift_invariance():
    """-m(i - j) and the reference's m*j differ by -m*i, a per-query constant."""
    num_heads, t = 4, 12
    pos = jnp.arange(t)
    slopes = np.asarray(alibi_slopes(num_heads))
    ours = P.build("alibi", num_heads=num_heads, head_dim=8).bias(pos, pos)
    reference = slopes[:, None, None] * np.arange(t)[None, None, :]  # [H, 1, Tk] broadcast
    scores = np.random.default_rng(1).normal(size=(num_heads, t, t))
    causal = np.tril(np.ones((t, t), bool))
    a = jax.nn.softmax(jnp.where(causal, scores + np.asarray(ours), -jnp.inf), axis=-1)
    b = jax.nn.softmax(jnp.where(causal, scores + reference, -jnp.inf), axis=-1)
    assert_close(a, np.asarray(b, np.float64))


# --------------------------------------------------------------------------- bias oracles


@pytest.mark.parametrize("q_pos, k_pos", position_cases())
def test_alibi_bias_vs_loop(q_pos, k_pos):
    h = 6
    slopes = alibi_slopes(h)
    got = P.build("alibi", num_heads=h, head_dim=8).bias(jnp.asarray(q_pos), jnp.asarray(k_pos))
    assert_close(got, loop_bias(lambda hh, i, j, d: -slopes[hh] * d, q_pos, k_pos, h))


def _set_table(scheme, rng):
    table = rng.normal(size=scheme.table.shape).astype(np.float32)
    scheme.table[...] = jnp.asarray(table)
    return table


@pytest.mark.parametrize("q_pos, k_pos", position_cases())
def test_offset_bias_vs_loop(q_pos, k_pos):
    h, size = 3, 50
    scheme = P.build("offset", num_heads=h, head_dim=8, size=size)
    table = _set_table(scheme, np.random.default_rng(2))
    got = scheme.bias(jnp.asarray(q_pos), jnp.asarray(k_pos))
    want = loop_bias(lambda hh, i, j, d: table[hh, min(d, size - 1)], q_pos, k_pos, h)
    assert_close(got, want)


@pytest.mark.parametrize("q_pos, k_pos", position_cases())
def test_t5_bias_vs_loop(q_pos, k_pos):
    h, buckets, max_distance = 3, 16, 40
    scheme = P.build("t5", num_heads=h, head_dim=8, num_buckets=buckets, max_distance=max_distance)
    table = _set_table(scheme, np.random.default_rng(3))
    got = scheme.bias(jnp.asarray(q_pos), jnp.asarray(k_pos))
    want = loop_bias(lambda hh, i, j, d: table[hh, t5_bucket_reference(d, buckets, max_distance)],
                     q_pos, k_pos, h)
    assert_close(got, want)


@pytest.mark.parametrize("q_pos, k_pos", position_cases())
def test_kerple_power_bias_vs_loop(q_pos, k_pos):
    h = 4
    r1, r2 = np.array([0.05, 0.3, 1.0, 2.5]), np.array([0.02, 0.5, 1.3, 1.99])
    scheme = P.build("kerple_power", num_heads=h, head_dim=8)
    scheme.set_values(r1, r2)
    assert_close(scheme.r1, r1)
    assert_close(scheme.r2, r2)
    got = scheme.bias(jnp.asarray(q_pos), jnp.asarray(k_pos))
    want = loop_bias(lambda hh, i, j, d: -r1[hh] * float(d) ** r2[hh], q_pos, k_pos, h)
    assert_close(got, want)


@pytest.mark.parametrize("q_pos, k_pos", position_cases())
def test_kerple_log_bias_vs_loop(q_pos, k_pos):
    h = 4
    r1, r2 = np.array([0.05, 0.3, 1.0, 2.5]), np.array([0.02, 0.5, 1.3, 7.0])
    scheme = P.build("kerple_log", num_heads=h, head_dim=8)
    scheme.set_values(r1, r2)
    assert_close(scheme.r1, r1)
    assert_close(scheme.r2, r2)
    got = scheme.bias(jnp.asarray(q_pos), jnp.asarray(k_pos))
    want = loop_bias(lambda hh, i, j, d: -r1[hh] * math.log(1 + r2[hh] * d), q_pos, k_pos, h)
    assert_close(got, want)


@pytest.mark.parametrize("q_pos, k_pos", position_cases())
@pytest.mark.parametrize("dim", [None, 32])
def test_sandwich_bias_vs_loop(q_pos, k_pos, dim):
    h, head_dim = 4, 8
    d_prime = head_dim if dim is None else dim
    scheme = P.build("sandwich", num_heads=h, head_dim=head_dim, dim=dim)

    def value(hh, i, j, d):
        total = sum(math.cos(d / 10000 ** (2 * k / d_prime)) for k in range(1, d_prime // 2 + 1))
        return (total - d_prime / 2) / (8 * (hh + 1) / h)

    got = scheme.bias(jnp.asarray(q_pos), jnp.asarray(k_pos))
    assert_close(got, loop_bias(value, q_pos, k_pos, h))


def test_sandwich_default_dim_is_head_dim():
    assert P.build("sandwich", num_heads=4, head_dim=16).dim == 16
    b = P.build("sandwich", num_heads=4, head_dim=16).bias(jnp.arange(6), jnp.arange(6))
    assert float(jnp.max(b)) <= 0.0
    assert_close(jnp.diagonal(b, axis1=1, axis2=2), np.zeros((4, 6)))


def _fire_numpy(scheme):
    def f64(v):
        return np.asarray(v[...], np.float64)

    c = float(scheme.c[...])
    w1, b1, w2, b2 = (f64(scheme.fc1.kernel), f64(scheme.fc1.bias),
                      f64(scheme.fc2.kernel), f64(scheme.fc2.bias))
    threshold = abs(float(scheme.l[...])) * scheme.threshold

    def value(hh, i, j, d):
        psi = lambda x: math.log(abs(c) * x + 1)  # noqa: E731
        u = psi(d) / (psi(max(threshold, i)) + scheme.eps)
        hidden = np.maximum(u * w1[0] + b1, 0.0)
        return float(hidden @ w2[:, hh] + b2[hh])

    return value


@pytest.mark.parametrize("q_pos, k_pos", position_cases())
def test_fire_bias_vs_loop(q_pos, k_pos):
    h = 3
    scheme = P.build("fire", num_heads=h, head_dim=8, hidden=16, threshold=512.0, seed=4)
    # Threshold 0.05 * 512 = 25.6, so some queries lie beyond it; random MLP biases
    # make the ReLU kinks fall inside [0, 1).
    scheme.c[...] = jnp.asarray(0.3, jnp.float32)
    scheme.l[...] = jnp.asarray(-0.05, jnp.float32)  # |l| is used
    rng = np.random.default_rng(5)
    scheme.fc1.bias[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
    scheme.fc2.bias[...] = jnp.asarray(rng.normal(size=h), jnp.float32)
    got = scheme.bias(jnp.asarray(q_pos), jnp.asarray(k_pos))
    assert_close(got, loop_bias(_fire_numpy(scheme), q_pos, k_pos, h))


def test_fire_depends_on_query_position_beyond_threshold():
    scheme = P.build("fire", num_heads=2, head_dim=8, threshold=4.0, seed=6)
    rng = np.random.default_rng(7)
    scheme.fc1.bias[...] = jnp.asarray(rng.normal(size=32), jnp.float32)
    pos = jnp.arange(40)
    b = np.asarray(scheme.bias(pos, pos))
    # Below the threshold (i <= L = 4) the normaliser is constant: purely relative.
    assert_close(b[:, 3, 1], np.asarray(b[:, 4, 2], np.float64))
    # Beyond it, the same offset 3 gives different biases at i = 10 and i = 30.
    assert np.all(np.abs(b[:, 10, 7] - b[:, 30, 27]) > 1e-4)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(scheme, nnx.Param)))


# --------------------------------------------------------------------------- policies


def test_offset_policies():
    size = 4
    q_pos, k_pos = jnp.arange(8), jnp.arange(8)
    schemes = {p: P.build("offset", num_heads=2, head_dim=8, size=size, policy=p)
               for p in ("clip", "zero", "error")}
    table = _set_table(schemes["clip"], np.random.default_rng(8))
    schemes["zero"].table[...] = jnp.asarray(table)
    schemes["error"].table[...] = jnp.asarray(table)

    clip = np.asarray(schemes["clip"].bias(q_pos, k_pos))
    zero = np.asarray(schemes["zero"].bias(q_pos, k_pos))
    assert_close(clip[:, 7, 0], table[:, size - 1])  # offset 7 -> last trained entry
    assert_close(zero[:, 7, 0], np.zeros(2))
    assert_close(zero[:, 5, 2], table[:, 3])  # offset 3 is trained
    assert_close(clip[:, 2, 5], table[:, 0])  # future key: offset clamped to 0

    with pytest.raises(RelposConfigError, match="offset 7") as e:
        schemes["error"].bias(q_pos, k_pos)
    msg = str(e.value)
    assert "size=4" in msg and "'clip'" in msg and "'zero'" in msg
    # In range: no error, same as clip.
    assert_close(schemes["error"].bias(q_pos[:4], k_pos[:4]), clip[:, :4, :4].astype(np.float64))

    traced = np.asarray(jax.jit(lambda q, k: schemes["error"].bias(q, k))(q_pos, k_pos))
    dist = np.maximum(np.arange(8)[:, None] - np.arange(8)[None, :], 0)
    assert np.all(np.isnan(traced[:, dist >= size]))
    assert_close(traced[:, dist < size], clip[:, dist < size].astype(np.float64))


def test_offset_init_std_zero_gives_zeros():
    scheme = P.build("offset", num_heads=2, head_dim=8, size=16, init_std=0.0)
    assert not np.any(np.asarray(scheme.table[...]))
    assert isinstance(nnx.state(scheme, P.PositionTable)["table"], P.PositionTable)


def test_learned_abs_policies():
    max_length = 6
    clip = P.build("learned_abs", num_heads=2, head_dim=4, max_length=max_length)
    error = P.build("learned_abs", num_heads=2, head_dim=4, max_length=max_length, policy="error")
    table = _set_table(clip, np.random.default_rng(9))
    error.table[...] = jnp.asarray(table)
    assert clip.table.shape == (max_length, 8)

    pos = jnp.asarray([0, 3, 5, 6, 9])
    assert_close(clip.embed(pos), table[[0, 3, 5, 5, 5]])
    batched = clip.embed(jnp.stack([pos, pos[::-1]]))
    assert batched.shape == (2, 5, 8)
    assert_close(batched[1], table[[5, 5, 5, 3, 0]])

    with pytest.raises(RelposConfigError, match="position 9") as e:
        error.embed(pos)
    assert "max_length=6" in str(e.value) and "'clip'" in str(e.value)
    assert_close(error.embed(pos[:3]), table[[0, 3, 5]])

    traced = np.asarray(jax.jit(error.embed)(pos))
    assert np.all(np.isnan(traced[3:])) and np.all(np.isfinite(traced[:3]))
    assert_close(traced[:3], table[[0, 3, 5]])
    with pytest.raises(RelposConfigError, match="7 positions"):
        jax.jit(error.embed)(jnp.arange(7))


def test_learned_abs_init():
    scheme = P.build("learned_abs", num_heads=4, head_dim=16, max_length=512, seed=1)
    table = np.asarray(scheme.table[...])
    assert table.dtype == np.float32 and table.shape == (512, 64)
    assert abs(table.std() - 0.02) < 0.001


# --------------------------------------------------------------------------- KERPLE


@pytest.mark.parametrize("name", ["kerple_power", "kerple_log"])
def test_kerple_constraints_hold_for_extreme_raw_values(name):
    scheme = P.build(name, num_heads=4, head_dim=8)
    raw = jnp.asarray([-1e4, -30.0, 30.0, 1e4], jnp.float32)
    scheme.raw_r1[...] = raw
    scheme.raw_r2[...] = raw
    r1, r2 = np.asarray(scheme.r1), np.asarray(scheme.r2)
    assert np.all(np.isfinite(r1)) and np.all(r1 >= KERPLE_FLOOR)
    assert np.all(np.isfinite(r2)) and np.all(r2 >= KERPLE_FLOOR)
    if name == "kerple_power":
        assert np.all(r2 <= 2.0)
    assert bool(jnp.all(jnp.isfinite(scheme.bias(jnp.arange(30), jnp.arange(30)))))


def test_kerple_init_follows_official_ranges():
    power = P.build("kerple_power", num_heads=64, head_dim=8, seed=3)
    log = P.build("kerple_log", num_heads=64, head_dim=8, seed=3)
    for values, high in [(power.r1, 1.0), (power.r2, 2.0), (log.r1, 2.0), (log.r2, 1.0)]:
        v = np.asarray(values)
        assert v.min() > KERPLE_FLOOR and v.max() < high
        assert v.std() > 0.15 * high  # spread like a uniform draw, not a constant


@pytest.mark.parametrize("name", ["kerple_power", "kerple_log"])
def test_kerple_gradients_finite_at_distance_zero(name):
    scheme = P.build(name, num_heads=4, head_dim=8)
    pos = jnp.arange(6)  # includes d = 0 on the diagonal and masked pairs (j > i)

    grads = nnx.grad(lambda m: jnp.sum(m.bias(pos, pos)))(scheme)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(bool(jnp.any(g != 0)) for g in leaves)

    r1 = jnp.ones(4)
    g = jax.grad(lambda r2: jnp.sum(kerple_power_bias(pos, pos, r1, r2)))(jnp.full(4, 0.7))
    assert bool(jnp.all(jnp.isfinite(g)))


# --------------------------------------------------------------------------- sinusoidal


def test_sinusoidal_hard_coded():
    scheme = P.build("sinusoidal", num_heads=2, head_dim=2, scale=1.0)  # D=4: freqs 1, 0.01
    want = np.array([
        [0.0, 1.0, 0.0, 1.0],
        [0.8414709848078965, 0.5403023058681398, 0.009999833334166664, 0.9999500004166653],
        [0.9092974268256817, -0.4161468365471424, 0.019998666693333080, 0.9998000066665778],
    ])
    got = scheme.embed(jnp.arange(3))
    assert got.dtype == jnp.float32 and got.shape == (3, 4)
    assert_close(got, want)
    assert scheme.embed(jnp.zeros((2, 3), jnp.int32)).shape == (2, 3, 4)


def test_sinusoidal_vs_formula():
    d, base = 16, 500.0
    scheme = P.build("sinusoidal", num_heads=2, head_dim=8, base=base, scale=1.0)
    t = np.arange(50)
    want = np.zeros((50, d))
    for k in range(d // 2):
        want[:, 2 * k] = np.sin(t / base ** (2 * k / d))
        want[:, 2 * k + 1] = np.cos(t / base ** (2 * k / d))
    assert_close(scheme.embed(jnp.asarray(t)), want)


def test_sinusoidal_default_scale_matches_token_embedding_rms():
    """Default scale: rms 0.02 per component, like the N(0, 0.02) token embeddings."""
    emb = np.asarray(P.build("sinusoidal", num_heads=4, head_dim=32).embed(jnp.arange(4096)))
    np.testing.assert_allclose(np.sqrt((emb ** 2).mean()), 0.02, rtol=1e-3)


# --------------------------------------------------------------------------- rotary


def rotary_reference(x, positions, inv_freq, layout, scale=None):
    """float64 rotation of ``x [B, T, H, d]``; ``positions [T]`` (float, already divided)."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    if layout == "half":
        first, second = np.arange(d // 2), np.arange(d // 2) + d // 2
    else:
        first, second = np.arange(0, d, 2), np.arange(1, d, 2)
    out = np.empty_like(x)
    for t, p in enumerate(positions):
        for k in range(d // 2):
            a, b = x[:, t, :, first[k]], x[:, t, :, second[k]]
            cos, sin = math.cos(p * inv_freq[k]), math.sin(p * inv_freq[k])
            s = 1.0 if scale is None else scale[t][k]
            out[:, t, :, first[k]] = s * (a * cos - b * sin)
            out[:, t, :, second[k]] = s * (b * cos + a * sin)
    return out


def _qk(rng, b=2, tq=5, tk=7, h=3, d=8):
    return (jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, tk, h, d)), jnp.float32))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("interpolation, ntk_factor", [(1.0, 1.0), (4.0, 1.0), (1.0, 8.0)])
def test_rope_vs_reference(layout, interpolation, ntk_factor):
    d = 8
    scheme = P.build("rope", num_heads=3, head_dim=d, layout=layout,
                     interpolation=interpolation, ntk_factor=ntk_factor)
    q, k = _qk(np.random.default_rng(10), d=d)
    q_pos, k_pos = np.array([3, 9, 10, 20, 31]), np.arange(7) * 4
    base = 10000.0 * ntk_factor ** (d / (d - 2))
    inv_freq = [base ** (-2 * kk / d) for kk in range(d // 2)]
    rq, rk = scheme.rotate(q, k, jnp.asarray(q_pos), jnp.asarray(k_pos))
    assert_close(rq, rotary_reference(q, q_pos / interpolation, inv_freq, layout))
    assert_close(rk, rotary_reference(k, k_pos / interpolation, inv_freq, layout))


def test_rope_scaling_changes_angles_as_specified():
    d = 16
    plain = P.build("rope", num_heads=2, head_dim=d)
    ntk = P.build("rope", num_heads=2, head_dim=d, ntk_factor=8.0)
    theta = np.asarray(rope_frequencies(d))
    # NTK: the highest frequency is unchanged, the lowest is divided by the factor.
    np.testing.assert_allclose(ntk.frequencies[0], theta[0], rtol=1e-12)
    np.testing.assert_allclose(ntk.frequencies[-1], theta[-1] / 8.0, rtol=1e-12)
    # Interpolation: position t with factor s rotates like position t / s.
    pi = P.build("rope", num_heads=2, head_dim=d, interpolation=4.0)
    q, k = _qk(np.random.default_rng(11), d=d, tq=3, tk=3)
    a = pi.rotate(q, k, jnp.asarray([0, 8, 20]), jnp.asarray([4, 12, 40]))
    b = plain.rotate(q, k, jnp.asarray([0, 2, 5]), jnp.asarray([1, 3, 10]))
    assert_close(a[0], np.asarray(b[0], np.float64))
    assert_close(a[1], np.asarray(b[1], np.float64))


def _scores(q, k):
    return np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))


# q.k after rotation is compared at positions shifted by 37. The angles t * theta are
# rounded to fp32 (spec: angles in fp32), an error of up to ~|t| * 2^-24 rad per pair
# for |t| < 128, i.e. ~1e-5 relative in each product term; scores here are sums of 8
# products of unit normals (|score| up to ~10), so the comparison uses atol 1e-4.
SHIFT_ATOL = 1e-4


@pytest.mark.parametrize("name", ["rope", "xpos"])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotary_scores_depend_only_on_offset(name, layout):
    scheme = P.build(name, num_heads=3, head_dim=8, layout=layout, **(
        {"scale_base": 16.0} if name == "xpos" else {}))  # strong xPos decay, visible at 8 tokens
    q, k = _qk(np.random.default_rng(12))
    q_pos, k_pos = jnp.asarray([4, 6, 7, 9, 12]), jnp.asarray([0, 1, 3, 4, 6, 7, 11])
    s0 = _scores(*scheme.rotate(q, k, q_pos, k_pos))
    s1 = _scores(*scheme.rotate(q, k, q_pos + 37, k_pos + 37))
    np.testing.assert_allclose(s1, s0, rtol=0, atol=SHIFT_ATOL)
    # ...and they do depend on positions.
    s2 = _scores(*scheme.rotate(q, k, q_pos + 3, k_pos))
    assert np.max(np.abs(s2 - s0)) > 1e-2


def test_rope_preserves_norms_and_dtype():
    scheme = P.build("rope", num_heads=3, head_dim=8)
    q, k = _qk(np.random.default_rng(13))
    rq, rk = scheme.rotate(q, k, jnp.arange(5) * 100, jnp.arange(7))
    assert_close(jnp.linalg.norm(rq, axis=-1), np.asarray(jnp.linalg.norm(q, axis=-1), np.float64))
    assert_close(jnp.linalg.norm(rk, axis=-1), np.asarray(jnp.linalg.norm(k, axis=-1), np.float64))
    bf16 = jnp.bfloat16
    bq, bk = scheme.rotate(q.astype(bf16), k.astype(bf16), jnp.arange(5), jnp.arange(7))
    assert bq.dtype == bk.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["rope", "xpos"])
def test_rotary_batched_positions(name):
    scheme = P.build(name, num_heads=3, head_dim=8)
    q, k = _qk(np.random.default_rng(14))
    q_pos = jnp.asarray([[0, 1, 2, 3, 4], [10, 12, 13, 20, 21]])
    k_pos = jnp.asarray([[0, 1, 2, 3, 4, 5, 6], [3, 5, 9, 10, 12, 20, 30]])
    rq, rk = scheme.rotate(q, k, q_pos, k_pos)
    for b in range(2):
        eq, ek = scheme.rotate(q[b:b + 1], k[b:b + 1], q_pos[b], k_pos[b])
        assert_close(rq[b:b + 1], np.asarray(eq, np.float64))
        assert_close(rk[b:b + 1], np.asarray(ek, np.float64))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_xpos_vs_reference(layout):
    d, scale_base = 8, 32.0
    scheme = P.build("xpos", num_heads=3, head_dim=d, layout=layout, scale_base=scale_base)
    q, k = _qk(np.random.default_rng(15), d=d)
    q_pos, k_pos = np.array([5, 9, 10, 20, 31]), np.array([0, 2, 5, 9, 10, 20, 31])
    centre = (0 + 31) // 2
    zeta = [(2 * kk + 0.4 * d) / (1.4 * d) for kk in range(d // 2)]
    inv_freq = [10000.0 ** (-2 * kk / d) for kk in range(d // 2)]
    q_scale = [[z ** ((t - centre) / scale_base) for z in zeta] for t in q_pos]
    k_scale = [[z ** (-(t - centre) / scale_base) for z in zeta] for t in k_pos]
    rq, rk = scheme.rotate(q, k, jnp.asarray(q_pos), jnp.asarray(k_pos))
    assert_close(rq, rotary_reference(q, q_pos, inv_freq, layout, q_scale))
    assert_close(rk, rotary_reference(k, k_pos, inv_freq, layout, k_scale))


def test_xpos_long_positions_stay_finite():
    # Without centring zeta_0^(t/512) would underflow in fp32 here (t/512 = 160).
    scheme = P.build("xpos", num_heads=1, head_dim=8)
    q, k = _qk(np.random.default_rng(16), b=1, tq=4, tk=4, h=1)
    pos = jnp.asarray([81920, 81921, 81922, 81923])
    rq, rk = scheme.rotate(q, k, pos, pos)
    assert bool(jnp.all(jnp.isfinite(rq))) and bool(jnp.all(jnp.isfinite(rk)))
    assert float(jnp.min(jnp.abs(rq))) > 0


# --------------------------------------------------------------------------- jit


@pytest.mark.parametrize("name", BIAS_NAMES)
def test_bias_jit_matches_eager(name):
    scheme = P.build(name, num_heads=4, head_dim=8, seed=17)
    graphdef, state = nnx.split(scheme)

    @jax.jit
    def jitted(state, q_pos, k_pos):
        return nnx.merge(graphdef, state).bias(q_pos, k_pos)

    for q_pos, k_pos in position_cases():
        q_pos, k_pos = jnp.asarray(q_pos), jnp.asarray(k_pos)
        assert_close(jitted(state, q_pos, k_pos), np.asarray(scheme.bias(q_pos, k_pos), np.float64))


@pytest.mark.parametrize("name", ["rope", "xpos", "sinusoidal", "learned_abs"])
def test_other_hooks_jit_matches_eager(name):
    scheme = P.build(name, num_heads=3, head_dim=8, seed=18)
    graphdef, state = nnx.split(scheme)
    if name in ("rope", "xpos"):
        q, k = _qk(np.random.default_rng(19))
        q_pos, k_pos = jnp.asarray([3, 9, 10, 20, 31]), jnp.arange(7) * 5
        f = jax.jit(lambda st, *a: nnx.merge(graphdef, st).rotate(*a))
        jitted, eager = f(state, q, k, q_pos, k_pos), scheme.rotate(q, k, q_pos, k_pos)
        for got, want in zip(jitted, eager, strict=True):
            assert_close(got, np.asarray(want, np.float64))
    else:
        pos = jnp.asarray([0, 5, 6, 100, 300])
        f = jax.jit(lambda st, p: nnx.merge(graphdef, st).embed(p))
        assert_close(f(state, pos), np.asarray(scheme.embed(pos), np.float64))
