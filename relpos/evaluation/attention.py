"""Does a model attend beyond its training length? The attention mass on far keys.

Flat perplexity at 32x can mean that a model uses the longer context, or that it ignores
everything beyond the training length L (a window). This diagnostic measures which: in
non-overlapping evaluation windows of length T > L, for every query at position p >= L,
the attention probability on keys at offsets >= L (``sum_{j <= p - L} P[p, j]``),
averaged over those queries, per layer and head. A model limited to a window of L (the
``offset`` policy ``mask``) scores exactly 0.

Each window is the first of a different target block (:func:`target_blocks`), so the
95% interval of the mean is a percentile bootstrap over windows (blocks lie far apart in
the split). The probabilities are computed densely from each layer's queries, keys and
bias (:func:`relpos.nn.attention.attention_weights`), one window at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from relpos.evaluation.protocols import _bootstrap, eval_lengths, window_plan
from relpos.nn.attention import attention_weights


@functools.lru_cache(maxsize=8)
def _far_mass_fn(graphdef, train_length: int):
    """jit ``(params, tokens [1, T]) -> [layers, H]`` mean far-key mass over queries >= L."""

    def fn(params, tokens):
        model = nnx.merge(graphdef, params)
        out = []

        def observe(layer, *, q, k, bias, positions, bias_inside_scale, window=0):
            del layer
            p = attention_weights(q, k, bias=bias, q_pos=positions, k_pos=positions,
                                  scale=q.shape[-1] ** -0.5, bias_inside_scale=bias_inside_scale,
                                  window=window)  # [1, H, T, T]
            t = p.shape[-1]
            pos = jnp.arange(t)
            far = (pos[:, None] - pos[None, :]) >= train_length  # offset >= L
            mass = jnp.where(far, p, 0.0).sum(-1)  # [1, H, T]
            out.append(mass[0, :, train_length:].mean(-1))  # queries with p >= L

        model.hidden(tokens, impl="dense", observe=observe)
        return jnp.stack(out)

    return jax.jit(fn)


def attention_far_mass(model, val: np.ndarray, *, train_length: int, ecfg,
                       windows: int = 16) -> list[dict]:
    """Per evaluation length T > L (non-overlapping windows; see the module docstring):
    ``mean`` (over windows, layers and heads) and its ``ci``, and ``per_layer_head``
    (means over windows). An empty list when ``windows`` is 0 or no length exceeds L."""
    lengths = [T for T in eval_lengths(ecfg, train_length) if T > train_length]
    if windows <= 0 or not lengths:
        return []
    graphdef, params = nnx.split(model)
    fn = _far_mass_fn(graphdef, train_length)
    plan = window_plan(val.size, eval_lengths(ecfg, train_length), "nonoverlap", ecfg)
    out = []
    for T in lengths:
        w = plan[T]
        firsts = np.flatnonzero(np.r_[True, w.block[1:] != w.block[:-1]])[:windows]
        masses = []
        for i in firsts:
            tokens = np.asarray(val[w.starts[i]:w.starts[i] + T], np.int32)[None]
            masses.append(np.asarray(fn(params, tokens), np.float64))
        masses = np.stack(masses)  # [n, layers, H]
        per_window = masses.mean((1, 2))
        ci = (list(_bootstrap((per_window,), lambda x, axis: x.mean(axis)))
              if len(per_window) >= 3 else None)
        out.append({"length": T, "train_length": train_length, "windows": len(firsts),
                    "mean": float(per_window.mean()), "ci": ci,
                    "per_layer_head": np.round(masses.mean(0), 6).tolist()})
    return out
