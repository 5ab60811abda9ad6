"""Stick-breaking attention (Tan et al., ICLR 2025, arXiv 2410.17980, "Scaling
Stick-Breaking Attention"; official code shawntan/stickbreaking-attention,
``stickbreaking_attention/sb_ref.py`` and ``tests/test_attn.py``).

No softmax: with scaled scores ``z_ij = q_i . k_j / sqrt(d)`` (plus any bias), each key
from the query backwards breaks off a share of what is left of a unit stick::

    A_ij = sigmoid(z_ij) * prod_{j < k <= i} (1 - sigmoid(z_ik))
    log A_ij = log sigmoid(z_ij) - sum_{j < k <= i} softplus(z_ik)

and the output is ``sum_j A_ij v_j + (1 - sum_j A_ij) v_i``: the official reference test
adds the remainder to the query's own value (``o + rem[..., None] * v``), which is the
normaliser contract of :mod:`relpos.positions.base`. ``attend_current=True`` (default, the
issue's formula) lets a query attend to itself (keys ``j <= i``); ``False`` is the
official kernel's default (keys ``j < i``, products over ``j < k < i``; the current token
then gets only the remainder).

The sum over ``k`` is a reverse cumulative sum along the key axis; as a ``normalize`` hook
its carry is ``sum_k log(1 - sigmoid(z_ik))`` over the key blocks to the right, so
blockwise attention evaluates it in memory linear in length. The official reference
fills masked log-weights with -1e5; here they are -inf (weight exactly 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from relpos.positions.base import PositionScheme, ScoreBlock, reverse_cumsum
from relpos.positions.registry import register


def stick_breaking_log_weights(z: jax.Array, visible: jax.Array, carry: jax.Array | None):
    """``log A`` of one block of logits ``z [..., bq, bk]`` (keys ``visible`` ``[bq, bk]``)
    given ``carry [..., bq]`` = ``sum log(1 - sigmoid(z_ik))`` over the keys right of the
    block; returns ``(log_weights, carry')``. Invisible entries: -inf."""
    zs = jnp.where(visible, z, 0.0)  # finite everywhere, so no NaN reaches the gradient
    log_beta = jnp.where(visible, jax.nn.log_sigmoid(-zs), 0.0)
    # sum over keys strictly right of j: the reverse cumsum shifted by one key
    right = reverse_cumsum(log_beta, axis=-1)
    right = jnp.concatenate([right[..., 1:], jnp.zeros_like(right[..., :1])], axis=-1)
    total = log_beta.sum(-1)
    if carry is not None:
        right, total = right + carry[..., None], total + carry
    return jnp.where(visible, jax.nn.log_sigmoid(zs) + right, -jnp.inf), total


@register("stickbreaking")
class StickBreaking(PositionScheme):
    """Stick-breaking attention weights in place of the softmax (see the module docstring).

    Options:
      attend_current: whether a query's own key takes part (official kernel default: False).
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs=None,
                 attend_current: bool = True):
        del num_heads, head_dim, rngs
        self.attend_current = bool(attend_current)

    def normalize(self, blk: ScoreBlock, carry, layer: int):
        del layer
        visible = blk.mask
        if not self.attend_current:  # keys strictly before the query
            visible = visible & (blk.k_idx[None, :] < blk.q_idx[:, None])
        return stick_breaking_log_weights(blk.logits, visible, carry)
