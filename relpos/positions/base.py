"""Base class and shared helpers for position schemes.

A scheme implements any of these hooks. Three act on positions alone:

* ``embed(positions) -> [..., T, D]`` added to the token embeddings;
* ``rotate(q, k, q_pos, k_pos) -> (q, k)`` applied to queries and keys
  (q, k: ``[B, T, H, d]``);
* ``bias(q_pos, k_pos) -> [H, Tq, Tk]`` float32 additive attention-logit bias.

Four read the content or change the softmax; each is called in every layer with that
layer's index ``layer`` (a scheme shared by all layers can tell them apart):

* ``token_bias(x, positions, layer) -> c [B, T, H]``: a separable per-token bias from the
  layer's attention input ``x [B, T, D]`` (after its LayerNorm); logit ``(i, j) += c_i -
  c_j``. Linear memory on every path (FoX). A cumulative ``c`` may be returned as its
  increments, :class:`CumulativeBias` ``(d)`` (``c = cumsum(d)`` along T): both
  paths then sum ``c_i - c_j`` relative to each query block, which keeps fp32 precision
  for nearby tokens when ``c`` grows large.
* ``logit_scale(q_pos, n, layer) -> [H, Tq]`` or ``[B, H, Tq]``: a multiplier of every
  logit of query i, which attends to ``n_i`` keys (``n [Tq]`` int32, by index; SSMax).
* ``modify_logits(blk, carry, layer) -> (logits, carry)``: any function of one block of
  scores (a :class:`ScoreBlock`), returning the block's new logits ``[B, H, bq, bk]``.
  ``carry`` is what the hook returned for the key blocks to the *right* of this one (later
  keys, the same queries), ``None`` for the first block a query row sees; quantities
  summed along the key axis from the query backwards (CoPE's gate sums) travel in it.
  Blockwise attention visits key blocks from the last to the first, so that a sum over
  keys j..i is the block's own reverse cumulative sum plus the carry; dense attention
  makes one call per query block, with ``carry=None``.
* ``normalize(blk, carry, layer) -> (log_weights, carry)``: replaces the softmax. Returns
  the log attention weights of the block (``-inf`` where ``blk.mask`` is False), the same
  reverse carry as above. The output is ``sum_j w_ij v_j + (1 - sum_j w_ij) v_i``: what
  the weights leave of a unit mass goes to the query's own value (stick-breaking's
  remainder; zero for weights that sum to one).

Order within a block: ``raw * scale + bias (+ c_i - c_j)`` -> ``modify_logits`` ->
``* logit_scale`` -> causal mask -> softmax or ``normalize``. A hook sees unmasked,
finite values; it must ignore entries where ``blk.mask`` is False (future keys, padding).

Positions are explicit integer vectors, never implied by array index, so the same
code serves blockwise attention, sliding windows and randomized positions.
The model discovers hooks by attribute (``callable(getattr(scheme, "bias", None))``),
so an out-of-tree scheme needs no base class; subclassing :class:`PositionScheme`
only documents intent.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from relpos.errors import (  # noqa: F401  re-exported: schemes import them from here
    RelposConfigError,
    check_choice,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
)

try:  # public alias; moved in some JAX versions
    from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer


@dataclasses.dataclass(frozen=True)
class CumulativeBias:
    """A token bias given by its increments: ``c_t = sum_{l <= t} increments_l``
    (``[B, T, H]``), what a ``token_bias`` hook may return instead of ``c`` itself (FoX).

    Why: a cumulative sum reaches hundreds in magnitude (FoX's log forget gates sum to
    ~ -870 over 1024 tokens), where fp32 keeps ~6e-5 absolute; ``c_i - c_j`` of nearby
    tokens (the pairs the softmax weighs) then carries that error, and its gradient, a
    reverse cumulative sum of row and column sums over the whole window, amplifies the
    rounding of every entry by the window length (dense and blockwise gate gradients
    2.3e-4 and 6.8e-4 from float64 at T = 1024). From the increments each path sums
    ``c_i - c_j = sum_{l = j+1 .. i} increments_l`` relative to the first query of each
    query block (:func:`_relative_cumsum`): the subtracted numbers are those sums
    themselves, and a gradient crosses at most one block of queries."""

    increments: jax.Array

    def astype(self, dtype) -> CumulativeBias:
        return CumulativeBias(self.increments.astype(dtype))


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["q", "k", "raw", "logits", "q_pos", "k_pos", "q_idx", "k_idx",
                                "mask"],
                   meta_fields=["scale"])
@dataclasses.dataclass(frozen=True)
class ScoreBlock:
    """One (query block, key block) tile of a layer's attention, as score hooks see it.

    Attributes:
      q: queries ``[B, bq, H, d]`` (rotated, if the scheme rotates); k: keys ``[B, bk, H, d]``.
      raw: ``q . k`` ``[B, H, bq, bk]`` float32, unscaled.
      logits: the logits so far, ``raw * scale`` plus bias and token bias, float32.
      q_pos, k_pos: positions ``[bq]``/``[bk]`` or ``[B, bq]``/``[B, bk]``.
      q_idx, k_idx: int32 indices ``[bq]``, ``[bk]`` of the tile's queries and keys along
        the key axis (causality is by index: key j is visible to query i iff j <= i).
      mask: ``[bq, bk]`` bool, True where key j is visible to query i (causal, in range).
      scale: the logit scale (``1/sqrt(d)``).
    """

    q: jax.Array
    k: jax.Array
    raw: jax.Array
    logits: jax.Array
    q_pos: jax.Array
    k_pos: jax.Array
    q_idx: jax.Array
    k_idx: jax.Array
    mask: jax.Array
    scale: float


#: hooks called once per layer with the layer index (see the module docstring)
LAYER_HOOKS = ("bias", "token_bias", "logit_scale", "modify_logits", "normalize")
#: hooks that only dense and blockwise attention can evaluate
SCORE_HOOKS = ("token_bias", "logit_scale", "modify_logits", "normalize")


def reverse_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    """``y_j = sum_{k >= j} x_k`` along ``axis`` (a true reverse sum: no subtraction, so
    its rounding error scales with the partial sums, not with the total)."""
    return jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis=axis), axis)


class PositionTable(nnx.Param):
    """A learned position table (per offset, per T5 bucket, or per absolute position).

    A distinct Variable type so that the optimiser can exclude these tables from weight
    decay (AdamW pulls rarely-trained rows, such as the largest offsets, towards zero).
    """


class PositionScheme(nnx.Module):
    """Marker base class. Subclasses implement one or more of embed/rotate/bias."""

    #: the registry name; set by :func:`relpos.positions.register`.
    name: str = ""


def relative_offsets(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Offsets ``o = i - j`` as int32 ``[Tq, Tk]`` for query i, key j."""
    q_pos = jnp.asarray(q_pos, jnp.int32)
    k_pos = jnp.asarray(k_pos, jnp.int32)
    return q_pos[:, None] - k_pos[None, :]


def causal_distance(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """``max(i - j, 0)`` as int32 ``[Tq, Tk]``.

    Pairs with j > i are removed by the causal mask; clamping them to distance 0 keeps
    every formula finite there (a NaN under a mask still poisons gradients).
    """
    return jnp.maximum(relative_offsets(q_pos, k_pos), 0)


def is_concrete(x) -> bool:
    """True if ``x`` holds values known now (not a tracer inside jit)."""
    return not isinstance(x, _Tracer)


def sinusoidal_frequencies(dim: int, base: float = 10000.0) -> tuple[float, ...]:
    """``1 / base^(2k/dim)`` for k = 0 .. dim/2 - 1, as Python floats (double precision)."""
    return tuple(base ** (-2.0 * k / dim) for k in range(dim // 2))


# offset policy -> (jnp.take mode, fill value for indices past the table)
_TAKE_MODES = {"clip": ("clip", None), "zero": ("fill", 0.0), "error": ("fill", math.nan),
               "mask": ("fill", -math.inf)}


def take_with_policy(table: jax.Array, index: jax.Array, *, axis: int, policy: str) -> jax.Array:
    """Gather ``table`` along ``axis`` at non-negative ``index``; indices past the end
    follow ``policy`` (clip: last entry, zero: 0, error: NaN, mask: -inf)."""
    mode, fill = _TAKE_MODES[policy]
    if fill is None:
        return jnp.take(table, index, axis=axis, mode=mode)
    return jnp.take(table, index, axis=axis, mode=mode, fill_value=fill)
