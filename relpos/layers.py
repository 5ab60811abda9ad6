"""Layers shared by the model and the position schemes."""

from __future__ import annotations

import jax
from flax import nnx


def on_rows(fn, x: jax.Array) -> jax.Array:
    """``fn`` applied to ``x`` flattened to rows ``[N, D]``; the leading shape restored."""
    y = fn(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Linear(nnx.Linear):
    """``nnx.Linear`` (same parameters) applied to the input flattened to ``[N, D]``.

    On a ``[B, T, D]`` input the weight gradient is a ``dot_general`` contracting two
    axes (B and T), which XLA:CPU (jax 0.10) runs much slower than the same product on
    ``[B*T, D]``: the ``small`` training step takes 0.81x the time with the flattening
    (benchmarks/README.md). The reshapes are free (contiguous axes). ``nnx.Linear``'s
    ``out_sharding`` argument is not passed through."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return on_rows(super().__call__, x)
