"""ALiBi and Hard-ALiBi.

ALiBi: attention with linear biases (Press et al., ICLR 2022, arXiv 2108.12409).

``b_h(i, j) = -m_h * (i - j)`` with a fixed slope per head. For a power-of-two head
count ``H`` the slopes are ``m_h = 2^(-8h/H)``, h = 1..H; otherwise, as in the
official ``get_slopes`` of ofirpress/attention_with_linear_biases, the slopes of the
closest lower power of two ``c`` are followed by every other slope of ``2c``.
Written here in the ``-(i - j)`` form; the official code's ``m * j`` form differs by a
per-query constant, which the softmax ignores (tested).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from relpos.positions.base import (
    PositionScheme,
    RelposConfigError,
    causal_distance,
    check_positive_int,
)
from relpos.positions.registry import register


def alibi_slopes(num_heads: int) -> list[float]:
    """Per-head slopes, ordered head 1..H (largest slope first)."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]


def alibi_bias(q_pos: jax.Array, k_pos: jax.Array, slopes: jax.Array) -> jax.Array:
    """``[H, Tq, Tk]`` float32 bias ``-m_h * max(i - j, 0)``."""
    dist = causal_distance(q_pos, k_pos).astype(jnp.float32)
    return -jnp.asarray(slopes, jnp.float32)[:, None, None] * dist[None]


@register("alibi")
class ALiBi(PositionScheme):
    """Fixed linear distance penalty; no parameters, no position embeddings."""

    def __init__(self, *, num_heads: int, head_dim: int, rngs=None):
        del head_dim, rngs
        check_positive_int("num_heads", num_heads)
        # A tuple of Python floats: static, hashable, constant-folded under jit.
        self.slopes = tuple(alibi_slopes(num_heads))

    def bias(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        return alibi_bias(q_pos, k_pos, jnp.asarray(self.slopes, jnp.float32))


def hard_alibi_windows(num_heads: int, num_masked_heads: int) -> tuple[int, ...]:
    """Per-head window (number of most recent keys attended, the query's own included):
    ``h + 1`` for the first ``num_masked_heads`` heads, 0 (no limit) for the rest."""
    return tuple(h + 1 if h < num_masked_heads else 0 for h in range(num_heads))


def hard_alibi_bias(q_pos: jax.Array, k_pos: jax.Array, windows) -> jax.Array:
    """``[H, Tq, Tk]`` float32: ``-inf`` where ``i - j >= window_h`` (heads with a window),
    0 elsewhere."""
    dist = causal_distance(q_pos, k_pos)[None]
    w = jnp.asarray(windows, jnp.int32)[:, None, None]
    return jnp.where((w > 0) & (dist >= w), -jnp.inf, 0.0).astype(jnp.float32)


@register("hard_alibi")
class HardALiBi(PositionScheme):
    """Hard-ALiBi (Jelassi et al., ICML 2024, arXiv 2402.01032, "Repeat After Me:
    Transformers are Better than State Space Models at Copying"; official code
    sjelassi/transformers_ssm_copy, ``synthetic_exps/models/hard_alibi_model.py``).

    Head ``h < num_masked_heads`` attends only to the last ``h + 1`` keys (offsets
    ``0..h``; the official builds the same band of zeros in a mask of ``finfo.min``);
    the other heads get no position information (NoPE). A plain ``bias`` of 0 and
    ``-inf``, so every attention path evaluates it. Rows never empty out: offset 0 is in
    every window.

    Options:
      num_masked_heads: heads with a window; default (None) half of them, as the
        official default (8 of 16).
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs=None,
                 num_masked_heads: int | None = None):
        del head_dim, rngs
        h = check_positive_int("num_heads", num_heads)
        m = h // 2 if num_masked_heads is None else int(num_masked_heads)
        if not 0 <= m <= h:
            raise RelposConfigError(
                f"hard_alibi num_masked_heads must lie in 0..num_heads={h}, "
                f"got {num_masked_heads!r}")
        self.windows = hard_alibi_windows(h, m)

    def bias(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        return hard_alibi_bias(q_pos, k_pos, self.windows)
