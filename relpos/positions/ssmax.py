"""SSMax: scalable softmax (Nakanishi, 2025, arXiv 2501.19399, "Scalable-Softmax Is
Superior for Attention"). No official code is published; the formula is the paper's.

The softmax over the ``n`` keys a query attends to is taken of logits multiplied by
``s_h log n``: ``softmax((s_h log n) z)``, so that the largest weight does not fade as
``n`` grows. ``s_h`` is learned per head (and per layer with ``share_position=false``).
A ``logit_scale`` hook: ``n_i`` is the query's causal key count (index + 1), known per
query on every attention path, so blockwise attention is unchanged otherwise.

Initialisation: ``s = 0.43`` (the value the paper uses to illustrate SSMax, Fig. 1);
the paper does not state an initial value for the learned ``s``. Its variant with an
additive ``b`` (``s log n + b``) is not implemented (it reports that the bias hurts length
generalisation). At ``n = 1`` the scale is 0, harmless: a single key gets weight 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from relpos.positions.base import PositionScheme, check_positive_int
from relpos.positions.registry import register


def ssmax_scale(s: jax.Array, n: jax.Array) -> jax.Array:
    """``[H, Tq]`` multipliers ``s_h log n_i``."""
    return s[:, None] * jnp.log(jnp.asarray(n, jnp.float32))[None, :]


@register("ssmax")
class SSMax(PositionScheme):
    """Scalable softmax (see the module docstring).

    Options:
      s_init: initial ``s`` of every head.
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs=None, s_init: float = 0.43):
        del head_dim, rngs
        self.s = nnx.Param(jnp.full((check_positive_int("num_heads", num_heads),),
                                    float(s_init), jnp.float32))

    def logit_scale(self, q_pos: jax.Array, n: jax.Array, layer: int) -> jax.Array:
        del q_pos, layer
        return ssmax_scale(self.s[...], n)
