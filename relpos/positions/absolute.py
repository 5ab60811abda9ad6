"""Absolute position embeddings added to the token embeddings.

* ``sinusoidal`` (Vaswani et al., NeurIPS 2017, arXiv 1706.03762), interleaved
  layout: ``PE[t, 2k] = sin(t / base^(2k/D))``, ``PE[t, 2k+1] = cos(t / base^(2k/D))``.
  The tensor2tensor/fairseq code concatenates ``[sin..., cos...]`` instead; the two
  differ by a fixed permutation of the model dimension, which a learned input
  projection absorbs, so this follows the paper's formula.
* ``learned_abs`` (GPT-2, Radford et al. 2019): a learned ``[max_length, D]`` table.
  It has no rows beyond ``max_length``, so ``policy`` makes the choice explicit:
  ``"clip"`` reuses the last row, ``"error"`` refuses (NaN inside ``jit``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from relpos.positions.base import (
    PositionScheme,
    PositionTable,
    RelposConfigError,
    check_choice,
    check_positive_float,
    check_positive_int,
    is_concrete,
    sinusoidal_frequencies,
    take_with_policy,
)
from relpos.positions.registry import register

LEARNED_ABS_POLICIES = ("clip", "error")


def sinusoidal_embedding(positions: jax.Array, dim: int, base: float = 10000.0) -> jax.Array:
    """``[..., T, dim]`` float32 interleaved sin/cos embedding of int ``positions [..., T]``."""
    inv_freq = jnp.asarray(sinusoidal_frequencies(dim, base), jnp.float32)  # [D/2]
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [..., T, D/2]
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., T, D/2, 2]
    return pe.reshape(*angles.shape[:-1], dim)


def learned_abs_embedding(positions: jax.Array, table: jax.Array,
                          policy: str = "clip") -> jax.Array:
    """``[..., T, D]`` rows of ``table [max_length, D]`` at int ``positions [..., T]``.

    ``policy="clip"``: positions past the table use the last row (negative ones row 0);
    ``policy="error"``: they give NaN rows (negative positions too).
    """
    positions = jnp.asarray(positions, jnp.int32)
    max_length = table.shape[0]
    if policy == "clip":
        positions = jnp.maximum(positions, 0)
    else:
        # jnp.take wraps negative indices; send them past the end so they are NaN too.
        positions = jnp.where(positions < 0, max_length, positions)
    return take_with_policy(jnp.asarray(table, jnp.float32), positions, axis=0, policy=policy)


@register("sinusoidal")
class Sinusoidal(PositionScheme):
    """Fixed sin/cos embedding of size ``D = num_heads * head_dim`` (D must be even).

    ``scale`` multiplies the embedding. Vaswani et al. (and fairseq, whose sinusoidal
    baseline the ALiBi paper used) add the unit-amplitude embedding to token embeddings
    multiplied by ``sqrt(D)``, so both have rms about 1. relpos's token embeddings are
    GPT-2 style, ``N(0, 0.02)`` and unscaled; an unscaled sin/cos (rms ``1/sqrt(2)``)
    would drown them 35 to 1 and train badly. The default ``scale = 0.02 * sqrt(2)``
    gives the embedding the same rms as the token embeddings at initialisation — the
    same balance as the papers'. ``scale=1`` gives the raw embedding.
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs=None, base: float = 10000.0,
                 scale: float = 0.02 * 2**0.5):
        del rngs
        num_heads = check_positive_int("num_heads", num_heads)
        d_model = num_heads * check_positive_int("head_dim", head_dim)
        if d_model % 2:
            raise RelposConfigError(
                f"sinusoidal needs an even model size num_heads*head_dim, got {d_model}"
            )
        self.dim = d_model
        self.base = check_positive_float("base", base)
        self.scale = check_positive_float("scale", scale)

    def embed(self, positions: jax.Array) -> jax.Array:
        return self.scale * sinusoidal_embedding(positions, self.dim, self.base)


@register("learned_abs")
class LearnedAbsolute(PositionScheme):
    """GPT-2 style learned absolute embedding, ``N(0, 0.02)`` initialised.

    Options:
      max_length: number of rows (positions ``0 .. max_length-1``).
      policy: ``"clip" | "error"`` for positions ``>= max_length``.
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs: nnx.Rngs,
                 max_length: int = 1024, policy: str = "clip"):
        num_heads = check_positive_int("num_heads", num_heads)
        d_model = num_heads * check_positive_int("head_dim", head_dim)
        self.max_length = check_positive_int("max_length", max_length)
        self.policy = check_choice("policy", policy, LEARNED_ABS_POLICIES)
        init = nnx.initializers.normal(0.02)
        self.table = PositionTable(init(rngs.params(), (self.max_length, d_model), jnp.float32))

    def _error(self, position: int) -> RelposConfigError:
        return RelposConfigError(
            f"learned_abs: position {position} has no row in the table of max_length="
            f"{self.max_length} (positions 0..{self.max_length - 1}) and policy='error'; "
            f"set max_length > {position}, or policy='clip' to reuse the last row "
            f"(valid policies: {', '.join(map(repr, LEARNED_ABS_POLICIES))})"
        )

    def _check_range(self, positions) -> None:
        if self.policy != "error":
            return
        if is_concrete(positions):
            p = np.asarray(positions)
            if p.size and (p.max() >= self.max_length or p.min() < 0):
                bad = int(p.max()) if p.max() >= self.max_length else int(p.min())
                raise self._error(bad)
        elif positions.shape[-1] > self.max_length:
            # Traced: values unknown, but more distinct positions than rows cannot fit.
            raise RelposConfigError(
                f"learned_abs: a window of {positions.shape[-1]} positions exceeds the table "
                f"of max_length={self.max_length} and policy='error'; set max_length >= "
                f"{positions.shape[-1]}, or policy='clip' (valid policies: "
                f"{', '.join(map(repr, LEARNED_ABS_POLICIES))})"
            )

    def embed(self, positions: jax.Array) -> jax.Array:
        self._check_range(positions)
        return learned_abs_embedding(positions, self.table[...], self.policy)
