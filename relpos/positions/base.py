"""Base class and shared helpers for position schemes.

A scheme implements any of three hooks:

* ``embed(positions) -> [..., T, D]`` added to the token embeddings;
* ``rotate(q, k, q_pos, k_pos) -> (q, k)`` applied to queries and keys
  (q, k: ``[B, T, H, d]``);
* ``bias(q_pos, k_pos) -> [H, Tq, Tk]`` float32 additive attention-logit bias.

Positions are explicit integer vectors, never implied by array index, so the same
code serves blockwise attention, sliding windows and randomized positions.
The model discovers hooks by attribute (``callable(getattr(scheme, "bias", None))``),
so an out-of-tree scheme needs no base class; subclassing :class:`PositionScheme`
only documents intent.
"""

from __future__ import annotations

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
