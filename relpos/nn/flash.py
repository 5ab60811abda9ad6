"""``attn_impl=flash``: a Pallas flash-attention kernel (forward and backward) whose
position bias is computed inside the kernel from positions, with gradients for the
position scheme's parameters.

What it computes is :func:`relpos.nn.attention.dense_attention` (causal by index, keys
``j <= i + Tk - Tq``; ``q.k * scale + b`` or ``(q.k + b) * scale``; an optional separable
token bias ``c_i - c_j``), in fp32 softmax whatever the input dtype, with memory linear
in length: no ``[Tq, Tk]`` array of scores, probabilities or bias exists at any point,
forward or backward.

Why it has the shape it has
---------------------------
* **The bias is a per-head function of two position tiles.** A scheme is handed to the
  kernel as a :class:`KernelBias`: ``fn(params_h, h, q_pos [bq], k_pos [bk]) -> [bq, bk]``
  plus ``params``, a pytree whose every leaf has a leading head axis. Each program
  (batch b, head h, block i) receives only its head's slice of every leaf through its
  ``BlockSpec`` (so no dynamic indexing by head happens inside the kernel), and
  evaluates the bias of each tile from the tile's positions. Positions are explicit
  ``[1|B, T]`` inputs, so shifted, strided or randomised positions, per-example
  positions and ``Tq < Tk`` all take the same path as ``arange``. Shared parameters
  (FIRE's MLP input layer, ``c``, ``L``) are broadcast to ``[H, ...]`` outside the kernel;
  autodiff of that broadcast sums their per-head gradients. Constants a formula needs
  (ALiBi slopes, Sandwich frequencies) travel the same way, as non-trainable leaves,
  because a Pallas kernel may not capture array constants.
* **Parameter gradients: one in-kernel VJP per tile.** The dq kernel (one program per
  query block, looping over key blocks) recomputes ``P`` and ``dS = P * (dP - delta)``
  per tile and applies ``jax.vjp`` of ``fn`` with that tile's ``dS`` as cotangent,
  accumulating the parameter cotangent over key blocks in registers. It writes one copy
  per (batch, head, query block): ``[B, H, Tq / bq, *param]``, linear in length (a few
  KB for FIRE's MLP), summed outside. This route was chosen over the two alternatives
  of the issue because it is one mechanism for every scheme: (a) diagonal sums of
  ``dS`` followed by a VJP of the scheme's offset->bias function covers Toeplitz biases
  only, and with arbitrary positions (randomised, per example) the offset of a tile
  entry is not ``i - j`` of its indices, so the sums become scatter-adds by offset
  anyway; (b) a separate blockwise ``lax.scan`` recomputing ``dS`` outside the kernel is
  linear in memory too, but costs a second, unfused pass over all ``T^2 / 2`` scores.
  The in-kernel VJP costs the bias function's backward per visited tile, the same order
  as its forward. FIRE (non-Toeplitz: it normalises by the query position) needs
  nothing special.
* **Tables (offset, T5) are looked up, not differentiated through.** The VJP of a
  lookup in a loaded array is a scatter-add, and neither gather nor scatter of an array
  value has a Pallas Triton lowering. So a :class:`KernelBias` may name a ``table
  [H, N]`` and an ``index`` function of the position tiles (the causal distance, the T5
  bucket): the kernel reads ``table_ref[index]`` (an integer-array index of a *ref*,
  which the Triton lowering turns into a pointer gather) and accumulates the table's
  gradient as, for each index ``n`` the tile touches (``min..max``: at most ``bq + bk -
  1`` for contiguous positions, fewer once offsets clip), ``sum(where(index == n, dS,
  0))``. No atomics: ``plgpu.atomic_add`` with repeated indices is not summed in
  interpret mode (checked), so it could not be tested here. The cost is that loop: up to
  ~2 (bq + bk) elementwise passes over a tile, which on GPU may cost more than the tile's
  matmuls for the offset table; T5's bucketed tiles touch few indices.
* **Separable token bias** (``c_i - c_j``, FoX's hook): ``c`` travels as ``[B, H, T]``;
  its gradient is the row sums of ``dS`` (queries, in the dq kernel) minus the column
  sums (keys, in the dk/dv kernel). A :class:`~relpos.positions.base.CumulativeBias` is
  summed to ``c`` first (fp32; the per-query-block relative sums of the dense and
  blockwise paths are not reproduced, so at long windows FoX's gate gradients carry the
  fp32 rounding of ``c`` those paths avoid).
* **Causal skipping.** Key blocks wholly in the future of a query block are never
  visited: the forward and dq loops stop at the block holding key ``last query + Tk -
  Tq``; the dk/dv loop starts at the first query block that sees the key block. The mask
  is applied to every visited tile (cheap next to the two matmuls).
* **Three kernels**, as in FlashAttention-2: forward (saves ``o`` and the row
  log-sum-exp), dk/dv (one program per key block) and dq + parameter gradients (one per
  query block), so that no output is written by two programs and no atomics are needed.
  ``delta = rowsum(o * do)`` is a cheap XLA reduction in between.

GPU notes. No GPU was available when this was written. Values and gradients were checked
in Pallas interpret mode on CPU, and every kernel of every adapted scheme was lowered
for the cuda platform on CPU, through the Pallas Triton lowering to a Triton module that
verifies (``tests/test_flash.py``); nothing was compiled to PTX or run on a GPU, so
Triton's own compiler passes, register pressure and speed are unchecked. The kernels
use power-of-two blocks (default 64 x 64; the head size is zero-padded to a power of
two), ``pl.ds`` slices of the Q/K/V refs, ``lax.fori_loop`` with program-dependent
bounds and 2-D dots. The closed-form biases (ALiBi, KERPLE, Sandwich, FIRE) are
elementwise ops and reductions on 2-D tiles: Sandwich sums its cosines and FIRE runs
its MLP one frequency / hidden unit at a time (``fori_loop``), FIRE with its per-tile
VJP written out in the same loop, rather than on ``[bq, bk, n]`` tiles (64 x 64 x 32
fp32 for FIRE, more than a GPU's registers). fp32 inputs take Triton's default dot precision
(TF32 on recent GPUs), as XLA's default does. The adapters take their head's parameters
with ``x[0]`` of a size-1 axis (a squeeze, which lowers). The generic fallback for
schemes without an adapter computes all heads per tile and selects one with a dynamic
index (and, for a table scheme, ``jnp.take``), which Triton cannot lower: it serves
interpret mode only. ``auto`` never picks this path (see
:func:`relpos.nn.attention.choose_impl`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import pallas as pl

from relpos.errors import RelposConfigError
from relpos.positions import alibi, fire, kerple, offset, sandwich, t5
from relpos.positions.base import SCORE_HOOKS, CumulativeBias, causal_distance

log = logging.getLogger(__name__)

#: the score hooks the kernel evaluates (the others need the dense or blockwise path)
FLASH_HOOKS = ("token_bias",)
#: the paths that evaluate every hook
HOOK_IMPLS = "dense or blockwise"


@dataclasses.dataclass(frozen=True)
class KernelBias:
    """A position bias in the form the kernel evaluates.

    Attributes:
      fn: ``(params_h, h, q_pos [bq] int32, k_pos [bk] int32) -> [bq, bk]`` float32, the
        bias of head ``h`` (a traced int32 scalar) on one tile, ``params_h`` being
        ``params`` with the leading head axis of every leaf removed.
      params: pytree of arrays, every leaf ``[H, ...]`` (at least 2-D).
      trainable: whether gradients flow to ``params`` (False: constants only; the kernel
        then skips the per-tile VJP).
      owner: the scheme's name, for messages.
      vjp: optional ``(params_h, h, q_pos, k_pos, g [bq, bk]) -> d params_h``, the bias's
        VJP for one tile written out (default: ``jax.vjp`` of ``fn``).
      index, table, beyond: a looked-up bias (offset table, T5 buckets), added to ``fn``'s
        (``fn`` may then be None): ``index(q_pos [bq], k_pos [bk]) -> int32 [bq, bk]``
        (non-negative) into ``table [H, N]``; an index ``>= N`` follows ``beyond``
        (``clip`` | ``zero`` | ``mask`` | ``error``, as the offset policies). The kernel
        reads the table through its ref with an integer-array index (a pointer gather on
        Triton) and accumulates its gradient by a loop over the indices a tile touches,
        so no gather or scatter of a loaded array is needed.
    """

    fn: Callable | None
    params: Any
    trainable: bool = True
    owner: str = "?"
    index: Callable | None = None
    table: jax.Array | None = None
    beyond: str = "clip"
    vjp: Callable | None = None


# ----------------------------------------------------------------------------- schemes


def _per_head(x, num_heads: int) -> jax.Array:
    """``[H] -> [H, 1]``; a scalar or a shared array ``[...] -> [H, ...]`` (at least 2-D)."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 1 and x.shape[0] == num_heads:
        return x[:, None]
    x = jnp.broadcast_to(x, (num_heads,) + x.shape)
    return x if x.ndim >= 2 else x[:, None]


def _alibi(s: alibi.ALiBi, h: int) -> KernelBias:
    fn = lambda p, _h, qp, kp: alibi.alibi_bias(qp, kp, p["slope"])[0]
    return KernelBias(fn, {"slope": _per_head(jnp.asarray(s.slopes), h)}, trainable=False)


def _hard_alibi(s: alibi.HardALiBi, h: int) -> KernelBias:
    def fn(p, _h, qp, kp):
        w = p["window"][0]
        dist = causal_distance(qp, kp)
        return jnp.where((w > 0) & (dist >= w), -jnp.inf, 0.0).astype(jnp.float32)
    return KernelBias(fn, {"window": jnp.asarray(s.windows, jnp.int32)[:, None]},
                      trainable=False)


def _offset(s: offset.OffsetBias, h: int) -> KernelBias:
    return KernelBias(None, {}, index=causal_distance, table=s.table[...], beyond=s.policy)


def _t5(s: t5.T5Bias, h: int) -> KernelBias:
    index = lambda qp, kp: t5.t5_bucket(causal_distance(qp, kp), s.num_buckets, s.max_distance)
    return KernelBias(None, {}, index=index, table=s.table[...])  # buckets are in range


def _kerple(formula):
    def make(s, h: int) -> KernelBias:
        fn = lambda p, _h, qp, kp: formula(qp, kp, p["r1"], p["r2"])[0]
        return KernelBias(fn, {"r1": _per_head(s.r1, h), "r2": _per_head(s.r2, h)})
    return make


def _entry(vec, j):
    """``vec[j]`` for a traced ``j`` as a masked sum: a dynamic index of a loaded array has
    no Triton lowering, a reduction does."""
    return jnp.sum(jnp.where(jnp.arange(vec.shape[0]) == j, vec, 0.0))


def _pow2(x, axis: int = 1):
    """Zero-pad ``axis`` to a power of two (Triton tensors); loops stop at the true size."""
    n = x.shape[axis]
    return _pad(x, axis, _next_pow2(n)) if n & (n - 1) else x


def _sandwich(s: sandwich.Sandwich, h: int) -> KernelBias:
    freqs = sandwich.sandwich_frequencies(s.dim)

    def fn(p, _h, qp, kp):
        dist = causal_distance(qp, kp).astype(jnp.float32)
        # one frequency at a time: 2-D tiles only (a [bq, bk, d'/2] tile exceeds registers)
        shared = jax.lax.fori_loop(
            0, len(freqs), lambda k, acc: acc + jnp.cos(dist * _entry(p["inv_freq"], k)),
            jnp.zeros_like(dist))
        return (shared - s.dim / 2) / p["scale"][0]
    consts = {"inv_freq": _pow2(_per_head(jnp.asarray(freqs), h)),
              "scale": _per_head(jnp.asarray(sandwich.sandwich_head_scales(s.num_heads)), h)}
    return KernelBias(fn, consts, trainable=False)


def _fire(s: fire.FIRE, h: int) -> KernelBias:
    """FIRE's MLP one hidden unit at a time on 2-D tiles (a ``[bq, bk, width]`` tile is
    64 x 64 x 32 fp32 at the defaults, more than a GPU's registers), with its VJP written
    out in the same loop: the autodiff of that loop would keep every unit's tile."""
    width = s.fc1.kernel.shape[1]

    def unit(p, j, u):
        return u * _entry(p["w1"], j) + _entry(p["b1"], j), _entry(p["w2"], j)

    def distance(p, qp, kp):
        return fire.fire_normalized_distance(qp, kp, p["c"][0], p["threshold"][0], s.eps)

    def fn(p, _h, qp, kp):
        u = distance(p, qp, kp)

        def body(j, b):
            pre, w2 = unit(p, j, u)
            return b + jnp.maximum(pre, 0.0) * w2
        return jax.lax.fori_loop(0, width, body, jnp.zeros_like(u)) + p["b2"][0]

    def vjp(p, _h, qp, kp, g):
        u, u_vjp = jax.vjp(lambda c, t: fire.fire_normalized_distance(qp, kp, c, t, s.eps),
                           p["c"][0], p["threshold"][0])
        slots = jnp.arange(p["w1"].shape[0])

        def body(j, carry):
            du, dw1, db1, dw2 = carry
            pre, w2 = unit(p, j, u)
            on = pre > 0.0  # relu'(0) = 0, as jax.nn.relu
            dpre = jnp.where(on, g * w2, 0.0)
            put = lambda acc, x: acc + jnp.where(slots == j, jnp.sum(x), 0.0)
            return (du + dpre * _entry(p["w1"], j), put(dw1, dpre * u), put(db1, dpre),
                    put(dw2, jnp.where(on, g * pre, 0.0)))
        zeros = jnp.zeros_like(p["w1"])
        du, dw1, db1, dw2 = jax.lax.fori_loop(0, width, body,
                                              (jnp.zeros_like(u), zeros, zeros, zeros))
        dc, dt = u_vjp(du)
        return {"c": dc.reshape(1), "threshold": dt.reshape(1), "w1": dw1, "b1": db1,
                "w2": dw2, "b2": jnp.sum(g).reshape(1)}

    params = {"c": _per_head(s.c[...], h),
              "threshold": _per_head(jnp.abs(s.l[...]) * s.threshold, h),
              "w1": _pow2(_per_head(s.fc1.kernel[...][0], h)),  # [1, width] -> [H, width]
              "b1": _pow2(_per_head(s.fc1.bias[...], h)),
              "w2": _pow2(jnp.asarray(s.fc2.kernel[...], jnp.float32).T),  # [H, width]
              "b2": _per_head(s.fc2.bias[...], h)}
    return KernelBias(fn, params, vjp=vjp)


#: scheme class -> KernelBias builder ``(scheme, num_heads)``
ADAPTERS: dict[type, Callable] = {
    alibi.ALiBi: _alibi,
    alibi.HardALiBi: _hard_alibi,
    offset.OffsetBias: _offset,
    t5.T5Bias: _t5,
    kerple.KerplePower: _kerple(kerple.kerple_power_bias),
    kerple.KerpleLog: _kerple(kerple.kerple_log_bias),
    sandwich.Sandwich: _sandwich,
    fire.FIRE: _fire,
}


def _generic(scheme, h: int) -> KernelBias:
    """Any NNX scheme with a ``bias``: its parameters split off, the module rebuilt inside
    the kernel (every head evaluated per tile, one selected)."""
    graphdef, params, rest = nnx.split(scheme, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise RelposConfigError(
            f"attention impl 'flash' cannot pass the non-parameter state of position scheme "
            f"{_name(scheme)!r} into the kernel; use impl dense or blockwise")
    leaves, treedef = jax.tree.flatten(params)

    def fn(p, hh, qp, kp):
        state = jax.tree.unflatten(treedef, [x[0] for x in p or []])
        b = nnx.merge(graphdef, state, rest).bias(qp, kp)  # [H, bq, bk]
        return jax.lax.dynamic_index_in_dim(b, hh, axis=0, keepdims=False)
    # every leaf once per head (the kernel hands each program its head's copy)
    return KernelBias(fn, [jnp.broadcast_to(x, (h, 1) + x.shape) for x in leaves],
                      trainable=bool(leaves))


def _name(scheme) -> str:
    return getattr(scheme, "name", "") or type(scheme).__name__


def unsupported(scheme) -> str | None:
    """Why ``scheme`` cannot run on the flash path (one line), or None if it can."""
    hooks = [h for h in SCORE_HOOKS if h not in FLASH_HOOKS and callable(getattr(scheme, h, None))]
    if hooks:
        return (f"attention impl 'flash' cannot evaluate the {', '.join(hooks)} hook of "
                f"position scheme {_name(scheme)!r}; valid impls for it: {HOOK_IMPLS} "
                f"(auto picks one)")
    return None


def kernel_bias(scheme, num_heads: int, positions=None) -> KernelBias | None:
    """The scheme's bias as a :class:`KernelBias` (None if it has no ``bias`` hook).
    A scheme may provide its own ``kernel_bias(num_heads)`` method; the in-tree schemes
    have adapters here; any other NNX scheme takes the generic route. ``positions``
    ``(q_pos, k_pos)``, if given, go to the offset table's range check (policy error)."""
    reason = unsupported(scheme)
    if reason:
        raise RelposConfigError(reason)
    if not callable(getattr(scheme, "bias", None)):
        return None
    if callable(getattr(scheme, "kernel_bias", None)):
        kb = scheme.kernel_bias(num_heads)
    elif type(scheme) in ADAPTERS:
        kb = ADAPTERS[type(scheme)](scheme, num_heads)
    elif isinstance(scheme, nnx.Module):
        kb = _generic(scheme, num_heads)
    else:
        raise RelposConfigError(
            f"attention impl 'flash' cannot evaluate the bias of position scheme "
            f"{_name(scheme)!r} (not an NNX module and no kernel_bias method); use impl "
            f"dense, blockwise or cudnn")
    if positions is not None and isinstance(scheme, offset.OffsetBias):
        scheme._check_range(*positions)  # policy "error": the dense path's message
    return dataclasses.replace(kb, owner=_name(scheme))


# ----------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class _Cfg:
    fn: Callable | None
    treedef: Any
    trainable: bool
    has_c: bool
    scale: float
    inside: bool
    bq: int
    bk: int
    tq: int  # true lengths (before padding)
    tk: int
    nq: int  # padded block counts
    nk: int
    batched_pos: bool
    window: int  # > 0: keys at offsets q_pos - k_pos >= window masked too
    index_fn: Callable | None = None  # looked-up bias (KernelBias.index), table of
    table_n: int = 0  # this many entries (0: none; its ref is the last parameter ref)
    beyond: str = "clip"
    fn_vjp: Callable | None = None

    @property
    def grad_fn(self) -> bool:  # the per-tile VJP of fn
        return self.trainable and self.fn is not None and self.treedef is not None


_FILL = {"clip": None, "zero": 0.0, "mask": -math.inf, "error": math.nan}


def _logits(cfg: _Cfg, q, k, qpos, kpos, q_idx, k_idx, params, t_ref, h, cq, ck,
            want_vjp=False):
    """Masked logits ``[bq, bk]`` fp32 of one tile, the bias VJP (if asked) and the table
    indices ``(index clipped to the table, whether the entry's gradient counts)``."""
    raw = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
    vjp = b = looked_up = None
    if cfg.fn is not None:
        if want_vjp and cfg.fn_vjp is not None:
            b = cfg.fn(params, h, qpos, kpos).astype(jnp.float32)
            vjp = lambda g: (cfg.fn_vjp(params, h, qpos, kpos, g),)
        elif want_vjp:
            b, vjp = jax.vjp(lambda p: cfg.fn(p, h, qpos, kpos).astype(jnp.float32), params)
        else:
            b = cfg.fn(params, h, qpos, kpos).astype(jnp.float32)
    if cfg.table_n:
        idx = cfg.index_fn(qpos, kpos).astype(jnp.int32)
        beyond = idx >= cfg.table_n
        idx = jnp.minimum(idx, cfg.table_n - 1)
        tb = t_ref[idx].astype(jnp.float32)  # a gather through the ref
        fill = _FILL[cfg.beyond]
        if fill is not None:
            tb = jnp.where(beyond, fill, tb)
        b = tb if b is None else b + tb
        looked_up = (idx, None if fill is None else jnp.logical_not(beyond))
    if b is None:
        s = raw * cfg.scale
    else:
        s = (raw + b) * cfg.scale if cfg.inside else raw * cfg.scale + b
    if cfg.has_c:
        s = s + (cq[:, None] - ck[None, :])
    mask = (k_idx[None, :] <= q_idx[:, None]) & (k_idx < cfg.tk)[None, :]
    if cfg.window:
        mask = mask & ((qpos[:, None] - kpos[None, :]) < cfg.window)
    return jnp.where(mask, s, -jnp.inf), vjp, looked_up


def _table_grad(cfg: _Cfg, dt, looked_up, g):
    """``dt [Np] += `` the tile's cotangent ``g [bq, bk]`` summed per table index, by a loop
    over the indices the tile touches (a contiguous tile spans at most bq + bk - 1)."""
    idx, live = looked_up
    if live is not None:
        g = jnp.where(live, g, 0.0)
    entries = jnp.arange(dt.shape[0])

    def one(n, dt):
        return dt + jnp.where(entries == n, jnp.sum(jnp.where(idx == n, g, 0.0)), 0.0)
    return jax.lax.fori_loop(idx.min(), idx.max() + 1, one, dt)


def _dot(a, b, ta=False, tb=False):
    ca = 0 if ta else 1
    cb = 1 if tb else 0
    return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _split(refs, n_params: int, has_c: bool, n_first: int):
    first = refs[:n_first]
    rest = refs[n_first:]
    p_refs, rest = rest[:n_params], rest[n_params:]
    c_refs = ()
    if has_c:
        c_refs, rest = rest[:2], rest[2:]
    return first, p_refs, c_refs, rest


def _load_params(cfg: _Cfg, p_refs):
    """The bias function's parameters (loaded) and the table's ref (or None)."""
    t_ref = p_refs[-1] if cfg.table_n else None
    fn_refs = p_refs[:-1] if cfg.table_n else p_refs
    if cfg.treedef is None:
        return None, t_ref
    return jax.tree.unflatten(cfg.treedef, [r[...] for r in fn_refs]), t_ref


def _q_stop(cfg: _Cfg, i):
    """Number of key blocks query block ``i`` sees (the causally visible ones)."""
    last_key = jnp.minimum(i * cfg.bq + cfg.bq - 1 + (cfg.tk - cfg.tq), cfg.tk - 1)
    return last_key // cfg.bk + 1


def _fwd_kernel(*refs, cfg: _Cfg, n_params: int):
    (q_ref, k_ref, v_ref, qp_ref, kp_ref), p_refs, c_refs, (o_ref, lse_ref) = _split(
        refs, n_params, cfg.has_c, 5)
    h, i = pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    qpos = qp_ref[...]
    params, t_ref = _load_params(cfg, p_refs)
    cq = c_refs[0][...] if cfg.has_c else None
    q_idx = i * cfg.bq + jnp.arange(cfg.bq) + (cfg.tk - cfg.tq)
    bq, d = q.shape

    def body(j, carry):
        m, l, acc = carry
        sl = pl.ds(pl.multiple_of(j * cfg.bk, cfg.bk), cfg.bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        ck = c_refs[1][sl] if cfg.has_c else None
        s, _, _ = _logits(cfg, q, k, qpos, kp_ref[sl], q_idx,
                          j * cfg.bk + jnp.arange(cfg.bk), params, t_ref, h, cq, ck)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        corr = jnp.exp(m - m_safe)
        l = l * corr + p.sum(axis=1)
        acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
        return m_new, l, acc

    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, _q_stop(cfg, i), body, init)
    l_safe = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(jnp.isneginf(m), 0.0, m) + jnp.log(l_safe)


def _dkv_kernel(*refs, cfg: _Cfg, n_params: int):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qp_ref, kp_ref), p_refs, c_refs, outs = \
        _split(refs, n_params, cfg.has_c, 8)
    dk_ref, dv_ref = outs[:2]
    h, j = pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    kpos = kp_ref[...]
    params, t_ref = _load_params(cfg, p_refs)
    ck = c_refs[1][...] if cfg.has_c else None
    k_idx = j * cfg.bk + jnp.arange(cfg.bk)
    offset = cfg.tk - cfg.tq

    def body(i, carry):
        dk, dv, dck = carry
        sl = pl.ds(pl.multiple_of(i * cfg.bq, cfg.bq), cfg.bq)
        q, do = q_ref[sl, :], do_ref[sl, :]
        cq = c_refs[0][sl] if cfg.has_c else None
        s, _, _ = _logits(cfg, q, k, qp_ref[sl], kpos,
                          i * cfg.bq + jnp.arange(cfg.bq) + offset, k_idx, params, t_ref, h,
                          cq, ck)
        p = jnp.exp(s - lse_ref[sl][:, None])
        dv = dv + _dot(p.astype(do.dtype), do, ta=True)
        dp = _dot(do, v, tb=True)
        ds = p * (dp - dl_ref[sl][:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, ta=True)
        if cfg.has_c:
            dck = dck - ds.sum(axis=0)
        return dk, dv, dck

    first = jnp.maximum(j * cfg.bk - offset, 0) // cfg.bq
    zeros = jnp.zeros(k.shape, jnp.float32)
    init = (zeros, zeros, jnp.zeros((cfg.bk,), jnp.float32))
    dk, dv, dck = jax.lax.fori_loop(first, cfg.nq, body, init)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if cfg.has_c:
        outs[2][...] = dck


def _dq_kernel(*refs, cfg: _Cfg, n_params: int):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qp_ref, kp_ref), p_refs, c_refs, outs = \
        _split(refs, n_params, cfg.has_c, 8)
    dq_ref = outs[0]
    n_fn = n_params - (1 if cfg.table_n else 0)
    dp_refs = outs[1:1 + (n_fn if cfg.grad_fn else 0)]
    dt_ref = outs[1 + (n_fn if cfg.grad_fn else 0)] if cfg.table_n else None
    h, i = pl.program_id(1), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, dl = lse_ref[...], dl_ref[...]
    qpos = qp_ref[...]
    params, t_ref = _load_params(cfg, p_refs)
    grads = cfg.grad_fn
    cq = c_refs[0][...] if cfg.has_c else None
    q_idx = i * cfg.bq + jnp.arange(cfg.bq) + (cfg.tk - cfg.tq)

    def body(j, carry):
        dq, dcq, dpar, dt = carry
        sl = pl.ds(pl.multiple_of(j * cfg.bk, cfg.bk), cfg.bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        ck = c_refs[1][sl] if cfg.has_c else None
        s, vjp, looked_up = _logits(cfg, q, k, qpos, kp_ref[sl], q_idx,
                                    j * cfg.bk + jnp.arange(cfg.bk), params, t_ref, h, cq, ck,
                                    want_vjp=grads)
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot(do, v, tb=True) - dl[:, None])
        dq = dq + _dot(ds.astype(k.dtype), k)
        if cfg.has_c:
            dcq = dcq + ds.sum(axis=1)
        db = ds * cfg.scale if cfg.inside else ds  # the bias's cotangent
        if grads:
            (g,) = vjp(db)
            dpar = jax.tree.map(jnp.add, dpar, g)
        if cfg.table_n:
            dt = _table_grad(cfg, dt, looked_up, db)
        return dq, dcq, dpar, dt

    dpar0 = jax.tree.map(jnp.zeros_like, params) if grads else None
    dt0 = jnp.zeros(dt_ref.shape, jnp.float32) if cfg.table_n else None
    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((cfg.bq,), jnp.float32), dpar0, dt0)
    dq, dcq, dpar, dt = jax.lax.fori_loop(0, _q_stop(cfg, i), body, init)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    if grads:
        for r, g in zip(dp_refs, jax.tree.leaves(dpar)):
            r[...] = g.astype(r.dtype)
    if cfg.table_n:
        dt_ref[...] = dt
    if cfg.has_c:
        outs[-1][...] = dcq


# ----------------------------------------------------------------------------- pallas calls


def _specs(cfg: _Cfg, leaves, *, d: int, over_q: bool):
    """BlockSpecs of the shared inputs: q, k, v (blocked along the grid's sequence axis,
    the other one whole), positions, parameters (per head), token bias."""
    tq_p, tk_p = cfg.nq * cfg.bq, cfg.nk * cfg.bk
    pb = (lambda b: b) if cfg.batched_pos else (lambda b: 0)
    if over_q:
        q_spec = pl.BlockSpec((None, cfg.bq, None, d), lambda b, h, i: (b, i, h, 0))
        k_spec = pl.BlockSpec((None, tk_p, None, d), lambda b, h, i: (b, 0, h, 0))
        qp_spec = pl.BlockSpec((None, cfg.bq), lambda b, h, i: (pb(b), i))
        kp_spec = pl.BlockSpec((None, tk_p), lambda b, h, i: (pb(b), 0))
        cq_spec = pl.BlockSpec((None, None, cfg.bq), lambda b, h, i: (b, h, i))
        ck_spec = pl.BlockSpec((None, None, tk_p), lambda b, h, i: (b, h, 0))
    else:
        q_spec = pl.BlockSpec((None, tq_p, None, d), lambda b, h, j: (b, 0, h, 0))
        k_spec = pl.BlockSpec((None, cfg.bk, None, d), lambda b, h, j: (b, j, h, 0))
        qp_spec = pl.BlockSpec((None, tq_p), lambda b, h, j: (pb(b), 0))
        kp_spec = pl.BlockSpec((None, cfg.bk), lambda b, h, j: (pb(b), j))
        cq_spec = pl.BlockSpec((None, None, tq_p), lambda b, h, j: (b, h, 0))
        ck_spec = pl.BlockSpec((None, None, cfg.bk), lambda b, h, j: (b, h, j))
    p_specs = [pl.BlockSpec((None,) + x.shape[1:],
                            functools.partial(lambda n, b, h, i: (h,) + (0,) * n, x.ndim - 1))
               for x in leaves]
    c_specs = [cq_spec, ck_spec] if cfg.has_c else []
    row = pl.BlockSpec((None, None, cfg.bq if over_q else tq_p),
                       (lambda b, h, i: (b, h, i)) if over_q else (lambda b, h, j: (b, h, 0)))
    return q_spec, k_spec, qp_spec, kp_spec, p_specs, c_specs, row


def _call_kwargs(interpret: bool, name: str):
    kw = dict(interpret=interpret, name=name)
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
    return kw


def _forward(cfg: _Cfg, interpret, q, k, v, qpos, kpos, leaves, cq, ck):
    b, tq_p, h, d = q.shape
    q_spec, k_spec, qp_spec, kp_spec, p_specs, c_specs, row = _specs(cfg, leaves, d=d,
                                                                      over_q=True)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, n_params=len(leaves)),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, tq_p), jnp.float32)],
        grid=(b, h, cfg.nq),
        in_specs=[q_spec, k_spec, k_spec, qp_spec, kp_spec, *p_specs, *c_specs],
        out_specs=[q_spec, row], **_call_kwargs(interpret, "relpos_flash_fwd"),
    )(q, k, v, qpos, kpos, *leaves, *([cq, ck] if cfg.has_c else []))


def _backward(cfg: _Cfg, interpret, q, k, v, qpos, kpos, leaves, cq, ck, o, lse, do):
    b, tq_p, h, d = q.shape
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    c_in = [cq, ck] if cfg.has_c else []
    # dk, dv (and the key side of the token bias): one program per key block
    q_spec, k_spec, qp_spec, kp_spec, p_specs, c_specs, row = _specs(cfg, leaves, d=d,
                                                                      over_q=False)
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_specs = [k_spec, k_spec]
    if cfg.has_c:
        out_shape.append(jax.ShapeDtypeStruct(ck.shape, jnp.float32))
        out_specs.append(c_specs[1])
    dkv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, n_params=len(leaves)),
        out_shape=out_shape, grid=(b, h, cfg.nk),
        in_specs=[q_spec, k_spec, k_spec, q_spec, row, row, qp_spec, kp_spec, *p_specs,
                  *c_specs],
        out_specs=out_specs, **_call_kwargs(interpret, "relpos_flash_dkv"),
    )(q, k, v, do, lse, delta, qpos, kpos, *leaves, *c_in)
    # dq, the parameters' cotangents (one copy per query block) and the query side
    q_spec, k_spec, qp_spec, kp_spec, p_specs, c_specs, row = _specs(cfg, leaves, d=d,
                                                                      over_q=True)
    n_fn = len(leaves) - (1 if cfg.table_n else 0)
    grad_leaves = (leaves[:n_fn] if cfg.grad_fn else []) + (leaves[n_fn:] if cfg.table_n else [])
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [q_spec]
    if grad_leaves:
        for x in grad_leaves:
            out_shape.append(jax.ShapeDtypeStruct((b, h, cfg.nq) + x.shape[1:], jnp.float32))
            out_specs.append(pl.BlockSpec(
                (None, None, None) + x.shape[1:],
                functools.partial(lambda n, bb, hh, i: (bb, hh, i) + (0,) * n, x.ndim - 1)))
    if cfg.has_c:
        out_shape.append(jax.ShapeDtypeStruct(cq.shape, jnp.float32))
        out_specs.append(c_specs[0])
    dq_out = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, n_params=len(leaves)),
        out_shape=out_shape, grid=(b, h, cfg.nq),
        in_specs=[q_spec, k_spec, k_spec, q_spec, row, row, qp_spec, kp_spec, *p_specs,
                  *c_specs],
        out_specs=out_specs, **_call_kwargs(interpret, "relpos_flash_dq"),
    )(q, k, v, do, lse, delta, qpos, kpos, *leaves, *c_in)
    dq = dq_out[0]
    sums = iter([g.sum(axis=(0, 2)) for g in dq_out[1:1 + len(grad_leaves)]])
    dleaves = [next(sums).astype(x.dtype) if (i < n_fn and cfg.grad_fn) or i >= n_fn
               else jnp.zeros_like(x) for i, x in enumerate(leaves)]
    dcq = dq_out[-1] if cfg.has_c else None
    dck = dkv[2] if cfg.has_c else None
    return dq, dkv[0], dkv[1], dleaves, dcq, dck


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pad(x, axis: int, size: int, mode: str = "constant"):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, mode=mode)


def default_interpret() -> bool:
    """Pallas interpret mode everywhere but on GPU (the Triton lowering)."""
    return jax.default_backend() != "gpu"


def flash_attention(q, k, v, *, q_pos, k_pos, bias: KernelBias | None = None,
                    token_bias=None, scale: float | None = None, bias_inside_scale=False,
                    block_q: int = 64, block_k: int = 64, interpret: bool | None = None,
                    window: int = 0):
    """Causal flash attention with the bias computed in the kernel.

    Args:
      q: ``[B, Tq, H, d]``; k, v: ``[B, Tk, H, d]``, ``Tq <= Tk`` (queries are the last
        ``Tq`` keys).
      q_pos, k_pos: int positions ``[T]`` or ``[B, T]``.
      bias: a :class:`KernelBias` (see :func:`kernel_bias`) or None.
      token_bias: ``c [B, Tk, H]`` (logit ``(i, j) += c_i - c_j``), a
        :class:`CumulativeBias`, or None.
      block_q, block_k: tile sizes (powers of two; lowered to the padded length when it is
        shorter).
      interpret: Pallas interpret mode (default: on every backend but GPU).
      window: > 0: keys at offsets ``q_pos - k_pos >= window`` are masked as the future
        is (the blocks they fill are still visited); 0: none.
    """
    b, tq, h, d = q.shape
    tk = k.shape[1]
    if tq > tk:
        raise ValueError(f"flash attention needs Tq <= Tk, got {tq} > {tk}")
    if scale is None:
        scale = d ** -0.5
    if interpret is None:
        interpret = default_interpret()
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 1 or blk & (blk - 1):
            raise ValueError(f"flash attention {name} must be a power of two, got {blk}")
    bq = min(block_q, max(16, _next_pow2(tq)))
    bk = min(block_k, max(16, _next_pow2(tk)))
    nq, nk = -(-tq // bq), -(-tk // bk)
    q_pos = jnp.asarray(q_pos, jnp.int32)
    k_pos = jnp.asarray(k_pos, jnp.int32)
    batched = q_pos.ndim == 2 or k_pos.ndim == 2
    nb = b if batched else 1
    qpos = _pad(jnp.broadcast_to(q_pos, (nb, tq)), 1, nq * bq, "edge")
    kpos = _pad(jnp.broadcast_to(k_pos, (nb, tk)), 1, nk * bk, "edge")
    leaves, treedef = ([], None) if bias is None else jax.tree.flatten(bias.params)
    if not leaves:
        treedef = None
    table_n = 0
    if bias is not None and bias.table is not None:
        table = jnp.asarray(bias.table, jnp.float32)
        table_n = table.shape[1]
        leaves = leaves + [_pad(table, 1, _next_pow2(table_n))]  # Triton: power-of-two block
    c = token_bias
    if isinstance(c, CumulativeBias):
        c = jnp.cumsum(c.increments.astype(jnp.float32), axis=1)
    has_c = c is not None
    cfg = _Cfg(fn=None if bias is None else bias.fn, treedef=treedef,
               trainable=bool(bias is not None and bias.trainable), has_c=has_c,
               scale=float(scale), inside=bool(bias_inside_scale), bq=bq, bk=bk, tq=tq, tk=tk,
               nq=nq, nk=nk, batched_pos=batched, window=int(window),
               index_fn=None if bias is None else bias.index, table_n=table_n,
               beyond="clip" if bias is None else bias.beyond,
               fn_vjp=None if bias is None else bias.vjp)
    dp = _next_pow2(d)  # Triton tiles: power-of-two head size (zeros change nothing)
    qp, kp, vp = (_pad(_pad(x, 3, dp), 1, n * blk)
                  for x, n, blk in ((q, nq, bq), (k, nk, bk), (v, nk, bk)))

    @jax.custom_vjp
    def attend(qp, kp, vp, leaves, c):
        return _fwd(qp, kp, vp, leaves, c)[0]

    def _fwd(qp, kp, vp, leaves, c):
        cq, ck = _token_tiles(c)
        o, lse = _forward(cfg, interpret, qp, kp, vp, qpos, kpos, leaves, cq, ck)
        return o, (qp, kp, vp, leaves, c, o, lse)

    def _token_tiles(c):
        if c is None:
            return None, None
        ct = jnp.swapaxes(c.astype(jnp.float32), 1, 2)  # [B, H, Tk]
        return _pad(ct[:, :, tk - tq:], 2, nq * bq), _pad(ct, 2, nk * bk)

    def _bwd(res, do):
        qp, kp, vp, leaves, c, o, lse = res
        cq, ck = _token_tiles(c)
        dq, dk, dv, dleaves, dcq, dck = _backward(cfg, interpret, qp, kp, vp, qpos, kpos,
                                                  leaves, cq, ck, o, lse, do)
        dc = None
        if c is not None:
            dc = dck[:, :, :tk].at[:, :, tk - tq:].add(dcq[:, :, :tq])
            dc = jnp.swapaxes(dc, 1, 2).astype(c.dtype)
        return dq, dk, dv, dleaves, dc

    attend.defvjp(_fwd, _bwd)
    out = attend(qp, kp, vp, leaves, c)
    return out[:, :tq, :, :d]


@functools.cache
def log_not_auto(reason: str) -> None:
    """Log once per process why ``auto`` did not pick the flash path."""
    log.info("attention impl auto: flash not picked (%s)", reason)


def unsupported_score_hooks(names, owner: str) -> str | None:
    """The refusal message for score hooks the kernel cannot evaluate (None if all can)."""
    bad = [n for n in names if n not in FLASH_HOOKS]
    if not bad:
        return None
    return (f"attention impl 'flash' cannot evaluate the {', '.join(bad)} hook of position "
            f"scheme {owner!r}; valid impls for it: {HOOK_IMPLS} (auto picks one)")


