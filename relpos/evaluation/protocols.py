"""Extrapolation evaluation: per-token NLL at many window lengths, two protocols.

* ``nonoverlap``: the first ``E`` validation targets split into consecutive windows
  of length L (early tokens of each window have little context);
* ``sliding``: windows of length L moved by a stride S (default L/2); only the last S
  positions of each window are scored, so every scored token has >= L - S context.

Within a mode every length scores *the same target tokens* (``E`` is fixed once for
all lengths), so perplexities are comparable across lengths. Per-position losses are
accumulated and reported log-binned. The LM head and loss run over position chunks, so
``[T, vocab]`` logits never exist whole; attention switches to the blockwise path
beyond ``model.dense_max_len``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from relpos.errors import RelposError

MODES = ("nonoverlap", "sliding")


def eval_lengths(ecfg, train_length: int) -> list[int]:
    lengths = ecfg.lengths if ecfg.lengths else [m * train_length for m in ecfg.multiples]
    return sorted({int(x) for x in lengths})


def check_eval_config(ecfg) -> None:
    if not (ecfg.lengths or ecfg.multiples):
        raise RelposError("eval.multiples or eval.lengths must list at least one length")
    for key in ("lengths", "multiples"):
        for x in getattr(ecfg, key) or []:
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise RelposError(f"eval.{key} entries must be integers >= 1, got {x!r}")
    for m in ecfg.modes:
        if m not in MODES:
            raise RelposError(f"eval.modes entries must be one of {', '.join(MODES)}; got {m!r}")
    for key in ("tokens", "batch_tokens", "loss_chunk"):
        if getattr(ecfg, key) < 1:
            raise RelposError(f"eval.{key} must be >= 1, got {getattr(ecfg, key)}")
    if ecfg.stride < 0:
        raise RelposError(f"eval.stride must be >= 0 (0: half the window), got {ecfg.stride}")


def _stride(ecfg, length: int) -> int:
    s = ecfg.stride or max(1, length // 2)
    return min(s, length)


def check_lengths_fit(ecfg, train_length: int, n_val: int) -> None:
    longest = max(eval_lengths(ecfg, train_length))
    if longest + 1 > n_val:
        raise RelposError(
            f"eval length {longest} is longer than the validation split ({n_val} tokens); "
            f"use shorter eval.multiples/eval.lengths or a larger corpus")


def check_positions_reach(model, length: int) -> None:
    """Fail before training rather than after it: query the model's position scheme at
    the farthest position and offset a window of ``length`` uses, with concrete values,
    so a table that cannot reach them under ``policy='error'`` (learned_abs, offset)
    raises its own error now (inside ``jit`` it would only give NaN)."""
    scheme = model.position
    pos = jnp.arange(length, dtype=jnp.int32)
    if callable(getattr(scheme, "embed", None)):
        scheme.embed(pos)
    if callable(getattr(scheme, "bias", None)):
        scheme.bias(pos[-1:], pos)


def window_plan(n_val: int, lengths: list[int], mode: str, ecfg):
    """For each length: (window starts, first scored position per window, offset), and E.

    Window ``w`` reads inputs ``val[s : s+L]`` and predicts ``val[s+1 : s+L+1]``; its
    positions ``>= first`` are scored, and only targets with index in
    ``[offset + 1, offset + E]``. A window that would run past the split is moved back
    and its ``first`` moved forward, so no target is scored twice.
    """
    longest = max(lengths)
    if mode == "nonoverlap":
        context = 0
        e = min(ecfg.tokens, n_val - 1)
        if e >= longest:
            e -= e % longest  # power-of-two multiples of the training length tile exactly
    else:
        context = max(L - _stride(ecfg, L) for L in lengths)  # context before the 1st target
        e = min(ecfg.tokens, n_val - 1 - context)
        if e < 1:
            raise RelposError(
                f"validation split ({n_val} tokens) is too short for sliding windows of "
                f"length {longest}; shorten eval lengths or use eval.modes=[nonoverlap]")
    plan = {}
    for L in lengths:
        step = L if mode == "nonoverlap" else _stride(ecfg, L)
        first0 = L - step
        starts = (context - first0) + np.arange(0, e, step)
        clamped = np.minimum(starts, n_val - L - 1)
        plan[L] = (clamped, first0 + (starts - clamped), context)
    return plan, e


@functools.lru_cache(maxsize=8)
def make_nll_fn(graphdef, chunk: int):
    """jit ``(params, inputs [B, L], targets [B, L], weights [B, L]) -> (nll_sum [L],
    count [L])`` with the LM head applied ``chunk`` positions at a time. Cached per
    (graph, chunk), so in-training evaluations reuse one compiled function."""

    def fn(params, inputs, targets, weights):
        model = nnx.merge(graphdef, params)
        h = model.hidden(inputs)  # [B, L, D]
        b, L, d = h.shape
        c = min(chunk, L)
        pad = (-L) % c
        hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        tp = jnp.pad(targets, ((0, 0), (0, pad)))
        hc = hp.reshape(b, -1, c, d).transpose(1, 0, 2, 3)  # [nC, B, c, D]
        tc = tp.reshape(b, -1, c).transpose(1, 0, 2)

        def chunk_nll(args):
            hh, tt = args
            logits = model.logits(hh)  # [B, c, V] fp32
            lse = jax.nn.logsumexp(logits, axis=-1)
            return lse - jnp.take_along_axis(logits, tt[..., None], axis=-1)[..., 0]

        nll = jax.lax.map(chunk_nll, (hc, tc)).transpose(1, 0, 2).reshape(b, -1)[:, :L]
        return (nll * weights).sum(0), weights.sum(0)

    return jax.jit(fn)


def _log_bins(length: int) -> list[int]:
    edges = [0, 1]
    while edges[-1] < length:
        edges.append(min(edges[-1] * 2, length))
    return edges


def score_windows(nll_fn, params, val: np.ndarray, length: int, starts, first, limit,
                  batch: int, progress=None):
    """Sum per-position NLL over windows; ``limit``: last scored target index + 1."""
    sums = np.zeros(length, np.float64)
    counts = np.zeros(length, np.float64)
    idx = np.arange(length + 1)
    for i in range(0, len(starts), batch):
        s = starts[i:i + batch]
        f = first[i:i + batch]
        n = len(s)
        if n < batch:  # pad with empty windows: one compiled shape per length
            s = np.concatenate([s, np.repeat(s[:1], batch - n)])
            f = np.concatenate([f, np.full(batch - n, length)])
        win = np.asarray(val[s[:, None] + idx[None, :]], np.int32)
        pos = np.arange(length)[None, :]
        target_index = s[:, None] + pos + 1
        w = (pos >= f[:, None]) & (target_index < limit)
        w[n:] = False
        ps, pc = nll_fn(params, win[:, :-1], win[:, 1:], w.astype(np.float32))
        sums += np.asarray(ps, np.float64)
        counts += np.asarray(pc, np.float64)
        if progress is not None:
            progress.update(n)
    return sums, counts


def evaluate(model, val: np.ndarray, *, train_length: int, ecfg) -> list[dict]:
    """Perplexity at every (mode, length); see the module docstring."""
    check_eval_config(ecfg)
    lengths = eval_lengths(ecfg, train_length)
    check_lengths_fit(ecfg, train_length, val.size)
    graphdef, params = nnx.split(model)
    nll_fn = make_nll_fn(graphdef, ecfg.loss_chunk)
    out = []
    plans = {mode: window_plan(val.size, lengths, mode, ecfg) for mode in ecfg.modes}
    progress = _progress(sum(len(p[L][0]) for p, _ in plans.values() for L in lengths),
                         getattr(ecfg, "progress", False))
    for mode, (plan, e) in plans.items():
        for L in lengths:
            starts, first, offset = plan[L]
            batch = max(1, ecfg.batch_tokens // L)
            progress.set_description(f"eval {mode} {L}")
            sums, counts = score_windows(nll_fn, params, val, L, starts, first,
                                         offset + e + 1, batch, progress=progress)
            total = counts.sum()
            loss = float(sums.sum() / total)
            edges = _log_bins(L)
            bin_loss = []
            for lo, hi in zip(edges[:-1], edges[1:]):
                c = counts[lo:hi].sum()
                bin_loss.append(float(sums[lo:hi].sum() / c) if c else None)
            entry = {"length": L, "mode": mode, "loss": loss,
                     "ppl": float(math.exp(min(loss, 700.0))),
                     "bits_per_token": loss / math.log(2), "tokens": int(total),
                     "windows": int(len(starts)),
                     "position_bins": edges, "position_loss": bin_loss}
            if mode == "sliding":
                entry["stride"] = _stride(ecfg, L)
            out.append(entry)
    progress.close()
    return out


def quick_val_loss(model, val: np.ndarray, length: int, ecfg) -> float:
    """Validation loss at the training length over the final evaluation's non-overlapping
    windows (``train.eval_every`` logs)."""
    graphdef, params = nnx.split(model)
    plan, e = window_plan(val.size, eval_lengths(ecfg, length), "nonoverlap", ecfg)
    starts, first, offset = plan[length]
    sums, counts = score_windows(make_nll_fn(graphdef, ecfg.loss_chunk), params, val, length,
                                 starts, first, offset + e + 1, max(1, ecfg.batch_tokens // length))
    return float(sums.sum() / counts.sum())


def _progress(total: int, enabled: bool):
    return tqdm(total=total, disable=not enabled, unit="window", dynamic_ncols=True,
                mininterval=1.0, leave=False)
