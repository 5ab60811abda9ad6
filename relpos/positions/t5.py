"""T5 bucketed relative position bias (Raffel et al., JMLR 2020, arXiv 1910.10683).

``b_h(i, j) = table[h, bucket(max(i - j, 0))]``, causal (unidirectional) bucketing as
in HF transformers ``T5Attention._relative_position_bucket(bidirectional=False)``:
the first ``B/2`` offsets get a bucket each, larger ones share logarithmically wider
buckets up to ``max_distance``, and every offset ``>= max_distance`` falls in the last
bucket. The logarithm is taken in float32, as in the HF code, so bucket boundaries
match it exactly. T5 itself does not scale logits by ``1/sqrt(d)``; where the bias is
added relative to that scaling is the attention module's switch, not this one's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from relpos.positions.base import (
    PositionScheme,
    PositionTable,
    RelposConfigError,
    causal_distance,
    check_nonnegative_float,
    check_positive_int,
)
from relpos.positions.registry import register


def t5_bucket(distance: jax.Array, num_buckets: int = 32, max_distance: int = 128) -> jax.Array:
    """int32 bucket of each causal distance ``n = max(distance, 0)``.

    ``n`` if ``n < B/2``, else ``min(B-1, B/2 + floor(log(n/(B/2)) / log(max_distance/(B/2))
    * (B - B/2)))``.
    """
    n = jnp.maximum(jnp.asarray(distance, jnp.int32), 0)
    max_exact = num_buckets // 2
    # Both where-branches are evaluated: keep log's argument >= 1 where n is small.
    n_large = jnp.maximum(n, max_exact).astype(jnp.float32)
    log_ratio = jnp.log(n_large / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return jnp.where(n < max_exact, n, large)


def t5_bias(q_pos: jax.Array, k_pos: jax.Array, table: jax.Array,
            max_distance: int = 128) -> jax.Array:
    """``[H, Tq, Tk]`` float32 bias from ``table [H, num_buckets]``."""
    table = jnp.asarray(table, jnp.float32)
    bucket = t5_bucket(causal_distance(q_pos, k_pos), table.shape[1], max_distance)
    return jnp.take(table, bucket, axis=1, mode="clip")  # buckets are always in range


@register("t5")
class T5Bias(PositionScheme):
    """Learned scalar per (head, bucket).

    Options:
      num_buckets: ``B >= 2`` (HF default 32).
      max_distance: offsets ``>= max_distance`` share the last bucket; must exceed
        ``B // 2`` (HF default 128).
      init_std: std of the normal table initialisation (0 gives zeros).
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs: nnx.Rngs,
                 num_buckets: int = 32, max_distance: int = 128, init_std: float = 0.02):
        del head_dim
        check_positive_int("num_heads", num_heads)
        self.num_buckets = check_positive_int("num_buckets", num_buckets, minimum=2)
        self.max_distance = check_positive_int("max_distance", max_distance)
        if self.max_distance <= self.num_buckets // 2:
            raise RelposConfigError(
                f"max_distance must be > num_buckets // 2 = {self.num_buckets // 2} (the exact "
                f"buckets), got max_distance={max_distance}"
            )
        init_std = check_nonnegative_float("init_std", init_std)
        init = nnx.initializers.normal(init_std) if init_std > 0 else nnx.initializers.zeros
        self.table = PositionTable(init(rngs.params(), (num_heads, self.num_buckets), jnp.float32))

    def bias(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        return t5_bias(q_pos, k_pos, self.table[...], self.max_distance)
