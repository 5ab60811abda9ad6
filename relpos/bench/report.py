"""What ``relpos-bench`` reports: the FLOP convention and MFU, the measured matmul peak,
the host, the per-case training rows, and the printed tables.

The leaf of :mod:`relpos.bench`: imports no other module of the package.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from relpos.nn import DTYPES, TransformerLM

FLOP_CONVENTION = (
    "PaLM (Chowdhery et al. 2022, appendix B): training FLOPs per token = 6 N + 12 L T d, "
    "N = non-embedding parameters (transformer blocks + final LayerNorm; excludes the token "
    "embedding, the tied LM head and position-scheme parameters), L layers, T the training "
    "length (context), d = d_model. The attention term counts the full T x T score matrix "
    "(the causal half is NOT discounted), forward + backward. The same model FLOPs are "
    "used for every scheme, so position-scheme work (bias evaluation, rotations) lowers "
    "MFU rather than adding FLOPs."
)


# ----------------------------------------------------------------------------- FLOPs


def non_embedding_params(model: TransformerLM) -> int:
    """Parameters of the blocks and final norm (see :data:`FLOP_CONVENTION`)."""
    parts = (model.blocks, model.ln_f)
    return int(sum(x.size for p in parts for x in jax.tree.leaves(nnx.state(p, nnx.Param))))


def train_flops_per_token(n_params: int, num_layers: int, length: int, d_model: int) -> float:
    """``6 N + 12 L T d`` (PaLM; full T x T attention, no causal discount)."""
    return 6.0 * n_params + 12.0 * num_layers * length * d_model


# ----------------------------------------------------------------------------- peak


def measure_matmul_peak(dtype: str = "float32", sizes=(1024, 2048, 4096),
                        repeats: int = 5) -> dict:
    """Best observed ``jnp.dot`` rate of square ``n x n`` matrices (2 n^3 FLOPs)."""
    dt = DTYPES[dtype]
    dot = jax.jit(jnp.dot)
    samples = []
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dt)
        b = jax.random.normal(jax.random.key(1), (n, n), dt)
        dot(a, b).block_until_ready()  # compile + first touch
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dot(a, b).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        samples.append({"n": n, "best_s": best, "gflops": 2 * n**3 / best / 1e9})
    top = max(samples, key=lambda s: s["gflops"])
    return {"dtype": dtype, "gflops": top["gflops"], "n": top["n"], "repeats": repeats,
            "method": "max over sizes of the best-of-repeats jit(jnp.dot) time, 2 n^3 FLOPs",
            "samples": samples}


# ----------------------------------------------------------------------------- host


def cpu_threads() -> int:
    """CPUs this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def host_info() -> dict:
    cpu = None
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), None)
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_threads": cpu_threads(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "ld_preload": os.environ.get("LD_PRELOAD"), "xla_flags": os.environ.get("XLA_FLAGS"),
            "loadavg_start": list(os.getloadavg())}


# ----------------------------------------------------------------------------- rows


def train_rows(times: dict[str, list[float]], cases: list, *, steps: int,
               tokens_per_step: int, flops_per_step: float, peak_flops: float,
               spec_peak_flops: float = 0.0, reference: str = "none") -> list[dict]:
    """One row per case; ``mfu_spec`` (against a data-sheet peak) only if one is given."""
    refs = {c.steps_per_call: times[c.name] for c in cases
            if getattr(c, "scheme", None) == reference}
    rows = []
    for case in cases:
        t = times[case.name]
        # against ``none`` at the same steps per call (the peer: at the fewest measured)
        k = getattr(case, "steps_per_call", None)
        ref = refs[k] if k in refs else refs[min(refs)]
        step_s = statistics.median(t) / steps
        ratios = [a / b for a, b in zip(t, ref)]
        rows.append({
            "scheme": case.name,
            "position_scheme": getattr(case, "scheme", None),
            "steps_per_call": k,
            "tokens_per_s": tokens_per_step / step_s,
            "step_s": step_s,
            "step_s_min": min(t) / steps,
            "round_s": t,
            "mfu": flops_per_step / step_s / peak_flops,
            **({"mfu_spec": flops_per_step / step_s / spec_peak_flops} if spec_peak_flops
               else {}),
            "ratio_to_none": statistics.median(ratios),
            **case.summary(),
        })
    return rows


def peer_entry(rows, peer, reason, requested) -> dict:
    """The ``train.peer`` entry: the peer's row and relpos alibi's speedup over it."""
    if not requested:
        return {"requested": False}
    if peer is None:
        return {"requested": True, "available": False, "reason": reason}
    by = {r["scheme"]: r for r in rows}
    theirs = by[peer.name]
    entry = {"requested": True, "available": True, **theirs}
    mine = {r["steps_per_call"]: r for r in rows if r["position_scheme"] == "alibi"}
    if mine:
        speedup = {str(k): statistics.median(a / b for a, b in zip(theirs["round_s"], r["round_s"]))
                   for k, r in sorted(mine.items())}
        entry["relpos_alibi_speedup_by_steps_per_call"] = speedup
        entry["relpos_alibi_speedup"] = speedup[str(max(mine))]  # >1: relpos faster
        entry["note"] = ("relpos_alibi_speedup = median over rounds of x-transformers step "
                         "time / relpos alibi step time (= relpos tokens/s / x-transformers "
                         "tokens/s), at the most steps per call measured")
    else:
        entry["note"] = "include alibi in --schemes for the relpos/x-transformers ratio"
    return entry


# ----------------------------------------------------------------------------- tables


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def format_train_table(result: dict) -> str:
    t = result["train"]
    lines = [f"training: preset={result['config']['preset']} batch={result['config']['batch']} "
             f"length={result['config']['length']} dtype={result['config']['dtype']} "
             f"({result['config']['steps']} steps x {result['config']['repeats']} rounds, "
             f"{'/'.join(map(str, result['config']['steps_per_call']))} steps per call; "
             f"median)",
             f"{'scheme':<22}{'tokens/s':>10}{'step ms':>9}{'MFU %':>7}{'x none':>8}"
             f"{'compile s':>10}{'XLA GF/step':>12}  attention"]
    rows = t["rows"] + ([t["peer"]] if t["peer"].get("available") else [])
    for r in rows:
        xla = r.get("xla_flops_per_step")
        lines.append(f"{r['scheme']:<22}{r['tokens_per_s']:>10,.0f}{r['step_s'] * 1e3:>9.0f}"
                     f"{r['mfu'] * 100:>7.1f}{r['ratio_to_none']:>8.2f}"
                     f"{_fmt(r.get('compile_s'), '.1f'):>10}"
                     f"{_fmt(xla / 1e9 if xla else None, '.1f'):>12}  {r.get('attention', '-')}")
    p = result["matmul_peak"]
    f = t["flops"]
    lines.append(f"MFU against measured {p['dtype']} matmul peak {p['gflops']:.1f} GFLOP/s "
                 f"(n={p['n']}); model FLOPs/step {f['flops_per_step'] / 1e9:.1f} G "
                 f"(6N + 12LTd, N={f['non_embedding_params']:,}, causal half not discounted)")
    spec = result["config"].get("spec_peak_tflops")
    if spec:
        lines.append("MFU against the data-sheet peak of " f"{spec:g} TFLOP/s: " + ", ".join(
            f"{r['scheme']} {r['mfu_spec'] * 100:.1f}%" for r in t["rows"]))
    peer = t["peer"]
    if peer.get("requested"):
        if peer.get("available") and "relpos_alibi_speedup" in peer:
            by_k = peer["relpos_alibi_speedup_by_steps_per_call"]
            ratio = ", ".join(f"{v:.2f}x" + (f" at {k} steps/call" if len(by_k) > 1 else "")
                              for k, v in by_k.items())
            lines.append(f"peer: relpos alibi / x-transformers alibi throughput = "
                         f"{ratio} (torch {peer['torch']}, "
                         f"x-transformers {peer['x_transformers']}, {peer['threads']} threads)")
        else:
            lines.append(f"peer: {peer.get('reason') or peer.get('note')}")
    return "\n".join(lines)


def format_eval_line(p: dict) -> str:
    """One evaluation point in a progress line."""
    if p.get("status") == "ok":
        return (f"{p['tokens_per_s']:,.0f} tok/s, XLA {_fmt(p.get('xla_peak_gib'), '.3f')} GiB,"
                f" RSS +{_fmt(p.get('rss_peak_growth_gib'), '.3f')} GiB")
    return f"{p.get('status')}: {p.get('note')}"


def format_eval_table(ev: dict) -> str:
    lines = [f"evaluation: preset={ev['preset']} scheme={ev['scheme']}, one window "
             "(forward + chunked loss)",
             f"{'impl':<10}{'length':>8}{'tokens/s':>10}{'seconds':>9}{'XLA GiB':>9}"
             f"{'RSS+ GiB':>10}  note"]
    for p in ev["points"]:
        ok = p.get("status") == "ok"
        lines.append(
            f"{p['impl']:<10}{p['length']:>8}"
            f"{_fmt(p.get('tokens_per_s') if ok else None, ',.0f'):>10}"
            f"{_fmt(p.get('seconds') if ok else None, '.2f'):>9}"
            f"{_fmt(p.get('xla_peak_gib'), '.3f'):>9}"
            f"{_fmt(p.get('rss_peak_growth_gib'), '.3f'):>10}  "
            f"{'' if ok else p.get('status', '') + ': ' + p.get('note', '')}")
    return "\n".join(lines)
