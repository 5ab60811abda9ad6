"""The learned (or fixed) bias of a trained model as a function of the offset, for plots."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from relpos.io import atomic_write_json
from relpos.plots import profile_offsets


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
