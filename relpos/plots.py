"""Figures and tables from ``results.json`` (and ``bias_profile.json``) files alone."""

from __future__ import annotations

import glob
import json
import math
import os
import zlib
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from relpos.errors import RelposError  # noqa: E402
from relpos.io import atomic_write, atomic_write_text  # noqa: E402

# One colour per scheme across every figure.
SCHEME_ORDER = ["none", "sinusoidal", "learned_abs", "rope", "xpos", "offset", "t5", "alibi",
                "kerple_power", "kerple_log", "sandwich", "fire"]
_PALETTE = list(plt.get_cmap("tab10").colors) + ["#000000", "#e6ab02"]
COLORS = dict(zip(SCHEME_ORDER, _PALETTE))
_CMAP = plt.get_cmap("tab20")


def color(label: str):
    base = label.split(" ")[0]
    if base in COLORS and label == base:
        return COLORS[base]
    # Variants (e.g. "offset (zero beyond L)"): a stable colour of their own.
    return _CMAP(zlib.crc32(label.encode()) % 20)


def collect(inputs: list[str]) -> list[dict]:
    """All results.json under the given files/folders, each with ``run_dir`` added."""
    found = []
    expanded = []
    for item in inputs:  # shell-style patterns select runs, e.g. runs/quick/bias=alibi*
        if glob.has_magic(item):  # a pattern may match nothing (scheme not in this sweep)
            expanded += sorted(glob.glob(os.path.expanduser(item)))
        else:
            expanded.append(item)
    for item in expanded:
        p = Path(item).expanduser()
        if p.is_file():
            paths = [p]
        elif p.is_dir():
            paths = sorted(p.rglob("results.json"))
        else:
            raise RelposError(f"no such results file or folder: {item}")
        for path in paths:
            try:
                r = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise RelposError(f"unreadable results file {path}: {e}") from None
            if isinstance(r, list):  # a merged file
                found += r
            else:
                r["run_dir"] = str(path.parent)
                found.append(r)
    if not found:
        raise RelposError(f"no results.json found under {', '.join(inputs)}")
    return found


def label_of(r: dict) -> str:
    return r.get("label") or r["bias"]


def _order(labels):
    def key(lab):
        base = lab.split(" ")[0]
        return (SCHEME_ORDER.index(base) if base in SCHEME_ORDER else len(SCHEME_ORDER), lab)

    return sorted(labels, key=key)


def grouped(results: list[dict], mode: str) -> dict[str, dict[int, list[float]]]:
    """label -> length -> [ppl per seed]."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        for e in r["eval"]:
            if e["mode"] == mode:
                out[label_of(r)][e["length"]].append(e["ppl"])
    return out


def _fmt(vals: list[float]) -> str:
    if not vals:
        return "–"
    m = float(np.mean(vals))
    if len(vals) == 1:
        return f"{m:.3g}"
    return f"{m:.3g} ± {float(np.std(vals)):.2g}"


def markdown_table(results: list[dict], mode: str = "nonoverlap") -> str:
    """Perplexity per scheme (rows) and length (columns): mean ± std over seeds."""
    g = grouped(results, mode)
    if not g:
        return ""
    train_length = results[0]["train_length"]
    lengths = sorted({L for v in g.values() for L in v})
    head = [f"{L} ({L / train_length:g}x)" for L in lengths]
    seeds = {lab: max(len(v) for v in g[lab].values()) for lab in g}
    lines = [f"Perplexity, {mode} evaluation (mean ± std over seeds; trained at {train_length})",
             "", "| scheme | seeds | " + " | ".join(head) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for lab in _order(g):
        cells = [_fmt(g[lab].get(L, [])) for L in lengths]
        lines.append(f"| {lab} | {seeds[lab]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def profile_offsets(train_length: int, max_length: int, points: int = 256) -> np.ndarray:
    """Every offset up to 2x the training length, then ``points`` log-spaced ones."""
    dense = np.arange(min(2 * train_length, max_length))
    tail = np.geomspace(max(len(dense), 1), max_length - 1, points) if max_length > len(dense) \
        else np.zeros(0)
    return np.unique(np.concatenate([dense, np.round(tail)]).astype(np.int64))


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_ppl_vs_length(results: list[dict], path: Path, title: str = "") -> None:
    modes = [m for m in ("nonoverlap", "sliding") if grouped(results, m)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.4), squeeze=False)
    train_length = results[0]["train_length"]
    for ax, mode in zip(axes[0], modes):
        g = grouped(results, mode)
        for lab in _order(g):
            Ls = sorted(g[lab])
            mean = np.array([np.mean(g[lab][L]) for L in Ls])
            lo = np.array([np.min(g[lab][L]) for L in Ls])
            hi = np.array([np.max(g[lab][L]) for L in Ls])
            ax.plot(Ls, mean, "o-", ms=3, lw=1.5, color=color(lab), label=lab)
            if any(len(g[lab][L]) > 1 for L in Ls):
                ax.fill_between(Ls, lo, hi, color=color(lab), alpha=0.18, lw=0)
        ax.axvline(train_length, color="k", ls="--", lw=1, label="_train length")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"evaluation length (tokens); dashed: training length {train_length}")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"{mode} windows" + (" (stride L/2)" if mode == "sliding" else ""))
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.035 * math.ceil(len(labels) / 6)))
    fig.suptitle(title or "Perplexity vs evaluation length (line: mean, band: min–max over seeds)")
    _save(fig, path)


def plot_position_loss(results: list[dict], path: Path) -> None:
    """Loss vs token position (log-binned) in the longest non-overlapping windows.

    Every scheme is scored on the same windows, so at a given position the schemes are
    comparable, while the curve's overall shape also reflects which tokens sit at those
    positions (few windows at the longest length). The right panel removes that shared
    part: each scheme's loss minus the mean over schemes at the same position.
    """
    longest = max(e["length"] for r in results for e in r["eval"] if e["mode"] == "nonoverlap")
    curves = defaultdict(list)
    edges, windows = None, 0
    for r in results:
        for e in r["eval"]:
            if e["mode"] == "nonoverlap" and e["length"] == longest:
                edges, windows = e["position_bins"], e.get("windows", 0)
                curves[label_of(r)].append([np.nan if x is None else x for x in e["position_loss"]])
    means = {lab: np.nanmean(curves[lab], axis=0) for lab in curves}
    reference = np.nanmean(np.stack(list(means.values())), axis=0)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.4))
    mids = [max(1.0, math.sqrt(max(lo, 1) * hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    train_length = results[0]["train_length"]
    for ax, relative in zip(axes, (False, True)):
        for lab in _order(curves):
            y = means[lab] - reference if relative else means[lab]
            ax.plot(mids, y, "o-", ms=3, color=color(lab), label=lab)
        ax.axvline(train_length, color="k", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token position in window (log-binned); dashed: training length")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].set_title(f"Loss by position, {longest}-token windows ({windows} per run)")
    axes[1].set_ylabel("loss - mean over schemes (nats/token)")
    axes[1].axhline(0, color="0.5", lw=0.8)
    axes[1].set_title("Relative to the mean of all schemes at that position")
    axes[0].legend(fontsize=7, ncol=2, loc="upper left")
    _save(fig, path)


def bias_profile_figure(profile: dict, ax=None, max_heads: int = 16):
    """Bias vs offset per head, the never-trained offsets shaded."""
    at_max = np.asarray(profile["at_max"])  # [H, offsets]
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6, 4))
    offsets = np.asarray(profile.get("offsets", np.arange(at_max.shape[1])))
    cmap = plt.get_cmap("viridis")
    H = min(at_max.shape[0], max_heads)
    for h in range(H):
        ax.plot(offsets + 1, at_max[h], color=cmap(h / max(H - 1, 1)), lw=1.2, label=f"head {h}")
    L = profile["train_length"]
    ax.axvspan(L, offsets[-1] + 1, color="0.85", zorder=0)
    ax.text(L, ax.get_ylim()[0], " offsets never seen in training", fontsize=7, va="bottom")
    ax.set_xscale("log", base=2)
    if np.nanmin(at_max) < -50:  # e.g. KERPLE power heads that explode beyond L
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("offset i - j (+1, log)")
    ax.set_ylabel("bias b_h(i, j)")
    if H > 1:
        ax.legend(fontsize=6, loc="lower left", ncol=2)
    ax.set_title(profile.get("scheme", ""))
    ax.grid(alpha=0.3)
    return ax.figure if own else None


def profile_of(r: dict) -> dict | None:
    """A run's bias profile: embedded (merged files) or beside its results.json."""
    if r.get("bias_profile"):
        return _compact(r["bias_profile"])
    p = Path(r.get("run_dir", "")) / "bias_profile.json"
    return _compact(json.loads(p.read_text())) if p.exists() else None


def _compact(profile: dict) -> dict:
    """Profiles written before log-spaced offsets (every offset 0..max-1): subsample."""
    if "offsets" in profile:
        return profile
    L, M = profile["train_length"], profile["max_length"]
    offs = profile_offsets(L, M)
    at_max = np.asarray(profile["at_max"])[:, offs]
    at_train = np.asarray(profile["at_train"])[:, offs[offs < L]]
    return {**profile, "offsets": offs.tolist(), "at_max": np.round(at_max, 6).tolist(),
            "at_train": np.round(at_train, 6).tolist(),
            "window": np.round(np.asarray(profile["window"]), 6).tolist()}


def merge_results(results: list[dict], path: Path) -> None:
    """One JSON list of every run's results with its bias profile embedded (what a
    study commits instead of run directories full of checkpoints)."""
    merged = []
    for r in results:
        r = dict(r)
        r["bias_profile"] = profile_of(r)
        r.pop("run_dir", None)
        merged.append(r)
    merged.sort(key=lambda r: (label_of(r), r["seed"]))
    atomic_write_text(path, json.dumps(merged, indent=None, separators=(",", ":")) + "\n")


def plot_bias_profiles(results: list[dict], path: Path) -> bool:
    seen = {}
    for r in results:
        lab = label_of(r)
        if lab not in seen and (profile := profile_of(r)) is not None:
            seen[lab] = profile
    if not seen:
        return False
    labs = _order(seen)
    cols = min(3, len(labs))
    rows = math.ceil(len(labs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, lab in zip(axes.flat, labs):
        bias_profile_figure(seen[lab], ax=ax)
        ax.set_title(lab)
    for ax in list(axes.flat)[len(labs):]:
        ax.axis("off")
    fig.suptitle("Bias vs offset per head (query at the longest evaluation position; "
                 "grey: offsets beyond the training length)")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_bias_heatmap(profile: dict, path: Path, head: int = 0) -> None:
    w = np.asarray(profile["window"])[head]
    w = np.where(np.tril(np.ones_like(w, bool)), w, np.nan)
    fig, ax = plt.subplots(figsize=(5, 4.4))
    im = ax.imshow(w, cmap="magma")
    fig.colorbar(im, ax=ax, label="bias (masked: future)")
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.set_title(f"{profile.get('scheme', '')} bias, head {head}, causal window")
    _save(fig, path)


def plot_offset_counts(train_length: int, max_length: int, path: Path) -> None:
    """(query, key) pairs per offset in one window: L - k for k < L, none beyond."""
    k = np.arange(max_length)
    train = np.clip(train_length - k, 0, None)
    evalc = max_length - k
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(k + 1, evalc, color="0.5", label=f"one {max_length}-token eval window")
    ax.plot(k[:train_length] + 1, train[:train_length], color="C3",
            label=f"one {train_length}-token training window")
    ax.axvspan(train_length, max_length, color="0.9", zorder=0)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("offset k = i - j (+1)")
    ax.set_ylabel("(query, key) pairs with this offset")
    ax.set_title("Training signal per offset of the `offset` table\n"
                 "(offset k occurs L - k times; none beyond L - 1)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def make_all(inputs: list[str], out_dir: str, title: str = "",
             merge_to: str | None = None) -> dict[str, str]:
    """Every figure and table the results allow; returns name -> path."""
    results = collect(inputs)
    if merge_to:
        merge_results(results, Path(merge_to))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    plot_ppl_vs_length(results, out / "ppl_vs_length.png", title)
    written["ppl_vs_length"] = str(out / "ppl_vs_length.png")
    plot_position_loss(results, out / "position_loss.png")
    written["position_loss"] = str(out / "position_loss.png")
    if plot_bias_profiles(results, out / "bias_profiles.png"):
        written["bias_profiles"] = str(out / "bias_profiles.png")
    for r in results:
        if r["bias"] == "alibi" and (profile := profile_of(r)) is not None:
            plot_bias_heatmap(profile, out / "bias_heatmap_alibi.png")
            written["bias_heatmap"] = str(out / "bias_heatmap_alibi.png")
            break
    L = results[0]["train_length"]
    longest = max(e["length"] for r in results for e in r["eval"])
    plot_offset_counts(L, longest, out / "offset_counts.png")
    written["offset_counts"] = str(out / "offset_counts.png")
    tables = "\n".join(markdown_table(results, m) for m in ("nonoverlap", "sliding"))
    atomic_write_text(out / "table.md", tables)
    written["table"] = str(out / "table.md")
    return written
