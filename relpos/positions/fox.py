"""FoX: the Forgetting Transformer (Lin et al., ICLR 2025, arXiv 2503.02130,
"Forgetting Transformer: Softmax Attention with a Forget Gate"; official code
zhixuan-lin/forgetting-transformer, ``ForgettingAttentionLayer`` in
``modeling_forgetting_transformer.py`` and the ``forgetting_attention`` op).

A scalar forget gate per token and head from the layer's attention input ``x_t`` (the
same LayerNorm output that gives q, k, v), ``f_t = sigmoid(w_h . x_t + b_h)``, down-weights
the logits by the gates between key and query::

    logit_ij += sum_{l = j+1 .. i} log f_l = c_i - c_j,   c_t = sum_{l <= t} log f_l

A separable per-token bias, so a ``token_bias`` hook, returned as the increments
``log f [B, T, H]`` (a :class:`relpos.positions.base.CumulativeBias`) rather than ``c``:
``c_t`` reaches hundreds (about -870 at T = 1024 for gates drawn at initialisation),
where fp32 keeps ~6e-5, so ``c_i - c_j`` of nearby tokens and, worse, its gradient (a
reverse cumulative sum over the window, the official kernel's way too) lose precision:
gate-parameter gradients 2.3e-4 (dense) and 6.8e-4 (blockwise) from float64. Each path
sums ``c_i - c_j`` relative to the first query of a query block instead (fp32; memory
linear in length on every path); values and gradients then agree with float64 within
about 1e-5 (tests/test_content_schemes.py).

The gate projection is ``relpos.layers.Linear(D, H)`` with a bias (official:
``nn.Linear(hidden_size, num_heads, bias=True)``), Flax's default initialisation (LeCun
normal kernel, zero bias) rather than PyTorch's uniform one. FoX in the paper runs
without RoPE; combine nothing else here (the scheme is the only position information).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from relpos.layers import Linear
from relpos.positions.base import CumulativeBias, PositionScheme, check_positive_int
from relpos.positions.registry import register


def forget_cumsum(gate_logits: jax.Array) -> jax.Array:
    """``c_t = sum_{l <= t} log sigmoid(gate_logit_l)`` along the time axis of
    ``[B, T, H]`` (float32)."""
    return jnp.cumsum(jax.nn.log_sigmoid(gate_logits.astype(jnp.float32)), axis=1)


@register("fox")
class ForgettingGate(PositionScheme):
    """Data-dependent forget gate (see the module docstring); no options."""

    def __init__(self, *, num_heads: int, head_dim: int, rngs: nnx.Rngs):
        d_model = check_positive_int("num_heads", num_heads) * check_positive_int(
            "head_dim", head_dim)
        self.gate = Linear(d_model, num_heads, use_bias=True, dtype=jnp.float32,
                           param_dtype=jnp.float32, rngs=rngs)

    def token_bias(self, x: jax.Array, positions: jax.Array, layer: int):
        """``CumulativeBias(log f [B, T, H])``."""
        del positions, layer
        return CumulativeBias(jax.nn.log_sigmoid(self.gate(x.astype(jnp.float32))))
