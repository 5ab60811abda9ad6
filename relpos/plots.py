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
import scipy.stats  # noqa: E402

from relpos.errors import RelposError  # noqa: E402
from relpos.io import atomic_write, atomic_write_text, profile_offsets  # noqa: E402

# One style per scheme across every figure: a colour-blind-safe palette
# (tableau-colorblind10) with a distinct marker each; a variant of a scheme (a label
# with more than the scheme's name) keeps its scheme's colour, with its own line style
# and an open marker.
# (10 colours, 12 markers: the first 60 schemes get distinct colour-marker pairs.)
SCHEME_ORDER = ["none", "sinusoidal", "learned_abs", "rope", "xpos", "offset", "t5", "alibi",
                "kerple_power", "kerple_log", "sandwich", "fire", "cope", "dape", "fox",
                "stickbreaking", "ssmax", "hard_alibi", "yarn"]
_PALETTE = plt.style.library["tableau-colorblind10"]["axes.prop_cycle"].by_key()["color"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p"]
_VARIANT_LINES = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]

# What makes two runs the same experiment (their seed aside): relpos-plot pools runs
# over seeds only when all of these agree.
GROUP_KEYS = ("bias", "bias_options", "bias_overrides", "model", "optim", "train_length",
              "train_steps", "dataset", "dataset_fingerprint", "tokenizer", "bias_convention",
              "task", "task_options")
# How attention was computed, not what: runs may differ here and still pool.
_MODEL_FREE = ("attn_impl", "block_size", "dense_max_len")


def style(label: str, labels: list[str] | None = None) -> dict:
    """Matplotlib keywords for ``label``: colour and marker fixed by its scheme; the
    k-th variant of a scheme among ``labels`` (sorted) gets the k-th variant line style,
    and from the fifth variant on also another marker."""
    base = label.split(" ")[0]
    i = SCHEME_ORDER.index(base) if base in SCHEME_ORDER else \
        len(SCHEME_ORDER) + zlib.crc32(base.encode()) % 7
    kw = {"color": _PALETTE[i % len(_PALETTE)], "marker": _MARKERS[i % len(_MARKERS)],
          "linestyle": "-", "markerfacecolor": None}
    if label != base:
        variants = sorted(x for x in (labels or [label]) if x.split(" ")[0] == base and x != base)
        k = variants.index(label) if label in variants else zlib.crc32(label.encode())
        # past the line styles, the next marker too: (style, marker) stays distinct
        kw.update(linestyle=_VARIANT_LINES[k % len(_VARIANT_LINES)], markerfacecolor="white",
                  marker=_MARKERS[(i + k // len(_VARIANT_LINES)) % len(_MARKERS)])
    return kw


def stacked(k: int, n: int, ms: float, lw: float) -> dict:
    """Marker size and line width of the k-th of n curves drawn on one axis: earlier
    curves are drawn larger, so curves that coincide (two schemes at the same values)
    show as concentric markers and a wider line beneath instead of one hiding the other."""
    grow = (n - 1 - k) / max(n - 1, 1)
    return {"ms": ms * (1 + 1.2 * grow), "lw": lw * (1 + 1.5 * grow)}


def coinciding(curves: dict[str, tuple], tol: float) -> dict[str, str]:
    """For each label whose curve ``(x, y)`` matches an earlier one's at every x within
    ``tol`` (absolute, in y), a legend note naming it: ``{"learned_abs": " = rope"}``."""
    notes, seen = {}, []
    for lab, (x, y) in curves.items():
        for other, (x2, y2) in seen:
            if len(x) == len(x2) and np.allclose(x, x2) and np.all(np.abs(
                    np.asarray(y, float) - np.asarray(y2, float)) <= tol):
                notes[lab] = f" = {other}"
                break
        seen.append((lab, (x, y)))
    return notes


def collect(inputs: list[str]) -> list[dict]:
    """All runs under the given files/folders: each folder's ``results.json`` and its
    re-evaluation files (``eval*.json``, what relpos-eval writes). A re-evaluation of the
    same run with the same label adds its entries to the run's (a newer entry of the same
    mode and length replaces the older); one with another label (other
    ``bias_overrides``, or ``label=``) is a run of its own."""
    expanded = []
    for item in inputs:  # shell-style patterns select runs, e.g. runs/quick/bias=alibi*
        # (``**`` spans folders: runs/quick/**/results.json is every run without its re-evaluations)
        # an existing path is taken as it is (a multirun folder name may hold brackets)
        if glob.has_magic(item) and not Path(item).expanduser().exists():
            # a pattern may match nothing (scheme not in this sweep)
            expanded += sorted(glob.glob(os.path.expanduser(item), recursive=True))
        else:
            expanded.append(item)
    found: dict[tuple, dict] = {}
    merged_files = []
    for item in expanded:
        p = Path(item).expanduser()
        if p.is_file():
            paths = [p]
        elif p.is_dir():
            paths = sorted(set(p.rglob("results.json")) | set(p.rglob("eval*.json")),
                           key=lambda x: (str(x.parent), x.name != "results.json", x.name))
        else:
            raise RelposError(f"no such results file or folder: {item}")
        for path in paths:
            try:
                r = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise RelposError(f"unreadable results file {path}: {e}") from None
            if isinstance(r, list):  # a merged file
                merged_files += r
                continue
            if not isinstance(r, dict) or "eval" not in r or "bias" not in r:
                continue  # another JSON file in a run folder
            r["run_dir"] = str(path.parent)
            key = (r["run_dir"], label_of(r))
            if key in found:
                old = {(e["mode"], e["length"]): e for e in found[key]["eval"]}
                old.update({(e["mode"], e["length"]): e for e in r["eval"]})
                found[key]["eval"] = sorted(old.values(), key=lambda e: (e["mode"], e["length"]))
            else:
                found[key] = r
    runs = merged_files + list(found.values())
    if not runs:
        raise RelposError(f"no results.json found under {', '.join(inputs)}")
    check_poolable(runs)
    return runs


def label_of(r: dict) -> str:
    return r.get("label") or r["bias"]


def config_key(r: dict) -> dict:
    """The run's configuration as far as it matters to a comparison (not its seed)."""
    key = {k: r.get(k) for k in GROUP_KEYS}
    if isinstance(key["model"], dict):
        key["model"] = {k: v for k, v in key["model"].items() if k not in _MODEL_FREE}
    return key


def check_poolable(runs: list[dict]) -> None:
    """Runs under one label must differ in their seed only: otherwise one line naming
    the label and the keys that differ (a :class:`RelposError`)."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        task = r.get("task")  # one scheme's label may name runs of several tasks
        by_label[label_of(r) if not task else f"{label_of(r)} on task {task}"].append(r)
    for lab, group in by_label.items():
        ref = config_key(group[0])
        for r in group[1:]:
            other = config_key(r)
            diff = sorted(k for k in GROUP_KEYS if other[k] != ref[k])
            if diff:
                what = ", ".join(
                    f"{k} ({_short(ref[k])} vs {_short(other[k])})" if k in (
                        "dataset_fingerprint", "train_steps", "train_length") else k
                    for k in diff)
                raise RelposError(
                    f"runs labelled {lab!r} differ in {what}: they are not seeds of one "
                    f"experiment; give them distinct labels (label=...) or plot them apart")
        seeds = [r.get("seed") for r in group]
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            dirs = [r.get("run_dir", "?") for r in group if r.get("seed") == dup[0]]
            raise RelposError(f"runs labelled {lab!r} repeat seed {dup[0]} ({', '.join(dirs)})")


def _short(v) -> str:
    return str(v)[:24]


def _order(labels):
    def key(lab):
        base = lab.split(" ")[0]
        return (SCHEME_ORDER.index(base) if base in SCHEME_ORDER else len(SCHEME_ORDER), lab)

    return sorted(labels, key=key)


def grouped(results: list[dict], mode: str, field: str = "ppl"
            ) -> dict[str, dict[int, list[float]]]:
    """label -> length -> [``field`` per seed]."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        for e in r["eval"]:
            if e["mode"] == mode and field in e:
                out[label_of(r)][e["length"]].append(e[field])
    return out


def seed_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a t interval over seeds (sample std, ddof=1): ``(mean, lo, hi)``; with
    one seed the interval is that value."""
    v = np.asarray(values, np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return m, m, m
    half = float(scipy.stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - half, m + half


def _fmt(vals: list[float], single_ci=None, clip: tuple[float, float] | None = None) -> str:
    """Mean [t interval over seeds] (clipped to ``clip``, e.g. (0, 1) for accuracies),
    or one run's value with its own interval ``single_ci``."""
    if not vals:
        return "–"
    m, lo, hi = seed_interval(vals)
    if len(vals) == 1:
        return f"{m:.3f}" + (f" [{single_ci[0]:.3f}, {single_ci[1]:.3f}]" if single_ci else "")
    if clip:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown_table(results: list[dict], mode: str = "nonoverlap") -> str:
    """Perplexity per scheme (rows) and length (columns): mean and 95% t interval over
    seeds (ddof=1); a single run shows its bootstrap interval over target blocks."""
    g = grouped(results, mode)
    if not g:
        return ""
    cis = grouped(results, mode, "ppl_ci")
    trained = train_lengths(results)
    lengths = sorted({L for v in g.values() for L in v})
    head = [f"{L} ({L / trained[0]:g}x)" if len(trained) == 1 else str(L) for L in lengths]
    seeds = {lab: max(len(v) for v in g[lab].values()) for lab in g}
    fps = sorted({r.get("dataset_fingerprint") or "?" for r in results})
    lines = [f"Perplexity, {mode} evaluation: mean [95% t interval over seeds, ddof=1]; "
             f"trained at {_lengths_text(trained)}"
             f"{' (each label at one)' if len(trained) > 1 else ''}; "
             f"corpus fingerprint {', '.join(fps)}",
             "", "| scheme | seeds | " + " | ".join(head) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for lab in _order(g):
        cells = [_fmt(g[lab].get(L, []), (cis[lab].get(L) or [None])[0]
                      if seeds[lab] == 1 else None) for L in lengths]
        lines.append(f"| {lab} | {seeds[lab]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def diagnostics_table(results: list[dict]) -> str:
    """Per scheme: the attention mass on keys at offsets >= L (mean [95% t interval over
    seeds]) at each length > L, and each seed's extrapolation breakpoint at the longest
    non-overlapping length (the first position bin whose loss exceeds the same targets'
    loss at L by more than its interval; "–": none)."""
    mass: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    breaks: dict[str, list[str]] = defaultdict(list)
    for r in sorted(results, key=lambda r: r.get("seed", 0)):
        for m in r.get("attention_far_mass") or []:
            mass[label_of(r)][m["length"]].append(m["mean"])
        long = [e for e in r["eval"] if e["mode"] == "nonoverlap" and "breakpoint" in e]
        if long:
            b = max(long, key=lambda e: e["length"])["breakpoint"]
            breaks[label_of(r)].append("–" if b is None else str(b))
    labs = _order(set(mass) | set(breaks))
    if not labs:
        return ""
    trained = train_lengths(results)
    L0 = str(trained[0]) if len(trained) == 1 else "the run's training length L"
    lengths = sorted({L for v in mass.values() for L in v})
    longest = max(e["length"] for r in results for e in r["eval"])
    lines = [f"Attention mass on keys at offsets >= {L0} (queries at positions >= "
             f"{L0}; mean over layers, heads and windows; mean [95% t interval over "
             f"seeds]), and the breakpoint per seed at {longest} (nonoverlap)", "",
             "| scheme | " + " | ".join(f"mass at {L}" for L in lengths)
             + " | breakpoint per seed |", "|---|" + "---|" * (len(lengths) + 1)]
    for lab in labs:
        cells = [_fmt(mass[lab].get(L, [])) for L in lengths]
        lines.append(f"| {lab} | " + " | ".join(cells) + f" | {', '.join(breaks[lab])} |")
    return "\n".join(lines) + "\n"


def run_identity(r: dict) -> tuple:
    """Which trained run an entry evaluates: its folder where known; in a merged file
    (folders dropped) its seed, final training loss and training time, which
    re-evaluations copy from the run's results.json."""
    if r.get("run_dir"):
        return ("dir", r["run_dir"])
    return ("run", r.get("seed"), r.get("final_train_loss"), r.get("train_seconds"))


def key_window_table(results: list[dict]) -> str:
    """For every run re-evaluated with ``eval.key_window`` W beside its own unmasked
    evaluation (the same trained run, :func:`run_identity`, with the same bias overrides;
    any labels): the per-seed loss difference, masked minus full context, on the same
    targets, per mode and length: mean [95% t interval over seeds], in the row of the
    unmasked run's label. Below zero: the masked keys helped the model."""
    def key(r):
        return run_identity(r), json.dumps(r.get("bias_overrides") or None, sort_keys=True)
    full = {key(r): r for r in results if not r.get("key_window")}
    diffs: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if not r.get("key_window"):
            continue
        base = full.get(key(r))
        if base is None:
            continue
        loss = {(e["mode"], e["length"]): e["loss"] for e in base["eval"] if "loss" in e}
        for e in r["eval"]:
            if "loss" in e and (e["mode"], e["length"]) in loss:
                diffs[(label_of(base), r["key_window"])][(e["mode"], e["length"])].append(
                    e["loss"] - loss[(e["mode"], e["length"])])
    if not diffs:
        return ""
    cols = sorted({c for v in diffs.values() for c in v}, key=lambda c: (c[0] != "nonoverlap",
                                                                          c[0], c[1]))
    lines = ["Keys at offsets >= W masked minus the full context, loss on the same targets "
             "(nats; per-seed difference, mean [95% t interval over seeds]; below 0: the "
             "masked keys helped)", "",
             "| scheme | W | seeds | " + " | ".join(f"{m} {L}" for m, L in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    rank = {lab: i for i, lab in enumerate(_order({lab for lab, _ in diffs}))}
    for (lab, w) in sorted(diffs, key=lambda k: (rank[k[0]], k[1])):
        d = diffs[(lab, w)]
        cells = []
        for c in cols:
            v = d.get(c, [])
            if not v:
                cells.append("–")
                continue
            m, lo, hi = seed_interval(v)
            cells.append(f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]" if len(v) > 1 else f"{m:+.4f}")
        lines.append(f"| {lab} | {w} | {max(len(v) for v in d.values())} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png"))
    plt.close(fig)


def log_ticks(lo: float, hi: float, *, most: int = 8) -> list[float]:
    """Round tick values for a log axis over ``[lo, hi]``: over a narrow range (less than
    3x) evenly spaced round numbers (as a linear axis would have); otherwise the coarsest
    1-2-5, 1-2-3-5 or 1-1.5-2-3-5-7 series per decade that puts 4 or more ticks in range."""
    if hi / lo < 3:
        ticks = matplotlib.ticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
        return [float(f"{t:.6g}") for t in ticks if lo <= t <= hi]
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = []
    for mantissas in ((1, 2, 5), (1, 2, 3, 5), (1, 1.5, 2, 3, 5, 7)):
        ticks = [float(f"{m * 10.0 ** e:.6g}") for e in decades for m in mantissas]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= 4:
            break
    return ticks[::math.ceil(len(ticks) / most)] if len(ticks) > most else ticks


def readable_log_y(ax, values) -> None:
    """A log y axis with a readable number at every tick (plain numbers, see
    :func:`log_ticks`), spanning at least +-5% so that a small change does not fill the
    axis."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0])
    if not len(v):
        return
    lo, hi = float(v.min()), float(v.max())
    lo, hi = min(lo, hi / 1.1) / 1.05, max(hi, lo * 1.1) * 1.05
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(log_ticks(lo, hi)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=np.arange(1, 10)))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def train_lengths(results: list[dict]) -> list[int]:
    """The distinct training lengths of ``results``, sorted (a figure may compare runs
    trained at several lengths, each label at one)."""
    return sorted({r["train_length"] for r in results})


def _lengths_text(lengths: list[int]) -> str:
    return ", ".join(map(str, lengths))


def _log2_x(ax, train_length: int | list[int], label: str) -> None:
    for L in np.atleast_1d(train_length):
        ax.axvline(L, color="k", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel(label)
    ax.grid(alpha=0.3, which="both")


def _legend_below(fig, ax, rows: int, per_row: int = 5) -> None:
    """The schemes' legend (from ``ax``) under the figure, where it covers no curve;
    ``rows``: the figure's rows of panels (the offset below them scales with its height)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(per_row, len(labels)), fontsize=8,
               bbox_to_anchor=(0.5, 0.0 - 0.01 / rows), title="scheme (seeds)",
               title_fontsize=8)


def _curve(g: dict, lab: str, relative: bool, train_length: int | None = None):
    """Lengths, mean, lo, hi over seeds of ``g[lab]`` (relative: each run divided by its
    own perplexity at the training length, or at the shortest length when the training
    length was not evaluated, then averaged)."""
    Ls = sorted(g[lab])
    rows = np.array([g[lab][L] for L in Ls if len(g[lab][L]) == len(g[lab][Ls[0]])])
    Ls = Ls[:len(rows)]
    if relative:
        ref = Ls.index(train_length) if train_length in Ls else 0
        rows = rows / rows[ref:ref + 1]
    stats = np.array([seed_interval(r) for r in rows])
    return Ls, stats[:, 0], stats[:, 1], stats[:, 2], rows.shape[1]


def plot_ppl_vs_length(results: list[dict], path: Path, title: str = "") -> None:
    """Perplexity vs evaluation length (top) and relative to 1x (bottom), per protocol:
    mean over seeds, band = 95% t interval over seeds (one seed: its bootstrap interval
    over target blocks, top row only)."""
    modes = [m for m in ("nonoverlap", "sliding") if grouped(results, m)]
    fig, axes = plt.subplots(2, len(modes), figsize=(6.4 * len(modes), 8.4), squeeze=False)
    trained = train_lengths(results)
    own = {label_of(r): r["train_length"] for r in results}  # one L per label (grouping)
    for col, mode in enumerate(modes):
        g, cis = grouped(results, mode), grouped(results, mode, "ppl_ci")
        labels = _order(g)
        for row, relative in enumerate((False, True)):
            ax, shown = axes[row][col], []
            for k, lab in enumerate(labels):
                Ls, mean, lo, hi, n = _curve(g, lab, relative, own[lab])
                if n == 1 and not relative and all((cis[lab].get(L) or [None])[0] for L in Ls):
                    lo = np.array([cis[lab][L][0][0] for L in Ls])
                    hi = np.array([cis[lab][L][0][1] for L in Ls])
                kw = style(lab, labels)
                ax.plot(Ls, mean, label=f"{lab} ({n})", **stacked(k, len(labels), 4, 1.5), **kw)
                if np.any(hi > lo):
                    ax.fill_between(Ls, lo, hi, color=kw["color"], alpha=0.15, lw=0)
                shown += list(mean) + list(lo) + list(hi)
            readable_log_y(ax, shown)
            _log2_x(ax, trained, f"evaluation length (tokens); dashed: training length"
                                 f"{'s' if len(trained) > 1 else ''} {_lengths_text(trained)}")
            ax.set_ylabel("perplexity / perplexity at 1x" if relative else "perplexity")
            ax.set_title(f"{mode} windows" + (" (stride L/2)" if mode == "sliding" else "")
                         + (", relative to 1x" if relative else "")
                         + (" (each at its own L)" if relative and len(trained) > 1 else ""))
    _legend_below(fig, axes[0][0], rows=2)
    fig.suptitle(title or "Perplexity vs evaluation length (mean over seeds; band: 95% "
                          "t interval over seeds, or one run's bootstrap interval)")
    fig.tight_layout()
    _save(fig, path)


def plot_position_loss(results: list[dict], path: Path) -> None:
    """Loss by token position (log-binned) in the longest non-overlapping windows: the
    loss itself, and (where the runs recorded it) the loss minus that of the same
    targets scored in windows of the training length, so only the context differs."""
    longest = max(e["length"] for r in results for e in r["eval"] if e["mode"] == "nonoverlap")
    curves, excess = defaultdict(list), defaultdict(list)
    edges, windows = None, 0
    for r in results:
        for e in r["eval"]:
            if e["mode"] == "nonoverlap" and e["length"] == longest:
                edges, windows = e["position_bins"], e.get("windows", 0)
                curves[label_of(r)].append([np.nan if x is None else x for x in e["position_loss"]])
                if e.get("position_excess"):
                    excess[label_of(r)].append(
                        [np.nan if x is None else x for x in e["position_excess"]])
    trained = train_lengths(results)
    mids = np.array([max(1.0, math.sqrt(max(lo, 1) * hi)) for lo, hi in zip(edges[:-1], edges[1:])])
    panels = [("loss (nats/token)", curves)] + ([(
        "loss - same targets at the training length (nats)", excess)] if excess else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    labels = _order(curves)
    for ax, (ylabel, data) in zip(axes[0], panels):
        for k, lab in enumerate(labels):
            if lab not in data:
                continue
            stats = np.array([seed_interval(col[np.isfinite(col)]) if np.isfinite(col).any()
                              else (np.nan,) * 3 for col in np.asarray(data[lab]).T])
            kw = style(lab, labels)
            ax.plot(mids, stats[:, 0], label=f"{lab} ({len(data[lab])})",
                    **stacked(k, len(labels), 3, 1.3), **kw)
            if len(data[lab]) > 1:
                ax.fill_between(mids, stats[:, 1], stats[:, 2], color=kw["color"], alpha=0.15,
                                lw=0)
        _log2_x(ax, trained, "token position in window (log-binned); dashed: training "
                             "length" + ("s" if len(trained) > 1 else ""))
        ax.set_ylabel(ylabel)
    axes[0][0].set_title(f"Loss by position, {longest}-token windows ({windows} per run)")
    if excess:
        axes[0][1].axhline(0, color="0.4", lw=0.8)
        axes[0][1].set_title("Above 0: the longer context hurts (same tokens)")
    _legend_below(fig, axes[0][0], rows=1)
    fig.tight_layout()
    _save(fig, path)


def bias_profile_figure(profile: dict, ax=None, max_heads: int = 16, others=()):
    """Bias vs offset per head, the never-trained offsets shaded; ``others``: profiles
    of further seeds, drawn thinner in the same head colours."""
    at_max = np.asarray(profile["at_max"])  # [H, offsets]
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6, 4))
    offsets = np.asarray(profile.get("offsets", np.arange(at_max.shape[1])))
    cmap = plt.get_cmap("viridis")
    H = min(at_max.shape[0], max_heads)
    for h in range(H):
        ax.plot(offsets + 1, at_max[h], color=cmap(h / max(H - 1, 1)), lw=1.2, label=f"head {h}")
        for other in others:
            ax.plot(np.asarray(other["offsets"]) + 1, np.asarray(other["at_max"])[h],
                    color=cmap(h / max(H - 1, 1)), lw=0.6, alpha=0.6)
    L = profile["train_length"]
    ax.axvspan(L, offsets[-1] + 1, color="0.85", zorder=0)
    ax.text(L, ax.get_ylim()[0], " offsets never seen in training", fontsize=7, va="bottom")
    ax.set_xscale("log", base=2)
    masked = np.isneginf(at_max).any(0)  # the offset table's mask policy: no attention
    if masked.any():
        ax.text(offsets[masked][0] + 1, 0.5, " -inf: keys masked", fontsize=7,
                transform=ax.get_xaxis_transform())
    every = np.concatenate([at_max.ravel()] + [np.asarray(o["at_max"]).ravel() for o in others])
    finite = every[np.isfinite(every)]  # every seed drawn: one exploding seed sets the scale
    if finite.size and finite.min() < -50:  # e.g. KERPLE power heads that explode beyond L
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
    if r.get("bias_overrides"):  # the saved profile is of the scheme as trained, not as evaluated
        return None
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
    """Every seed's bias vs offset per head (the first seed in full lines, the others
    thinner), one panel per label."""
    seen: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(results, key=lambda r: r.get("seed", 0)):
        if (profile := profile_of(r)) is not None:
            seen[label_of(r)].append(profile)
    if not seen:
        return False
    labs = _order(seen)
    cols = min(3, len(labs))
    rows = math.ceil(len(labs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, lab in zip(axes.flat, labs):
        bias_profile_figure(seen[lab][0], ax=ax, others=seen[lab][1:])
        n = len(seen[lab])
        ax.set_title(f"{lab} ({n} seed{'s' if n != 1 else ''})")
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


# ----------------------------------------------------------------------------- task accuracy


def accuracy_panels(results: list[dict], field: str = "accuracy"
                    ) -> dict[str, dict[str, dict[int, list]]]:
    """panel -> label -> length -> [``field`` per seed] over the entries with an
    accuracy: one panel per task (``task`` runs) and one for the LMs' passkey retrieval
    (``passkey`` entries, no task training)."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in sorted(results, key=lambda r: r.get("seed", 0)):
        for e in r["eval"]:
            if "accuracy" in e and field in e:
                panel = _panel_of(e)
                out[panel][label_of(r)][e["length"]].append(e[field])
    return out


def _panel_of(e: dict) -> str:
    return (f"task {e['task']}" if e["mode"] == "task"
            else f"{e['mode']} (LM, no task training)")


def _panel_train_length(results: list[dict], panel: str) -> int:
    """The training length of the runs in one accuracy panel (tasks differ: copy at 32,
    passkey at 128); one panel holding several is refused, its columns would mislead."""
    lengths = {r["train_length"] for r in results
               if any("accuracy" in e and _panel_of(e) == panel for e in r["eval"])}
    if len(lengths) != 1:
        raise RelposError(f"{panel} pools runs trained at lengths "
                          f"{sorted(lengths)}; plot them from separate inputs")
    return lengths.pop()


def _accuracy_curve(seeds: dict[int, list], single_ci: dict[int, list]):
    """Lengths, mean, lo, hi: a t interval over seeds (ddof=1), or for one seed the
    run's own interval (Wilson for exact match, bootstrap for token accuracy)."""
    Ls = sorted(seeds)
    stats = []
    for L in Ls:
        m, lo, hi = seed_interval(seeds[L])
        if len(seeds[L]) == 1 and single_ci.get(L) and single_ci[L][0] is not None:
            lo, hi = single_ci[L][0]
        stats.append((m, max(lo, 0.0), min(hi, 1.0)))
    s = np.array(stats)
    return Ls, s[:, 0], s[:, 1], s[:, 2]


def _same_note(label: str, exact: dict[str, str], token: dict[str, str]) -> str:
    """The legend note of a curve that another hides: the same in both rows of the
    accuracy figure, or named per row."""
    a, b = exact.get(label, ""), token.get(label, "")
    if a == b:
        return a
    return "".join(f" ({what}{note})" for what, note in (("exact", a), ("per token", b)) if note)


def plot_accuracy_vs_length(results: list[dict], path: Path, title: str = "") -> bool:
    """Exact-match (top) and per-token (bottom) accuracy vs evaluation length, one column
    per task (and one for passkey retrieval by LMs): mean over seeds, band = 95% t
    interval over seeds, or for one seed its Wilson (exact match) / bootstrap (tokens)
    interval; dotted: chance per token. Same scheme styles as the perplexity figures."""
    rows = [("accuracy", "accuracy_ci", "exact-match accuracy"),
            ("token_accuracy", "token_accuracy_ci", "per-token accuracy")]
    panels = accuracy_panels(results)
    if not panels:
        return False
    names = sorted(panels)
    fig, axes = plt.subplots(2, len(names), figsize=(5.2 * len(names), 7.6), squeeze=False)
    chance = {}
    for r in results:
        for e in r["eval"]:
            if "chance" in e:
                chance[_panel_of(e)] = e["chance"]
    notes = []  # per column: the hidden-curve notes of each row
    for col, panel in enumerate(names):
        train_length = _panel_train_length(results, panel)
        drawn = []
        for row, (field, ci_field, ylabel) in enumerate(rows):
            g, cis = accuracy_panels(results, field)[panel], accuracy_panels(results, ci_field)
            ax, labels = axes[row][col], _order(g)
            curves = {lab: _accuracy_curve(g[lab], cis.get(panel, {}).get(lab, {}))
                      for lab in labels}
            drawn.append(coinciding({lab: c[:2] for lab, c in curves.items()}, tol=0.005))
            for k, lab in enumerate(labels):
                Ls, mean, lo, hi = curves[lab]
                kw = style(lab, labels)
                n = max(len(v) for v in g[lab].values())
                ax.plot(Ls, mean, label=f"{lab} ({n})", **stacked(k, len(labels), 4, 1.4), **kw)
                ax.fill_between(Ls, lo, hi, color=kw["color"], alpha=0.15, lw=0)
            if row == 1 and panel in chance:
                ax.axhline(chance[panel], color="0.4", ls=":", lw=1, label="chance per token")
            _log2_x(ax, train_length, "evaluation length (tokens); dashed: training length")
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel(ylabel)
            ax.set_title(panel if row == 0 else "")
        notes.append(drawn)
    fig.suptitle(title or "Task accuracy vs evaluation length\n(mean over seeds; band: 95% t "
                          "interval over seeds,\nor one run's Wilson / bootstrap interval)",
                 fontsize=10)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    for col, drawn in enumerate(notes):  # a legend under each column, below its x label
        ax = axes[1][col]
        handles, labels = ax.get_legend_handles_labels()
        labels = [lab + _same_note(lab.rsplit(" (", 1)[0], *drawn) for lab in labels]
        below = ax.transAxes.inverted().transform((0, ax.get_tightbbox(renderer).y0))[1]
        ax.legend(handles, labels, fontsize=7, ncol=2, loc="upper center",
                  bbox_to_anchor=(0.5, below - 0.02), title="scheme (seeds)", title_fontsize=7)
    _save(fig, path)
    return True


def accuracy_table(results: list[dict]) -> str:
    """Exact-match and per-token accuracy per task, scheme (rows) and length (columns):
    mean [95% t interval over seeds, ddof=1, clipped to [0, 1]]; a single run shows its
    own interval (Wilson for exact match, bootstrap over sequences for tokens)."""
    out = []
    for field, name, single in (("accuracy", "Exact-match accuracy", "Wilson interval over "
                                 "test sequences"),
                                ("token_accuracy", "Per-token accuracy", "bootstrap interval "
                                 "over test sequences")):
        panels, cis = accuracy_panels(results, field), accuracy_panels(results, f"{field}_ci")
        for panel in sorted(panels):
            g = panels[panel]
            lengths = sorted({L for v in g.values() for L in v})
            train_length = _panel_train_length(results, panel)
            out += [f"{name}, {panel}: mean [95% t interval over seeds, ddof=1, clipped to "
                    f"[0, 1]; one seed: {single}]; trained at {train_length}", "",
                    "| scheme | seeds | " + " | ".join(f"{L} ({L / train_length:g}x)"
                                                       for L in lengths)
                    + " |", "|---|---|" + "---|" * len(lengths)]
            for lab in _order(g):
                seeds = max(len(v) for v in g[lab].values())
                cells = [_fmt(g[lab].get(L, []),
                              (cis.get(panel, {}).get(lab, {}).get(L) or [None])[0]
                              if seeds == 1 else None, clip=(0.0, 1.0)) for L in lengths]
                out.append(f"| {lab} | {seeds} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def make_all(inputs: list[str], out_dir: str, title: str = "",
             merge_to: str | None = None) -> dict[str, str]:
    """Every figure and table the results allow; returns name -> path."""
    results = collect(inputs)
    if merge_to:
        merge_results(results, Path(merge_to))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    lm = [r for r in results if any("ppl" in e for e in r["eval"])]  # task runs have none
    if lm:
        plot_ppl_vs_length(lm, out / "ppl_vs_length.png", title)
        written["ppl_vs_length"] = str(out / "ppl_vs_length.png")
        plot_position_loss(lm, out / "position_loss.png")
        written["position_loss"] = str(out / "position_loss.png")
    if plot_accuracy_vs_length(results, out / "accuracy_vs_length.png", title):
        written["accuracy_vs_length"] = str(out / "accuracy_vs_length.png")
    if plot_bias_profiles(results, out / "bias_profiles.png"):
        written["bias_profiles"] = str(out / "bias_profiles.png")
    for r in results:
        if r["bias"] == "alibi" and (profile := profile_of(r)) is not None:
            plot_bias_heatmap(profile, out / "bias_heatmap_alibi.png")
            written["bias_heatmap"] = str(out / "bias_heatmap_alibi.png")
            break
    if any(r.get("position_coverage") for r in results):  # some run trained a table
        longest = max(e["length"] for r in results for e in r["eval"])
        plot_offset_counts(train_lengths(results)[0], longest, out / "offset_counts.png")
        written["offset_counts"] = str(out / "offset_counts.png")
    tables = "\n".join(markdown_table(lm, m) for m in ("nonoverlap", "sliding")) if lm else ""
    tables += ("\n" + diagnostics_table(lm)) if lm else ""
    paired = key_window_table(lm) if lm else ""
    tables += ("\n" + paired) if paired else ""
    tables += "\n" + accuracy_table(results)
    atomic_write_text(out / "table.md", tables)
    written["table"] = str(out / "table.md")
    return written
