"""Shared learnable bias per offset: ``b_h(i, j) = u_h[i - j]``.

The seed formulation of this project ("Shared Learnable Bias per Offset"): every
query/key pair with the same offset shares one scalar per head, so query 8 / key 3
shares its bias with query 6 / key 1. The closest published relative is the clipped
relative-position representation of Shaw et al. (NAACL 2018, arXiv 1803.02155), which
learns vectors rather than scalars and clips offsets at a window k.

Its extrapolation limit is explicit here: the table holds offsets ``0 .. size-1``
(``size`` = the training length), and ``policy`` says what an unseen offset gets:

* ``"clip"``: the last trained entry ``u[size-1]`` (Shaw et al.'s clipping);
* ``"zero"``: zero, i.e. no position signal beyond the trained range;
* ``"mask"``: ``-inf``, i.e. no attention to keys beyond the table: a sliding window of
  ``size`` keys. The control that separates what the table learned from what a policy
  does beyond it (a model limited to the context it was trained with);
* ``"error"``: an error when the positions are known now; inside ``jit`` the bias is
  NaN there, so a wrong configuration poisons the loss instead of passing silently.

``jnp.take`` returns NaN for out-of-range float gathers by default; the mode is
always passed explicitly.
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
    causal_distance,
    check_choice,
    check_nonnegative_float,
    check_positive_int,
    is_concrete,
    take_with_policy,
)
from relpos.positions.registry import register

OFFSET_POLICIES = ("clip", "zero", "mask", "error")

def offset_bias(q_pos: jax.Array, k_pos: jax.Array, table: jax.Array,
                policy: str = "clip") -> jax.Array:
    """``[H, Tq, Tk]`` float32 bias ``table[h, max(i - j, 0)]``.

    Args:
      q_pos, k_pos: int position vectors ``[Tq]``, ``[Tk]``.
      table: ``[H, size]``; entry ``o`` is the bias of offset ``o``.
      policy: one of :data:`OFFSET_POLICIES`, for offsets ``>= size``.
    """
    dist = causal_distance(q_pos, k_pos)  # [Tq, Tk]
    return take_with_policy(jnp.asarray(table, jnp.float32), dist, axis=1, policy=policy)


@register("offset")
class OffsetBias(PositionScheme):
    """One learned scalar per (head, offset); see the module docstring for ``policy``.

    Options:
      size: number of trained offsets ``0 .. size-1`` (the trainer sets the training
        length).
      policy: ``"clip" | "zero" | "mask" | "error"`` for offsets ``>= size``.
      init_std: std of the normal initialisation; 0 gives a zero table.
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs: nnx.Rngs,
                 size: int = 512, policy: str = "clip", init_std: float = 0.02):
        del head_dim
        check_positive_int("num_heads", num_heads)
        self.size = check_positive_int("size", size)
        self.policy = check_choice("policy", policy, OFFSET_POLICIES)
        init_std = check_nonnegative_float("init_std", init_std)
        init = nnx.initializers.normal(init_std) if init_std > 0 else nnx.initializers.zeros
        self.table = PositionTable(init(rngs.params(), (num_heads, self.size), jnp.float32))

    def _check_range(self, q_pos, k_pos) -> None:
        if self.policy != "error" or not (is_concrete(q_pos) and is_concrete(k_pos)):
            return
        q, k = np.asarray(q_pos), np.asarray(k_pos)
        if q.size == 0 or k.size == 0:
            return
        largest = int(q.max()) - int(k.min())
        if largest >= self.size:
            raise RelposConfigError(
                f"offset bias: offset {largest} is beyond the trained offsets 0..{self.size - 1} "
                f"(size={self.size}) and policy='error'; set size > {largest}, or choose "
                f"policy from {', '.join(map(repr, OFFSET_POLICIES))} ('clip' reuses the last "
                "trained offset, 'zero' gives no bias)"
            )

    def bias(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        self._check_range(q_pos, k_pos)
        return offset_bias(q_pos, k_pos, self.table[...], self.policy)
