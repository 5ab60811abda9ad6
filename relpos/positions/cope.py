"""CoPE: contextual position encoding (Golovneva et al., 2024, arXiv 2405.18719,
"Contextual Position Encoding: Learning to Count What's Important"; official code
facebookresearch/RAM, ``projects/cope/src/cope/context_position.py``).

Positions are counted by the content: for query i and key j <= i, with the layer's
scaled scores ``z_it = q_i . k_t / sqrt(d)``::

    g_it = sigmoid(z_it),   p_ij = min(sum_{t=j..i} g_it, npos - 1)
    logit_ij = (q_i . k_j + (1 - w) q_i . e[floor p_ij] + w q_i . e[ceil p_ij]) / sqrt(d)

with ``w = p_ij - floor(p_ij)`` and ``e [npos, d]`` learned position embeddings, zero at
initialisation (so CoPE starts as no position information). As in the official code
(``cope_nodiv`` off, the default), the interpolated ``q . e`` is added before the
``1/sqrt(d)`` scaling, the gates use the scaled scores, and one ``e`` is shared by all
heads of a layer (the official folds heads into the batch with one ``pos_emb [1, d,
npos]``). ``floor``/``ceil`` carry no gradient; ``w`` does.

``p_ij`` is a reverse cumulative sum along the key axis, so the scheme is a
``modify_logits`` hook whose carry is ``sum_t g_it`` over the key blocks to the right:
blockwise attention visits key blocks from the last to the first and adds the carry to
the block's own reverse cumsum; memory stays linear in length (``[B, H, bq, npos]`` for
``q . e`` per query block).

Deviation: the official default ``npos`` is the training block size + 1 (every count
0..T representable); ``configs/bias/cope.yaml`` sets ``npos`` to the training length, so
counts clamp one earlier (at T - 1). Beyond the training length counts clamp at
``npos - 1``: the embedding rows past it were never trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from relpos.positions.base import PositionScheme, ScoreBlock, check_positive_int, reverse_cumsum
from relpos.positions.registry import register


def cope_positions(gates: jax.Array, mask: jax.Array, carry: jax.Array | None,
                   npos: int) -> tuple[jax.Array, jax.Array]:
    """Counts ``p_ij = min(sum_{t >= j, visible} g_it + carry_i, npos - 1)`` of one block
    ``[B, H, bq, bk]`` and the new carry ``[B, H, bq]`` (the block's gate sum added)."""
    g = jnp.where(mask, gates, 0.0)
    p, total = reverse_cumsum(g, axis=-1), g.sum(-1)
    if carry is not None:
        p, total = p + carry[..., None], total + carry
    return jnp.minimum(p, npos - 1), total


def cope_logits(q: jax.Array, p: jax.Array, emb: jax.Array) -> jax.Array:
    """``[B, H, bq, bk]`` interpolated ``q_i . e[p_ij]`` for ``q [B, bq, H, d]``,
    counts ``p`` and ``emb [npos, d]``."""
    table = jnp.einsum("bqhd,nd->bhqn", q.astype(jnp.float32), emb)  # [B, H, bq, npos]
    lo = jax.lax.stop_gradient(jnp.floor(p))
    hi = jax.lax.stop_gradient(jnp.ceil(p))
    at = lambda idx: jnp.take_along_axis(table, idx.astype(jnp.int32), axis=-1)
    w = p - lo
    return at(hi) * w + at(lo) * (1.0 - w)


@register("cope")
class CoPE(PositionScheme):
    """Contextual position encoding (see the module docstring).

    Options:
      npos: number of position embeddings; counts clamp at ``npos - 1``.
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs=None, npos: int = 128):
        del num_heads, rngs
        self.npos = check_positive_int("npos", npos)
        self.emb = nnx.Param(jnp.zeros((self.npos, check_positive_int("head_dim", head_dim)),
                                       jnp.float32))

    def modify_logits(self, blk: ScoreBlock, carry, layer: int):
        del layer
        gates = jax.nn.sigmoid(blk.raw * blk.scale)
        p, carry = cope_positions(gates, blk.mask, carry, self.npos)
        return blk.logits + cope_logits(blk.q, p, self.emb[...]) * blk.scale, carry
