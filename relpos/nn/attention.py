"""Causal multi-head attention with an additive position bias, three equivalent paths.

* ``dense``: scores, bias and probabilities materialised ``[B, H, Tq, Tk]`` (reference;
  fastest for short training windows);
* ``blockwise``: online softmax over key blocks (Milakov & Gimelshein 2018; Rabe &
  Staats 2021), the bias computed per block from positions, key blocks entirely in the
  causal future skipped with ``lax.cond``; memory linear in sequence length;
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on GPU (bf16/fp16
  inputs; the bias is passed as a dense ``[B|1, H, Tq, Tk]`` array in the input dtype,
  and cuDNN's softmax accumulates in fp32);
* ``flash``: a Pallas flash-attention kernel (:mod:`relpos.nn.flash`) that computes the
  bias inside the kernel from position tiles, with gradients for the scheme's
  parameters; memory linear in length; Pallas interpret mode off GPU (for testing).

Causality is by *index* (key index <= query index, queries aligned to the last ``Tq``
keys); positions feed only the position scheme, so sliding windows and randomized
positions share one code path. On the dense and blockwise paths scores, bias and softmax
are fp32 whatever the input dtype.

Where the bias goes: the papers' convention ``q.k * scale + b``
(``bias_inside_scale=False``, default) or the seed formula ``(q.k + b) * scale``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from relpos.nn import flash
from relpos.positions.base import SCORE_HOOKS, CumulativeBias, ScoreBlock  # noqa: F401

Bias = jax.Array | Callable[[jax.Array, jax.Array], jax.Array] | flash.KernelBias | None
IMPLS = ("auto", "dense", "blockwise", "cudnn", "flash")


def choose_impl(impl: str, *, length: int, dtype, dense_max_len: int,
                learned_bias: bool = False, batched_bias: bool = False,
                head_dim: int = 64, score_hooks: bool = False) -> str:
    """Resolve ``auto``: blockwise beyond ``dense_max_len`` keys (dense memory is
    quadratic in length); otherwise cuDNN on GPU for half precision, dense elsewhere.

    A *learned* bias (offset, T5, KERPLE, FIRE) trains through cuDNN's bias gradient,
    which JAX has returned as zero or restricted to batch size 1 in some releases
    (jax-ml/jax#27184, #30593). So under ``auto`` it takes the cuDNN path only if
    :func:`cudnn_bias_grad_ok` (a check run once per process on a small case, for a
    bias shared by the batch or one per example as ``batched_bias`` says, at the model's
    ``head_dim``) finds the gradient equal to the dense path's; otherwise dense (with a
    warning). ``impl="cudnn"`` skips the check. A scheme with score hooks
    (``score_hooks``: token bias, logit scale, logit modifier, normaliser) cannot be
    expressed as one dense bias, so ``auto`` never gives it cuDNN.

    ``auto`` never picks ``flash`` (the reason logged once per process): off GPU the
    kernel runs in Pallas interpret mode, which is for testing; on GPU no benchmark has
    yet measured it faster than the path chosen here.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl != "auto":
        return impl
    if jax.default_backend() == "gpu":
        flash.log_not_auto("no relpos-bench measurement has shown the flash kernel faster "
                           "on GPU yet; keeping the dense/blockwise/cudnn choice")
    else:
        flash.log_not_auto(f"on {jax.default_backend()} the kernel runs in Pallas interpret "
                           "mode, which is for testing")
    if length > dense_max_len:
        return "blockwise"
    if (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and not score_hooks
            and (not learned_bias or cudnn_bias_grad_ok(batched_bias, head_dim))):
        return "cudnn"
    return "dense"


@functools.cache
def cudnn_bias_grad_ok(batched: bool, head_dim: int = 64) -> bool:
    """Whether cuDNN attention returns the bias gradient of the dense path on this
    JAX, cuDNN and GPU (checked once per process, bias layout and head size; False on
    error)."""
    ok = bias_grad_matches(cudnn_attention, batched=batched, dtype=jnp.bfloat16, d=head_dim)
    if not ok:
        logging.getLogger(__name__).warning(
            "cuDNN's attention-bias gradient does not match the dense path on this JAX/GPU "
            "(%s bias, head size %d): learned biases use dense attention",
            "per-example" if batched else "shared", head_dim)
    return ok


def bias_grad_matches(attend, *, batched: bool, dtype=jnp.bfloat16,
                      b: int = 2, t: int = 128, h: int = 4, d: int = 64) -> bool:
    """Compare ``d/d bias`` of ``sum(attend(q, k, v, bias=...) * w)`` (inputs in
    ``dtype``) with the fp32 dense path on a small causal case: True if it is finite,
    not all zero and within 5% of the reference's largest entry. Evaluated eagerly
    even while a caller is being traced (``jax.ensure_compile_time_eval``)."""
    try:
        with jax.ensure_compile_time_eval():
            keys = jax.random.split(jax.random.key(0), 5)
            q, k, v, w = (jax.random.normal(kx, (b, t, h, d), jnp.float32) for kx in keys[:4])
            bias = 0.1 * jax.random.normal(keys[4], ((b,) if batched else ()) + (h, t, t))
            pos = jnp.arange(t)

            def loss(bias, fn, dt):
                out = fn(q.astype(dt), k.astype(dt), v.astype(dt), bias=bias, q_pos=pos,
                         k_pos=pos, scale=d ** -0.5)
                return (out.astype(jnp.float32) * w).sum()

            with jax.default_matmul_precision("highest"):  # no TF32 on GPU: a true fp32 reference
                ref = np.asarray(jax.grad(loss)(bias, dense_attention, jnp.float32))
            got = np.asarray(jax.grad(loss)(bias, attend, dtype), np.float32)
    except Exception:  # noqa: BLE001 - an unsupported layout or a cuDNN error: not usable
        return False
    tol = 0.05 * float(np.abs(ref).max())
    return bool(np.isfinite(got).all() and np.abs(got).max() > 0
                and np.abs(got - ref).max() <= tol)


def evaluate_bias(bias: Bias, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array | None:
    """Evaluate a bias (array or callable of 1-D positions) for batched or shared
    positions. Returns ``[H, Tq, Tk]`` or ``[B, H, Tq, Tk]`` fp32, or None."""
    if bias is None:
        return None
    if not callable(bias):
        return jnp.asarray(bias, jnp.float32)
    if q_pos.ndim == 1 and k_pos.ndim == 1:
        return bias(q_pos, k_pos).astype(jnp.float32)
    q_pos, k_pos = _batched(q_pos, k_pos)
    n = max(q_pos.shape[0], k_pos.shape[0])  # broadcast the batch axis only (Tq != Tk)
    q_pos = jnp.broadcast_to(q_pos, (n, q_pos.shape[1]))
    k_pos = jnp.broadcast_to(k_pos, (n, k_pos.shape[1]))
    return jax.vmap(bias)(q_pos, k_pos).astype(jnp.float32)


def _batched(q_pos, k_pos):
    q_pos = q_pos if q_pos.ndim == 2 else q_pos[None]
    k_pos = k_pos if k_pos.ndim == 2 else k_pos[None]
    return q_pos, k_pos


def _add_bias(scores: jax.Array, bias: jax.Array | None, scale: float, inside: bool):
    """scores: raw q.k ``[B, H, q, k]`` fp32; bias ``[H, q, k]`` or ``[B, H, q, k]``."""
    if bias is None:
        return scores * scale
    if bias.ndim == 3:
        bias = bias[None]
    return (scores + bias) * scale if inside else scores * scale + bias


def _causal_mask(q_idx: jax.Array, k_idx: jax.Array) -> jax.Array:
    return k_idx[None, :] <= q_idx[:, None]


def _within(q_pos: jax.Array, k_pos: jax.Array, window: int) -> jax.Array:
    """Keys at offsets ``q_pos - k_pos < window``: ``[Tq, Tk]``, or ``[B, 1, Tq, Tk]``
    for positions per example (broadcasts against ``[B, H, Tq, Tk]`` scores)."""
    near = (q_pos[..., :, None] - k_pos[..., None, :]) < window
    return near[:, None] if near.ndim == 3 else near


@jax.custom_jvp
def add_batch_shared(x: jax.Array, b: jax.Array) -> jax.Array:
    """``x [B, ...] + b [...]``, ``b`` broadcast over the batch (``b.ndim == x.ndim - 1``).

    Same value and derivatives as ``x + b`` (forward and reverse mode); only the tangent
    of ``b`` is broadcast by a product with ``ones(B)``, so reverse mode sums its
    cotangent over the batch as a matrix-vector product. XLA:CPU (YNNPACK fusions, jax
    0.10) lowers the equivalent ``reduce_sum`` over the leading axis of a ``[B, H, T, T]``
    array ~35x slower (21.7 vs 0.63 ms at B16 H4 T256): it was most of the step-time cost
    of a learned bias (benchmarks/README.md)."""
    _check_batch_shared(x, b)
    return x + b


def _check_batch_shared(x, b) -> None:
    if b.ndim != x.ndim - 1:
        raise ValueError(f"add_batch_shared: b must have x.ndim - 1 = {x.ndim - 1} dims, "
                         f"got shape {b.shape} for x {x.shape}")


@add_batch_shared.defjvp
def _add_batch_shared_jvp(primals, tangents):
    x, b = primals
    dx, db = tangents
    _check_batch_shared(x, b)
    out = x + b
    ones = jnp.ones((x.shape[0],), db.dtype)
    db = jnp.einsum("b,...->b...", ones, db, precision=jax.lax.Precision.HIGHEST)
    return out, (dx + db).astype(out.dtype)


def _relative_cumsum(inc: jax.Array, ref) -> jax.Array:
    """``u [B, L, H]`` with ``u_i - u_j = sum_{l = j+1 .. i} inc_l`` and ``u_{ref-1} = 0``:
    ``sum_{l = ref .. t} inc_l`` for ``t >= ref``, ``-sum_{l = t+1 .. ref-1} inc_l`` before
    (``ref`` may be traced). ``inc [B, L, H]``."""
    idx = jnp.arange(inc.shape[1])[None, :, None]
    fwd = jnp.cumsum(jnp.where(idx >= ref, inc, 0.0), axis=1)
    before = jnp.where(idx < ref, inc, 0.0)
    rev = jnp.flip(jnp.cumsum(jnp.flip(before, 1), axis=1), 1)  # sum_{l = t .. ref-1}
    rev = jnp.concatenate([rev[:, 1:], jnp.zeros_like(rev[:, :1])], axis=1)
    return fwd - rev


@dataclasses.dataclass(frozen=True)
class ScoreHooks:
    """One layer's score hooks (contract in :mod:`relpos.positions.base`), the layer index
    already bound: what :func:`causal_attention` evaluates on every tile of scores.

    Attributes:
      token_bias: ``c [B, Tk, H]`` float32 for the keys (queries are the last ``Tq``), so
        that logit ``(i, j) += c_i - c_j``, or a :class:`CumulativeBias` of ``c``; or None.
      logit_scale: ``(q_pos, n) -> [H, Tq] | [B, H, Tq]`` or None.
      modify_logits: ``(blk, carry) -> (logits, carry)`` or None.
      normalize: ``(blk, carry) -> (log_weights, carry)`` or None (softmax).
      owner: the scheme's name, for error messages.
    """

    token_bias: jax.Array | CumulativeBias | None = None
    logit_scale: Callable | None = None
    modify_logits: Callable | None = None
    normalize: Callable | None = None
    owner: str = "?"

    def names(self) -> list[str]:
        return [n for n in SCORE_HOOKS if getattr(self, n) is not None]


NO_HOOKS = ScoreHooks()


@dataclasses.dataclass(frozen=True)
class LayerScores:
    """A layer's position bias and score hooks together. The model hands it to
    ``observe`` as ``bias`` for a scheme with score hooks, so that
    :func:`attention_weights` computes that layer's true weights (a stick-breaking
    normaliser is not a softmax); called as ``bias(q_pos, k_pos)`` it is the position
    bias alone (zeros if there is none)."""

    bias: Bias
    hooks: ScoreHooks

    def __call__(self, q_pos, k_pos):
        b = evaluate_bias(self.bias, q_pos, k_pos)
        return jnp.zeros((1, len(q_pos), len(k_pos)), jnp.float32) if b is None else b


def _tile(q_blk, k_blk, *, bias_blk, q_pos, k_pos, q_idx, k_idx, tk, scale, inside,
          hooks: ScoreHooks, c_q, c_k, carry, window: int = 0):
    """Masked logits ``[B, H, bq, bk]`` of one tile with every score hook applied, the
    log-weights of a normaliser (None for softmax) and the hooks' new carry
    ``(modify_logits', normalize')``. ``c_q [B, bq, H]``, ``c_k [B, bk, H]``: token bias."""
    raw = jnp.einsum("bqhd,bkhd->bhqk", q_blk, k_blk, preferred_element_type=jnp.float32)
    logits = _add_bias(raw, bias_blk, scale, inside)
    if c_q is not None:
        logits = logits + (jnp.swapaxes(c_q, 1, 2)[..., :, None]
                           - jnp.swapaxes(c_k, 1, 2)[..., None, :])
    mask = _causal_mask(q_idx, k_idx) & (k_idx < tk)[None, :]
    if window:  # the hooks see the window as part of the mask (CoPE counts within it)
        mask = mask & _within(q_pos, k_pos, window)
    blk = ScoreBlock(q_blk, k_blk, raw, logits, q_pos, k_pos, q_idx, k_idx, mask, scale)
    carry_m, carry_n = carry
    if hooks.modify_logits is not None:
        logits, carry_m = hooks.modify_logits(blk, carry_m)
    if hooks.logit_scale is not None:
        n = q_idx + 1 if not window else jnp.minimum(q_idx + 1, window)  # keys attended
        f = hooks.logit_scale(q_pos, n.astype(jnp.int32)).astype(jnp.float32)
        logits = logits * (f[None] if f.ndim == 2 else f)[..., None]
    logits = jnp.where(mask, logits, -jnp.inf)
    log_w = None
    if hooks.normalize is not None:
        log_w, carry_n = hooks.normalize(dataclasses.replace(blk, logits=logits), carry_n)
        log_w = jnp.where(mask, log_w, -jnp.inf)
    return logits, log_w, (carry_m, carry_n)


def _weights(logits, log_w):
    """Attention weights of one dense tile: softmax, or a normaliser's ``exp(log_w)``."""
    return jax.nn.softmax(logits, axis=-1) if log_w is None else jnp.exp(log_w)


def _hooked_dense(q, k, v, *, bias, q_pos, k_pos, scale, bias_inside_scale, hooks,
                  query_block: int, max_query_blocks: int | None, weights_only=False,
                  window: int = 0):
    """Dense path for a layer with score hooks: per causal query block (as
    :func:`dense_attention`), one tile over all its keys, ``carry=None``."""
    b_, tq, h, d = q.shape
    tk = k.shape[1]
    offset = tk - tq
    bias_full = evaluate_bias(bias, q_pos, k_pos)
    c = hooks.token_bias
    if max_query_blocks is None:
        max_query_blocks = 8 if jax.default_backend() == "cpu" else 1
    blocks = 1 if weights_only else max(1, min(max_query_blocks, tq // max(query_block, 1)))
    size = -(-tq // blocks)
    outs = []
    for start in range(0, tq, size):
        stop = min(start + size, tq)
        keys = stop + offset
        bb = None if bias_full is None else bias_full[..., start:stop, :keys]
        cb = c  # the token bias over keys [0, keys), relative to this block's first query
        if isinstance(c, CumulativeBias):
            cb = _relative_cumsum(c.increments[:, :keys].astype(jnp.float32), offset + start)
        logits, log_w, _ = _tile(
            q[:, start:stop], k[:, :keys], bias_blk=bb, q_pos=q_pos[..., start:stop],
            k_pos=k_pos[..., :keys], q_idx=jnp.arange(start, stop) + offset,
            k_idx=jnp.arange(keys), tk=tk, scale=scale, inside=bias_inside_scale, hooks=hooks,
            c_q=None if cb is None else cb[:, offset + start:offset + stop],
            c_k=None if cb is None else cb[:, :keys], carry=(None, None), window=window)
        w = _weights(logits, log_w)
        if weights_only:
            if log_w is not None:  # the remainder sits on the query's own key
                rest = 1.0 - w.sum(-1)
                eye = jnp.arange(keys)[None, :] == (jnp.arange(start, stop) + offset)[:, None]
                w = w + rest[..., None] * eye
            return jnp.pad(w, [(0, 0)] * 3 + [(0, tk - keys)])
        out = jnp.einsum("bhqk,bkhd->bqhd", w.astype(v.dtype), v[:, :keys],
                         preferred_element_type=jnp.float32)
        if log_w is not None:
            rest = jnp.swapaxes(1.0 - w.sum(-1), 1, 2)  # [B, bq, H]
            out = out + rest[..., None] * v[:, offset + start:offset + stop].astype(jnp.float32)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return out.astype(q.dtype)


def dense_attention(q, k, v, *, bias, q_pos, k_pos, scale, bias_inside_scale=False,
                    query_block: int = 64, max_query_blocks: int | None = None,
                    hooks: ScoreHooks | None = None, window: int = 0):
    """Reference path. q: [B, Tq, H, d]; k, v: [B, Tk, H, d] -> [B, Tq, H, d].

    Queries are processed in up to ``max_query_blocks`` static blocks (of at least
    ``query_block`` rows), each attending only to keys up to its last query, so the
    scores of whole future blocks are never computed: (n + 1) / 2n of the full ``T x T``
    work for n blocks (0.62 at T = 256) and 0.68x the attention time of one unblocked
    softmax on CPU (benchmarks/README.md). Every block is an exact dense softmax.
    ``max_query_blocks=None``: 8 on CPU, 1 elsewhere (on GPU the extra kernels have not
    been measured against the saved work yet). With score ``hooks`` the same blocks go
    through :func:`_tile` (the hooks need the unmasked logits)."""
    if hooks is not None and hooks.names():
        return _hooked_dense(q, k, v, bias=bias, q_pos=q_pos, k_pos=k_pos, scale=scale,
                             bias_inside_scale=bias_inside_scale, hooks=hooks,
                             query_block=query_block, max_query_blocks=max_query_blocks,
                             window=window)
    tq, tk = q.shape[1], k.shape[1]
    offset = tk - tq
    # The causal mask and the bias fold into one additive [.., Tq, Tk] term, and the
    # einsums run in [B, H, T, d] layout: 0.94-0.96x step time on CPU (benchmarks/).
    mask = _causal_mask(jnp.arange(tq) + offset, jnp.arange(tk))
    if window:
        mask = mask & _within(q_pos, k_pos, window)
    add = jnp.where(mask, 0.0, -jnp.inf).astype(jnp.float32)
    b = evaluate_bias(bias, q_pos, k_pos)
    if b is not None:
        add = add + (b * scale if bias_inside_scale else b)
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, T, d]
    if max_query_blocks is None:
        max_query_blocks = 8 if jax.default_backend() == "cpu" else 1
    blocks = max(1, min(max_query_blocks, tq // max(query_block, 1)))
    size = -(-tq // blocks)
    outs = []
    for start in range(0, tq, size):
        stop = min(start + size, tq)
        keys = stop + offset  # keys beyond the block's last query are all masked
        s = jnp.einsum("bhqd,bhkd->bhqk", qh[:, :, start:stop], kh[:, :, :keys],
                       preferred_element_type=jnp.float32) * scale
        a = add[..., start:stop, :keys]
        s = add_batch_shared(s, a) if a.ndim == 3 else s + a
        probs = jax.nn.softmax(s, axis=-1)
        outs.append(jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), vh[:, :, :keys],
                               preferred_element_type=jnp.float32))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def attention_weights(q, k, *, bias, q_pos, k_pos, scale, bias_inside_scale=False,
                      window: int = 0):
    """The dense causal attention weights ``[B, H, Tq, Tk]`` fp32 (what
    :func:`dense_attention` multiplies the values by), for diagnostics such as the
    attention mass on keys beyond the training length. ``bias`` may be a
    :class:`LayerScores` (a layer with score hooks): then the hooks apply, and a
    normaliser's remainder is placed on the query's own key so that rows sum to one.
    Quadratic memory."""
    q_pos, k_pos = jnp.asarray(q_pos), jnp.asarray(k_pos)
    if isinstance(bias, LayerScores):
        return _hooked_dense(q, k, None, bias=bias.bias, q_pos=q_pos, k_pos=k_pos,
                             scale=scale, bias_inside_scale=bias_inside_scale,
                             hooks=bias.hooks, query_block=1, max_query_blocks=1,
                             weights_only=True, window=window)
    tq, tk = q.shape[1], k.shape[1]
    mask = _causal_mask(jnp.arange(tq) + tk - tq, jnp.arange(tk))
    if window:
        mask = mask & _within(q_pos, k_pos, window)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    s = _add_bias(s, evaluate_bias(bias, q_pos, k_pos), scale, bias_inside_scale)
    return jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)


def _pad_to(x: jax.Array, axis: int, multiple: int, mode: str = "constant"):
    n = x.shape[axis]
    pad = (-n) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, mode=mode)


def blockwise_attention(q, k, v, *, bias, q_pos, k_pos, scale, bias_inside_scale=False,
                        block_q: int = 512, block_k: int = 512,
                        hooks: ScoreHooks | None = None, window: int = 0):
    """Online-softmax attention over key blocks; never materialises ``[Tq, Tk]``.

    The bias callable is evaluated per (query block, key block) from the blocks'
    positions, so an offset table, T5 buckets or a FIRE MLP cost memory linear in
    length. A dense bias array is sliced per block instead. Key blocks wholly in the
    causal future of a query block are skipped (``lax.cond`` runs one branch).

    Key blocks are visited from the last to the first (the online softmax does not
    depend on the order), so a score hook's carry holds its sums over the keys to the
    right of the current block: CoPE's ``sum_{t=j..i} g_it`` and stick-breaking's
    ``sum_{j<k<=i} log(1 - sigmoid(z_ik))`` cross block boundaries in ``[B, H, block_q]``
    carries. A normaliser's weights are accumulated unnormalised (no running max: its
    log-weights are <= 0 by contract of a partition of the unit mass).
    """
    hooks = NO_HOOKS if hooks is None else hooks
    b, tq, h, d = q.shape
    tk = k.shape[1]
    offset = tk - tq
    q_pos = jnp.asarray(q_pos, jnp.int32)
    k_pos = jnp.asarray(k_pos, jnp.int32)
    # Pad to whole blocks; padded positions repeat the last one so biases stay finite.
    qp = _pad_to(q, 1, block_q)
    kp = _pad_to(k, 1, block_k)
    vp = _pad_to(v, 1, block_k)
    q_pos_p = _pad_to(q_pos, q_pos.ndim - 1, block_q, mode="edge")
    k_pos_p = _pad_to(k_pos, k_pos.ndim - 1, block_k, mode="edge")
    nq, nk = qp.shape[1] // block_q, kp.shape[1] // block_k
    dense_bias = None if (bias is None or callable(bias)) else jnp.asarray(bias, jnp.float32)
    if dense_bias is not None:
        dense_bias = _pad_to(_pad_to(dense_bias, dense_bias.ndim - 2, block_q), -1, block_k)
    c = hooks.token_bias
    cumulative = isinstance(c, CumulativeBias)
    if cumulative:  # increments up to every padded query and key index (zeros beyond)
        inc = c.increments.astype(jnp.float32)
        length = max(kp.shape[1], offset + qp.shape[1])
        inc = jnp.pad(inc, [(0, 0), (0, length - tk), (0, 0)])
    elif c is not None:
        c = jnp.asarray(c, jnp.float32)
        c_qp = _pad_to(c[:, offset:], 1, block_q, mode="edge")
        c_kp = _pad_to(c, 1, block_k, mode="edge")

    def block_bias(qi, kj):
        if bias is None:
            return None
        if dense_bias is not None:
            starts = [0] * (dense_bias.ndim - 2) + [qi * block_q, kj * block_k]
            sizes = list(dense_bias.shape[:-2]) + [block_q, block_k]
            return jax.lax.dynamic_slice(dense_bias, starts, sizes)
        qpos = jax.lax.dynamic_slice_in_dim(q_pos_p, qi * block_q, block_q, axis=-1)
        kpos = jax.lax.dynamic_slice_in_dim(k_pos_p, kj * block_k, block_k, axis=-1)
        return evaluate_bias(bias, qpos, kpos)

    def tile(qi, kj, carry, u=None):
        q_blk = jax.lax.dynamic_slice_in_dim(qp, qi * block_q, block_q, axis=1)
        k_blk = jax.lax.dynamic_slice_in_dim(kp, kj * block_k, block_k, axis=1)
        sl = lambda x, i, n: jax.lax.dynamic_slice_in_dim(x, i * n, n, axis=1)
        return _tile(
            q_blk, k_blk, bias_blk=block_bias(qi, kj),
            q_pos=jax.lax.dynamic_slice_in_dim(q_pos_p, qi * block_q, block_q, axis=-1),
            k_pos=jax.lax.dynamic_slice_in_dim(k_pos_p, kj * block_k, block_k, axis=-1),
            q_idx=qi * block_q + jnp.arange(block_q) + offset,
            k_idx=kj * block_k + jnp.arange(block_k), tk=tk, scale=scale,
            inside=bias_inside_scale, hooks=hooks,
            c_q=(jax.lax.dynamic_slice_in_dim(u, qi * block_q + offset, block_q, axis=1)
                 if cumulative else None if c is None else sl(c_qp, qi, block_q)),
            c_k=(sl(u, kj, block_k) if cumulative else None if c is None
                 else sl(c_kp, kj, block_k)), carry=carry, window=window)

    normalize = hooks.normalize is not None

    def one_query_block(qi):
        last_q = jnp.minimum(qi * block_q + block_q - 1, tq - 1) + offset
        # a cumulative token bias relative to the block's first query (linear memory)
        u = _relative_cumsum(inc, qi * block_q + offset) if cumulative else None

        def attend(carry, kj):
            m_prev, l_prev, acc, hook_carry = carry
            v_blk = jax.lax.dynamic_slice_in_dim(vp, kj * block_k, block_k, axis=1)
            s, log_w, hook_carry = tile(qi, kj, hook_carry, u)
            if normalize:
                p = jnp.exp(log_w)
                pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), v_blk,
                                preferred_element_type=jnp.float32)
                return m_prev, l_prev + p.sum(axis=-1), acc + pv, hook_carry
            m_new = jnp.maximum(m_prev, s.max(axis=-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m_prev - m_safe)
            l_new = l_prev * corr + p.sum(axis=-1)
            pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), v_blk,
                            preferred_element_type=jnp.float32)
            return m_new, l_new, acc * corr[..., None] + pv, hook_carry

        def step(carry, kj):
            needed = kj * block_k <= last_q
            return jax.lax.cond(needed, attend, lambda c, _: c, carry, kj), None

        # the hooks' carry: zeros of what they return for one tile (None: no carry)
        shapes = jax.eval_shape(lambda: tile(qi, 0, (None, None), u)[2])
        hook_init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        init = (jnp.full((b, h, block_q), -jnp.inf, jnp.float32),
                jnp.zeros((b, h, block_q), jnp.float32),
                jnp.zeros((b, h, block_q, d), jnp.float32), hook_init)
        (_, l, acc, _), _ = jax.lax.scan(step, init, jnp.arange(nk), reverse=True)
        out = acc if normalize else acc / jnp.where(l == 0, 1.0, l)[..., None]
        # [B, block_q, H, d] and [B, block_q, H]
        return jnp.transpose(out, (0, 2, 1, 3)), jnp.transpose(l, (0, 2, 1))

    out, l = jax.lax.map(one_query_block, jnp.arange(nq))  # [nq, B, block_q, H, (d)]
    out = jnp.transpose(out, (1, 0, 2, 3, 4)).reshape(b, nq * block_q, h, d)[:, :tq]
    if normalize:  # the remainder of the unit mass goes to the query's own value
        l = jnp.transpose(l, (1, 0, 2, 3)).reshape(b, nq * block_q, h)[:, :tq]
        out = out + (1.0 - l)[..., None] * v[:, offset:].astype(jnp.float32)
    return out.astype(q.dtype)


def cudnn_attention(q, k, v, *, bias, q_pos, k_pos, scale, bias_inside_scale=False):
    """Fused cuDNN path (GPU, bf16/fp16). The bias travels as a dense half array."""
    dense = evaluate_bias(bias, q_pos, k_pos)
    if dense is not None:
        if bias_inside_scale:  # (qk + b) * s == qk * s + b * s
            dense = dense * scale
        dense = (dense if dense.ndim == 4 else dense[None]).astype(q.dtype)
    if q.shape[1] != k.shape[1]:
        raise ValueError("cudnn path needs Tq == Tk (self-attention over one window)")
    return jax.nn.dot_product_attention(q, k, v, bias=dense, scale=scale, is_causal=True,
                                        implementation="cudnn")


def causal_attention(q, k, v, *, q_pos, k_pos, bias: Bias = None, scale: float | None = None,
                     bias_inside_scale: bool = False, impl: str = "auto",
                     block_size: int = 512, dense_max_len: int = 2048,
                     hooks: ScoreHooks | None = None, window: int = 0):
    """Causal attention with an additive position bias.

    Args:
      q: ``[B, Tq, H, d]``; k, v: ``[B, Tk, H, d]`` with ``Tq <= Tk``.
      q_pos, k_pos: integer positions ``[T]`` (shared by the batch) or ``[B, T]``.
      bias: None, an array ``[H|B,H, Tq, Tk]``, or a callable ``(q_pos, k_pos) ->
        [H, len(q_pos), len(k_pos)]`` (evaluated per block on the blockwise path).
      scale: logit scale, default ``1/sqrt(d)``.
      impl: ``auto | dense | blockwise | cudnn | flash`` (see :func:`choose_impl`; under
        ``auto`` any bias is treated as learned, so cuDNN is used for it only after its
        bias gradient passed :func:`cudnn_bias_grad_ok`). ``flash`` takes the bias as a
        :class:`relpos.nn.flash.KernelBias` (:func:`relpos.nn.flash.kernel_bias` of a
        scheme) or a scheme's bound ``bias`` method (converted so), with gradients for the
        scheme's parameters; it refuses a dense bias array.
      hooks: a layer's :class:`ScoreHooks` (dense and blockwise evaluate all of them,
        flash the token bias only; ``auto`` never picks cuDNN for them, and
        ``impl="cudnn"`` refuses them).
      window: > 0: keys at offsets ``q_pos - k_pos >= window`` are masked as the future
        is (dense, blockwise and flash; the hooks see it in their mask); 0: none.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # A direct caller's bias may be learned (a gradient flows into it): under auto it
    # takes cuDNN only where cuDNN's bias gradient was checked (TransformerLM knows
    # whether its bias is learned and resolves auto itself).
    impl = choose_impl(impl, length=k.shape[1], dtype=q.dtype, dense_max_len=dense_max_len,
                       learned_bias=bias is not None,
                       batched_bias=jnp.ndim(q_pos) == 2 or jnp.ndim(k_pos) == 2,
                       head_dim=q.shape[-1],
                       score_hooks=bool(hooks and hooks.names()) or bool(window))
    if impl == "cudnn" and hooks is not None and hooks.names():
        raise ValueError(f"attention impl 'cudnn' cannot evaluate the {', '.join(hooks.names())} "
                         f"hook of position scheme {hooks.owner!r}; use impl dense or "
                         f"blockwise (auto picks one)")
    if impl == "cudnn" and window:
        raise ValueError(f"attention impl 'cudnn' has no attention window (window={window}); "
                         "use impl dense or blockwise")
    if impl == "flash":
        return _flash(q, k, v, q_pos=q_pos, k_pos=k_pos, bias=bias, scale=scale,
                      bias_inside_scale=bias_inside_scale, hooks=hooks, window=window)
    if isinstance(bias, flash.KernelBias):
        raise ValueError(f"a flash KernelBias (scheme {bias.owner!r}) needs impl 'flash'; got "
                         f"impl {impl!r}")
    kw = dict(bias=bias, q_pos=jnp.asarray(q_pos), k_pos=jnp.asarray(k_pos), scale=scale,
              bias_inside_scale=bias_inside_scale)
    if impl == "dense":
        return dense_attention(q, k, v, hooks=hooks, window=window, **kw)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, block_q=block_size, block_k=block_size,
                                   hooks=hooks, window=window, **kw)
    return cudnn_attention(q, k, v, **kw)


def _flash(q, k, v, *, q_pos, k_pos, bias, scale, bias_inside_scale, hooks, window=0):
    """Dispatch to :func:`relpos.nn.flash.flash_attention` (refusing what it cannot do)."""
    if hooks is not None and hooks.names():
        reason = flash.unsupported_score_hooks(hooks.names(), hooks.owner)
        if reason:
            raise ValueError(reason)
    if bias is not None and not isinstance(bias, flash.KernelBias):
        if not callable(bias):
            raise ValueError("attention impl 'flash' computes the bias from positions in the "
                             "kernel; a dense bias array needs impl dense, blockwise or cudnn")
        scheme = getattr(bias, "__self__", None)  # a scheme's bound bias method
        if scheme is None or getattr(scheme, "bias", None) != bias:
            raise ValueError("attention impl 'flash' takes the bias as a scheme's bias method "
                             "or relpos.nn.flash.kernel_bias(scheme); got another callable")
        bias = flash.kernel_bias(scheme, q.shape[2], (q_pos, k_pos))
    return flash.flash_attention(
        q, k, v, q_pos=q_pos, k_pos=k_pos, bias=bias, scale=scale,
        bias_inside_scale=bias_inside_scale,
        token_bias=None if hooks is None else hooks.token_bias, window=window)
