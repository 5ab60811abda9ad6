"""Base class and shared helpers for position schemes.

A scheme implements any of three hooks (see DESIGN.md):

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
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from relpos.errors import RelposError

try:  # public alias; moved in some JAX versions
    from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer


class RelposConfigError(RelposError, ValueError):
    """A bad option: the message names the option and the valid values."""


class PositionTable(nnx.Param):
    """A learned position table (per offset, per T5 bucket, or per absolute position).

    A distinct Variable type so that the optimiser can exclude these tables from weight
    decay (AdamW pulls rarely-trained rows, such as the largest offsets, towards zero).
    """


class PositionScheme(nnx.Module):
    """Marker base class. Subclasses implement one or more of embed/rotate/bias."""

    #: the registry name; set by :func:`relpos.positions.register`.
    name: str = ""


def check_positive_int(option: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int,)) or value < minimum:
        raise RelposConfigError(
            f"{option} must be an integer >= {minimum}, got {value!r}"
        )
    return int(value)


def check_positive_float(option: str, value, *, allow_zero: bool = False) -> float:
    what = "a number >= 0" if allow_zero else "a positive number"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RelposConfigError(f"{option} must be {what}, got {value!r}") from None
    if not ((v >= 0 if allow_zero else v > 0) and math.isfinite(v)):
        finite = "a finite number >= 0" if allow_zero else "a positive finite number"
        raise RelposConfigError(f"{option} must be {finite}, got {value!r}")
    return v


def check_nonnegative_float(option: str, value) -> float:
    return check_positive_float(option, value, allow_zero=True)


def check_choice(option: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise RelposConfigError(
            f"{option} must be one of {', '.join(map(repr, choices))}; got {value!r}"
        )
    return value


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
