"""DAPE: data-adaptive positional encoding (Zheng et al., NeurIPS 2024, arXiv 2405.14722,
"DAPE: Data-Adaptive Positional Encoding for Length Extrapolation"; official code
chuanyang-Zheng/DAPE, ``DAPE.py`` classes ``AliBi_DAPE`` / ``ParallelKerpleLog_DAPE``).

With ``A = q . k / sqrt(d)`` the layer's scores and ``B`` a base position bias, the
logits become::

    A~ = A + B + f([A; B])

``f`` an MLP over the 2H head channels of every (i, j) pair, ``2H -> hidden -> H`` with
LeakyReLU (slope 0.01, PyTorch's default), as ``mlp2`` in the official code. The
official concatenates the unmasked scores and the bias, then masks; f is pointwise in
(i, j), so masked entries never reach a visible one.

A ``modify_logits`` hook (no carry): each tile evaluates its base bias from the tile's
positions and the MLP on the tile, so blockwise memory is linear in length. ``A`` is the
tile's logits as they reach the hook (scaled scores; the scheme has no ``bias`` hook of
its own, so nothing else is added before).

Options: ``base`` is ``alibi``, ``kerple_log`` (the paper's headline DAPE-Kerple) or
``fire``, built with their own defaults and learned with the MLP; ``hidden`` the MLP width
(official: 32). The MLP uses ``relpos.layers.Linear`` (Flax default initialisation,
LeCun-normal kernels and zero biases, where PyTorch's ``nn.Linear`` draws both uniform).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from relpos.layers import Linear
from relpos.positions.base import PositionScheme, ScoreBlock, check_choice, check_positive_int
from relpos.positions.registry import build, register

DAPE_BASES = ("alibi", "kerple_log", "fire")


def dape_logits(a: jax.Array, b: jax.Array, mlp) -> jax.Array:
    """``A + B + mlp([A; B])`` for ``a [B, H, q, k]``, ``b [H, q, k]`` or ``[B, H, q, k]``;
    ``mlp`` maps ``[..., 2H] -> [..., H]``."""
    b = jnp.broadcast_to(b, a.shape)
    x = jnp.moveaxis(jnp.concatenate([a, b], axis=1), 1, -1)  # [B, q, k, 2H]
    return a + b + jnp.moveaxis(mlp(x), -1, 1)


@register("dape")
class DAPE(PositionScheme):
    """Data-adaptive position bias (see the module docstring).

    Options:
      base: base bias, one of alibi, kerple_log, fire.
      hidden: MLP width.
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs: nnx.Rngs,
                 base: str = "kerple_log", hidden: int = 32):
        h = check_positive_int("num_heads", num_heads)
        self.base_name = check_choice("base", base, DAPE_BASES)
        self.base = build(base, num_heads=h, head_dim=head_dim, rngs=rngs)
        fp32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
        self.fc1 = Linear(2 * h, check_positive_int("hidden", hidden), rngs=rngs, **fp32)
        self.fc2 = Linear(hidden, h, rngs=rngs, **fp32)

    def mlp(self, x: jax.Array) -> jax.Array:
        """``f``: ``[..., 2H] -> [..., H]``."""
        return self.fc2(jax.nn.leaky_relu(self.fc1(x), 0.01))

    def base_bias(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        """The base bias ``[H, q, k]`` (``[B, H, q, k]`` for positions per example)."""
        if q_pos.ndim == 1 and k_pos.ndim == 1:
            return self.base.bias(q_pos, k_pos)
        n = max(q_pos.shape[0] if q_pos.ndim == 2 else 1, k_pos.shape[0] if k_pos.ndim == 2 else 1)
        q_pos = jnp.broadcast_to(q_pos, (n, q_pos.shape[-1]))
        k_pos = jnp.broadcast_to(k_pos, (n, k_pos.shape[-1]))
        return jax.vmap(self.base.bias)(q_pos, k_pos)

    def modify_logits(self, blk: ScoreBlock, carry, layer: int):
        del layer
        b = self.base_bias(blk.q_pos, blk.k_pos).astype(jnp.float32)
        return dape_logits(blk.logits, b, self.mlp), carry
