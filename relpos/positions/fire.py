"""FIRE: functional interpolation for relative positions (Li et al., ICLR 2024,
arXiv 2310.04418, "Functional Interpolation for Relative Positions Improves Long
Context Transformers").

For query position i, key position j and causal distance ``d = max(i - j, 0)``::

    b(i, j) = f_theta( psi(d) / (psi(max(L, i)) + eps) ),   psi(x) = log(|c| x + 1)

``f_theta`` is an MLP 1 -> hidden -> H with ReLU (one output per head), ``c`` a
learned scalar (init 0.1), ``L = |l| * L0`` a learned threshold (``l`` init 1.0,
``L0 = 512``). The normaliser makes the MLP input lie in [0, 1) for every query, so
longer contexts are interpolated, not extrapolated; below the threshold it is
constant, so short sequences get a purely relative bias. Beyond it the bias depends
on i, not only on i - j: it cannot be cached as a per-offset table, and it costs an
MLP on every (i, j) pair (long evaluation must be blockwise).

Implementation notes: the absolute values on ``c`` and ``l`` follow the pseudo-code in
the paper's appendix (they keep psi and L well defined whatever sign the optimiser
gives the raw scalars); ``eps`` guards the denominator (``psi(max(L, i)) = 0`` only when
``|c| = 0`` or ``L = i = 0``). Masked pairs (j > i) use ``d = 0`` and stay finite.
The MLP (``relpos.layers.Linear``) uses Flax's default ``nnx.Linear`` initialisation
(LeCun normal kernels, zero biases) in fp32; the paper does not prescribe one.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from relpos.layers import Linear
from relpos.positions.base import (
    PositionScheme,
    causal_distance,
    check_positive_float,
    check_positive_int,
)
from relpos.positions.registry import register


def fire_psi(x: jax.Array, c: jax.Array) -> jax.Array:
    """``psi(x) = log(|c| x + 1)``."""
    return jnp.log1p(jnp.abs(c) * x)


def fire_normalized_distance(q_pos: jax.Array, k_pos: jax.Array, c: jax.Array,
                             threshold: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``[Tq, Tk]`` float32 MLP input ``psi(d) / (psi(max(L, i)) + eps)``.

    Args:
      threshold: ``L = |l| * L0`` (a scalar, learned through ``l``).
    """
    dist = causal_distance(q_pos, k_pos).astype(jnp.float32)  # [Tq, Tk]
    i = jnp.asarray(q_pos, jnp.float32)[:, None]  # [Tq, 1]
    normaliser = fire_psi(jnp.maximum(threshold, i), c) + eps
    return fire_psi(dist, c) / normaliser


def fire_bias(q_pos: jax.Array, k_pos: jax.Array, c: jax.Array, threshold: jax.Array,
              mlp: Callable[[jax.Array], jax.Array], eps: float = 1e-6) -> jax.Array:
    """``[H, Tq, Tk]`` float32 FIRE bias; ``mlp`` maps ``[..., 1] -> [..., H]``."""
    u = fire_normalized_distance(q_pos, k_pos, c, threshold, eps)
    return jnp.moveaxis(mlp(u[..., None]), -1, 0)


@register("fire")
class FIRE(PositionScheme):
    """Learned FIRE bias.

    Options:
      hidden: MLP width (paper: 32).
      c_init: initial ``c`` of psi (paper: 0.1).
      threshold: ``L0``; the learned threshold is ``|l| * L0`` (paper: 512).
      l_init: initial ``l`` (paper: 1.0).
      eps: added to the normaliser.
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs: nnx.Rngs, hidden: int = 32,
                 c_init: float = 0.1, threshold: float = 512.0, l_init: float = 1.0,
                 eps: float = 1e-6):
        del head_dim
        check_positive_int("num_heads", num_heads)
        hidden = check_positive_int("hidden", hidden)
        self.threshold = check_positive_float("threshold", threshold)
        self.eps = check_positive_float("eps", eps)
        self.c = nnx.Param(jnp.asarray(check_positive_float("c_init", c_init), jnp.float32))
        self.l = nnx.Param(jnp.asarray(check_positive_float("l_init", l_init), jnp.float32))
        fp32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
        self.fc1 = Linear(1, hidden, rngs=rngs, **fp32)
        self.fc2 = Linear(hidden, num_heads, rngs=rngs, **fp32)

    def mlp(self, u: jax.Array) -> jax.Array:
        """``f_theta``: ``[..., 1] -> [..., H]``."""
        return self.fc2(jax.nn.relu(self.fc1(u)))

    def bias(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        threshold = jnp.abs(self.l[...]) * self.threshold
        return fire_bias(q_pos, k_pos, self.c[...], threshold, self.mlp, self.eps)
