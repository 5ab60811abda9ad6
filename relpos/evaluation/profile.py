"""The learned (or fixed) bias of a trained model as a function of the offset, for plots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from relpos.io import atomic_write_json, profile_offsets
from relpos.positions import PositionTable


def bias_profile(model, *, train_length: int, max_length: int, window: int = 32) -> dict | None:
    """The learned (or fixed) bias of layer 0's scheme, for plots.

    ``at_max[h][n]``: ``b_h(i, i - offsets[n])`` with the query at i = max_length - 1;
    ``at_train``: the same with i = train_length - 1, for offsets < train_length (the
    two differ only for schemes that depend on i, such as FIRE); ``window``: the full
    ``[H, window, window]`` bias of a causal window starting at position 0. Offsets are
    log-spaced beyond 2x the training length to keep the file small.
    """
    scheme = model.position
    if not callable(getattr(scheme, "bias", None)):
        return None
    offsets = profile_offsets(train_length, max_length)

    def profile(i, offs):
        b = scheme.bias(jnp.array([i], jnp.int32), jnp.asarray(i - offs, jnp.int32))
        return np.round(np.asarray(b[:, 0], np.float64), 6).tolist()  # [H, len(offs)]

    pos = jnp.arange(window, dtype=jnp.int32)
    return {
        "scheme": getattr(model, "position_name", type(scheme).__name__),
        "train_length": train_length, "max_length": max_length,
        "offsets": offsets.tolist(),
        "at_max": profile(max_length - 1, offsets),
        "at_train": profile(train_length - 1, offsets[offsets < train_length]),
        "window": np.round(np.asarray(scheme.bias(pos, pos), np.float64), 6).tolist(),
    }


def save_bias_profile(model, path, *, train_length: int, max_length: int) -> dict | None:
    """Write :func:`bias_profile` to ``path`` (if the scheme has a bias) and return it."""
    prof = bias_profile(model, train_length=train_length, max_length=max_length)
    if prof is not None:
        atomic_write_json(path, prof)
    return prof


def table_coverage(model, initial, *, train_length: int, train_steps: int,
                   randomized: bool = False) -> list[dict]:
    """How well each learned position table was trained, row by row (a row: one offset,
    T5 bucket or absolute position).

    ``pairs_per_window``: how many (query, key) pairs (bias tables) or positions (embedding
    tables) of one training window read the row, counted as the gradient of their sum;
    ``updates``: optimiser steps whose gradient reached the row (``train_steps`` where
    ``pairs_per_window > 0``, with the fixed training positions); ``moved``: the mean over
    heads (or embedding dims) of ``|final - initial|``, to compare with the learning rate
    summed over the schedule (Adam moves a parameter by about lr per step).
    ``initial``: the same model before training (same seed). With ``randomized``
    training positions the counts of a fixed window do not apply: ``pairs_per_window``
    and ``updates`` are None (``moved`` still says which rows trained)."""
    out = []
    pairs_of_schemes = [("position", model.position, initial.position)] + [
        (f"layer_positions[{i}]", s, s0)
        for i, (s, s0) in enumerate(zip(model.layer_positions, initial.layer_positions))]
    for name, scheme, start in pairs_of_schemes:
        graphdef, tables, rest = nnx.split(scheme, PositionTable, ...)
        _, tables0, _ = nnx.split(start, PositionTable, ...)
        if not jax.tree.leaves(tables):
            continue
        counts = jax.grad(lambda t, g=graphdef, r=rest: _reads(nnx.merge(g, t, r),
                                                               train_length))(tables)
        flat = jax.tree_util.tree_flatten_with_path(tables)[0]
        for (path, table), count, table0 in zip(flat, jax.tree.leaves(counts),
                                                jax.tree.leaves(tables0)):
            table, count, table0 = (np.asarray(x, np.float64) for x in (table, count, table0))
            # rows: the offset/bucket axis of [H, rows] bias tables, axis 0 of [rows, D]
            axis = 1 if _is_bias(scheme) else 0
            other = 1 - axis
            pairs = count.sum(other) / count.shape[other]
            out.append({
                "param": ".".join([name] + [str(getattr(k, "key", k)) for k in path
                                            if getattr(k, "key", None) != "value"]),
                "rows": int(table.shape[axis]),
                "pairs_per_window": None if randomized else np.round(pairs, 3).tolist(),
                "updates": None if randomized else [train_steps if p > 0 else 0 for p in pairs],
                "moved": np.round(np.abs(table - table0).mean(other), 6).tolist(),
            })
    return out


def _is_bias(scheme) -> bool:
    return callable(getattr(scheme, "bias", None))


def _reads(scheme, length: int):
    """Sum of what one causal window of ``length`` reads from the scheme's tables."""
    pos = jnp.arange(length, dtype=jnp.int32)
    if _is_bias(scheme):
        b = scheme.bias(pos, pos)
        return jnp.where(jnp.tril(jnp.ones((length, length), bool)), b, 0.0).sum()
    return scheme.embed(pos).sum()
