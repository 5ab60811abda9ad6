"""Extrapolation evaluation: per-token NLL at many window lengths, two protocols.

The scored targets are ``ceil(eval.tokens / longest)`` blocks of ``longest`` consecutive
validation tokens spread evenly over the whole split (many documents, not its first
bytes; :func:`target_blocks`). Every mode and every length scores the same targets, so
perplexities are comparable across lengths and protocols:

* ``nonoverlap``: each block split into consecutive windows of length L (early tokens
  of each window have little context);
* ``sliding``: windows of length L moved by a stride S (default L/2); only the last S
  positions of each window are scored, so every scored token has >= L - S context.

Intervals (``loss_ci``, ``ppl_ci``, per position bin) are 95% percentile bootstraps over
the target blocks: tokens of one block share their document and context and are not
independent, while blocks lie far apart in the split. Per-position losses are
log-binned. For non-overlapping windows longer than the training length,
``position_excess`` is each bin's loss minus the loss of *the same targets* in windows
of the training length (only the context differs), and ``breakpoint`` is the first bin
at or beyond the training length where that excess is above zero by more than its
interval. The LM head and loss run over position chunks, so
``[T, vocab]`` logits never exist whole; attention switches to the blockwise path
beyond ``model.dense_max_len``.
"""

from __future__ import annotations

import dataclasses
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
    if getattr(ecfg, "attention_windows", 0) < 0:
        raise RelposError("eval.attention_windows must be >= 0 (0: no attention-mass "
                          f"diagnostic), got {ecfg.attention_windows}")
    if ecfg.stride < 0:
        raise RelposError(f"eval.stride must be >= 0 (0: half the window), got {ecfg.stride}")
    if getattr(ecfg, "key_window", 0) < 0:
        raise RelposError("eval.key_window must be >= 0 (0: the whole context; W: keys at "
                          f"offsets >= W masked), got {ecfg.key_window}")


def with_key_window(model, window: int):
    """``model`` (unchanged) if ``window`` is 0, else a copy sharing its parameters whose
    attention masks keys at offsets ``>= window`` in every layer, whatever its position
    scheme (``ModelConfig.attention_window``): the control for whether a model uses
    context beyond ``window``."""
    if not window:
        return model
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)
    out.cfg = dataclasses.replace(out.cfg, attention_window=int(window))
    return out


def _stride(ecfg, length: int) -> int:
    s = ecfg.stride or max(1, length // 2)
    return min(s, length)


def check_lengths_fit(ecfg, train_length: int, n_val: int) -> None:
    longest = max(eval_lengths(ecfg, train_length))
    if longest + 1 > n_val:
        raise RelposError(
            f"eval length {longest} is longer than the validation split ({n_val} tokens); "
            f"use shorter eval.multiples/eval.lengths or a larger corpus")
    lengths = eval_lengths(ecfg, train_length)
    target_blocks(n_val, lengths, ecfg)  # room for the sliding context too


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


@dataclasses.dataclass(frozen=True)
class Windows:
    """The windows of one (mode, length): window ``w`` reads ``val[starts[w] :
    starts[w] + L + 1]`` and scores its positions ``>= first[w]`` whose target index is
    ``< stop[w]``; it belongs to target block ``block[w]``."""

    starts: np.ndarray
    first: np.ndarray
    stop: np.ndarray
    block: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)


def target_blocks(n_val: int, lengths: list[int], ecfg) -> tuple[np.ndarray, int]:
    """Where the scored targets are: ``ceil(eval.tokens / longest)`` blocks of
    ``longest`` consecutive targets (target indices ``t + 1 .. t + longest`` for each
    start ``t``), spread evenly over the whole validation split, so they come from many
    documents rather than its first bytes. Every block leaves room before it for the
    longest sliding-window context, so both modes score the same targets at every
    length. Returns the block starts and the block length."""
    longest = max(lengths)
    context = max(L - _stride(ecfg, L) for L in lengths)
    room = n_val - 1 - context  # targets context+1 .. n_val-1
    n = min(-(-ecfg.tokens // longest), room // longest)
    if n < 1:
        raise RelposError(
            f"validation split ({n_val} tokens) is too short for windows of length {longest} "
            f"with {context} tokens of sliding context; shorten eval lengths")
    gap = (room - n * longest) / n  # spare targets, spread between the blocks
    starts = context + np.floor(np.arange(n) * (longest + gap) + gap / 2).astype(np.int64)
    return starts, longest


def window_plan(n_val: int, lengths: list[int], mode: str, ecfg) -> dict[int, Windows]:
    """The windows of every length for ``mode`` over :func:`target_blocks`.

    ``nonoverlap``: each block cut into consecutive windows of L (a last window that
    would cross the block's end is moved back and scores only its new targets);
    ``sliding``: windows moved by the stride S, each scoring its last S positions.
    No target is scored twice, and every length scores the same targets.
    """
    blocks, size = target_blocks(n_val, lengths, ecfg)
    plan = {}
    for L in lengths:
        step = L if mode == "nonoverlap" else _stride(ecfg, L)
        first0 = L - step
        k = np.arange(0, size, step)  # nominal first target offset within a block
        nominal = (blocks[:, None] - first0 + k[None, :]).reshape(-1)
        block = np.repeat(np.arange(len(blocks)), len(k))
        stop = blocks[block] + size + 1
        # clamp: a window may not read past its block's last target (nor the split)
        starts = np.minimum(nominal, np.minimum(stop - 1, n_val - 1) - L)
        plan[L] = Windows(starts, first0 + (nominal - starts), stop, block)
    return plan


@functools.lru_cache(maxsize=8)
def make_nll_fn(graphdef, chunk: int):
    """jit ``(params, inputs [B, L], targets [B, L], weights [B, L]) -> nll * weights
    [B, L]`` with the LM head applied ``chunk`` positions at a time. Cached per (graph,
    chunk), so in-training evaluations reuse one compiled function."""

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
        return nll * weights

    return jax.jit(fn)


def _log_bins(length: int) -> list[int]:
    edges = [0, 1]
    while edges[-1] < length:
        edges.append(min(edges[-1] * 2, length))
    return edges


def score_windows(nll_fn, params, val: np.ndarray, length: int, windows: Windows,
                  batch: int, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-window, per-position NLL and weights, each ``[W, L]`` float64."""
    nll = np.zeros((len(windows), length), np.float64)
    weight = np.zeros((len(windows), length), np.float64)
    idx = np.arange(length + 1)
    pos = np.arange(length)[None, :]
    for i in range(0, len(windows), batch):
        s, f, stop = (x[i:i + batch] for x in (windows.starts, windows.first, windows.stop))
        n = len(s)
        if n < batch:  # pad with empty windows: one compiled shape per length
            s, f, stop = (np.concatenate([x, np.repeat(x[:1], batch - n)]) for x in (s, f, stop))
        win = np.asarray(val[s[:, None] + idx[None, :]], np.int32)
        w = (pos >= f[:, None]) & (s[:, None] + pos + 1 < stop[:, None])
        w[n:] = False
        out = nll_fn(params, win[:, :-1], win[:, 1:], w.astype(np.float32))
        nll[i:i + n] = np.asarray(out, np.float64)[:n]
        weight[i:i + n] = w[:n]
        if progress is not None:
            progress.update(n)
    return nll, weight


def _block_sums(values: np.ndarray, block: np.ndarray, n_blocks: int) -> np.ndarray:
    """Sum rows of ``values [W, ...]`` by their block: ``[n_blocks, ...]``."""
    out = np.zeros((n_blocks,) + values.shape[1:], np.float64)
    np.add.at(out, block, values)
    return out


def _bootstrap(arrays, statistic):
    """Percentile bootstrap (scipy) over clusters, 2000 resamples, a fixed seed."""
    import scipy.stats  # here, not at module level: it adds ~1 s to every CLI's start

    res = scipy.stats.bootstrap(arrays, statistic, paired=True, vectorized=True,
                                n_resamples=2000, confidence_level=0.95, method="percentile",
                                rng=np.random.default_rng(0))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def ratio_ci(num: np.ndarray, den: np.ndarray) -> list[float] | None:
    """95% interval of ``sum(num) / sum(den)`` by a percentile bootstrap over clusters
    (the rows, resampled with their weights); None with fewer than 3 clusters."""
    keep = den > 0
    if keep.sum() < 3:
        return None
    return list(_bootstrap((num[keep], den[keep]),
                           lambda n, d, axis: n.sum(axis) / d.sum(axis)))


def excess_by_position(windows: Windows, nll, weight, ref: np.ndarray, edges: list[int],
                       n_blocks: int) -> tuple[list, list]:
    """Per position bin: the mean over its targets of ``nll - ref[target]`` (``ref``: the
    same targets' NLL in windows of the training length) and its 95% interval (bootstrap
    over blocks). Same tokens, more context: above zero, the longer window hurts."""
    targets = windows.starts[:, None] + np.arange(nll.shape[1])[None, :] + 1
    diff = np.where(weight > 0, nll - ref[np.minimum(targets, len(ref) - 1)], 0.0)
    means, cis = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        d = _block_sums(diff[:, lo:hi].sum(1), windows.block, n_blocks)
        w = _block_sums(weight[:, lo:hi].sum(1), windows.block, n_blocks)
        means.append(float(d.sum() / w.sum()) if w.sum() else None)
        cis.append(ratio_ci(d, w))
    return means, cis


def breakpoint_of(edges: list[int], cis: list, train_length: int) -> int | None:
    """The first position bin at or beyond ``train_length`` whose excess loss (see
    :func:`excess_by_position`) is above zero by more than its 95% interval: the bin's
    first position, or None."""
    for lo, ci in zip(edges[:-1], cis):
        if lo >= train_length and ci is not None and ci[0] > 0:
            return int(lo)
    return None


def _ppl(loss: float) -> float:
    return float(math.exp(min(loss, 700.0)))


def summarize(mode: str, L: int, windows: Windows, nll, weight, n_blocks: int,
              train_length: int, ref: np.ndarray | None = None) -> dict:
    """One eval entry: loss/ppl with 95% intervals over target blocks, per-position
    (log-binned) losses with intervals, and with ``ref`` (per-target NLL at the training
    length) the excess loss by position and the extrapolation breakpoint."""
    edges = _log_bins(L)
    bins = [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
    per_bin_nll = np.stack([nll[:, b].sum(1) for b in bins], 1)  # [W, bins]
    per_bin_w = np.stack([weight[:, b].sum(1) for b in bins], 1)
    block_nll = _block_sums(per_bin_nll, windows.block, n_blocks)  # [blocks, bins]
    block_w = _block_sums(per_bin_w, windows.block, n_blocks)
    total = weight.sum()
    loss = float(nll.sum() / total)
    loss_ci = ratio_ci(block_nll.sum(1), block_w.sum(1))
    sums, counts = per_bin_nll.sum(0), per_bin_w.sum(0)
    entry = {"length": L, "mode": mode, "loss": loss, "ppl": _ppl(loss),
            "bits_per_token": loss / math.log(2), "tokens": int(total),
             "windows": len(windows), "blocks": n_blocks, "loss_ci": loss_ci,
             "ppl_ci": None if loss_ci is None else [_ppl(x) for x in loss_ci],
             "position_bins": edges,
             "position_loss": [float(a / c) if c else None for a, c in zip(sums, counts)],
             "position_loss_ci": [ratio_ci(block_nll[:, i], block_w[:, i])
                                  for i in range(len(bins))]}
    if ref is not None:
        means, cis = excess_by_position(windows, nll, weight, ref, edges, n_blocks)
        entry.update(position_excess=means, position_excess_ci=cis,
                     breakpoint=breakpoint_of(edges, cis, train_length))
    return entry


def evaluate(model, val: np.ndarray, *, train_length: int, ecfg) -> list[dict]:
    """Perplexity at every (mode, length), with 95% intervals; see the module docstring."""
    check_eval_config(ecfg)
    lengths = eval_lengths(ecfg, train_length)
    check_lengths_fit(ecfg, train_length, val.size)
    graphdef, params = nnx.split(model)
    nll_fn = make_nll_fn(graphdef, ecfg.loss_chunk)
    n_blocks = len(target_blocks(val.size, lengths, ecfg)[0])
    plans = {mode: window_plan(val.size, lengths, mode, ecfg) for mode in ecfg.modes}
    progress = _progress(sum(len(p[L]) for p in plans.values() for L in lengths),
                         getattr(ecfg, "progress", False))
    out = []
    for mode, plan in plans.items():
        ref = None  # per-target NLL at the training length (nonoverlap): the control
        for L in sorted(lengths, key=lambda x: x != train_length):
            progress.set_description(f"eval {mode} {L}")
            nll, weight = score_windows(nll_fn, params, val, L, plan[L],
                                        max(1, ecfg.batch_tokens // L), progress=progress)
            entry = summarize(mode, L, plan[L], nll, weight, n_blocks, train_length,
                              ref if L != train_length else None)
            if mode == "nonoverlap" and L == train_length:
                ref = per_target(plan[L], nll, weight, val.size)
            if mode == "sliding":
                entry["stride"] = _stride(ecfg, L)
            out.append(entry)
    progress.close()
    return sorted(out, key=lambda e: (list(plans).index(e["mode"]), e["length"]))


def per_target(windows: Windows, nll, weight, n_val: int) -> np.ndarray:
    """``[n_val]`` NLL of each scored target by its index (NaN where not scored)."""
    out = np.full(n_val, np.nan)
    targets = windows.starts[:, None] + np.arange(nll.shape[1])[None, :] + 1
    out[targets[weight > 0]] = nll[weight > 0]
    return out


def quick_val_loss(model, val: np.ndarray, length: int, ecfg) -> float:
    """Validation loss at the training length over the final evaluation's non-overlapping
    windows (``train.eval_every`` logs)."""
    graphdef, params = nnx.split(model)
    windows = window_plan(val.size, eval_lengths(ecfg, length), "nonoverlap", ecfg)[length]
    nll, weight = score_windows(make_nll_fn(graphdef, ecfg.loss_chunk), params, val, length,
                                windows, max(1, ecfg.batch_tokens // length))
    return float(nll.sum() / weight.sum())


def _progress(total: int, enabled: bool):
    return tqdm(total=total, disable=not enabled, unit="window", dynamic_ncols=True,
                mininterval=1.0, leave=False)
