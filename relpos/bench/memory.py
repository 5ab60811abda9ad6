"""The evaluation side of ``relpos-bench``: one long window through the forward pass and
chunked loss, per length and attention path, each in a fresh subprocess
(:func:`_eval_worker`) so that its peak resident memory is its own.

Peak memory is XLA's compiled memory analysis (argument + output + temp bytes) and, as a
cross-check, the growth of the process's peak RSS during the run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from relpos.bench.cases import VOCAB, compiled_memory, preset_config, scheme_options
from relpos.bench.report import format_eval_line
from relpos.evaluation import make_nll_fn
from relpos.nn import ModelConfig, TransformerLM

GIB = 1024**3

# what the subprocess of one evaluation point runs (this module's _eval_worker)
WORKER_CODE = ("import sys; from relpos.bench.memory import _eval_worker; "
               "_eval_worker(sys.argv[1])")


def _rss_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def eval_point(*, preset: str, dtype: str, scheme: str, impl: str, length: int, batch: int,
               chunk: int, block_size: int, max_dense_gib: float, repeats: int,
               seed: int = 0) -> dict:
    """Compile (and unless skipped, run) one evaluation forward + chunked loss.

    Meant to run in its own process (see :func:`bench_eval`) so that the peak RSS
    growth is this point's alone.
    """

    mcfg = preset_config(preset, dtype=dtype, attn_impl=impl, block_size=block_size,
                         dense_max_len=max(length, 2048))
    model = TransformerLM(mcfg, scheme, scheme_options(scheme, length),
                          rngs=nnx.Rngs(params=seed))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(seed)
    win = jnp.asarray(rng.integers(0, VOCAB, (batch, length + 1)), jnp.int32)
    inputs, targets = win[:, :-1], win[:, 1:]
    weights = jnp.ones((batch, length), jnp.float32)
    point = {"impl": impl, "length": length, "batch": batch, "scheme": scheme,
             "preset": preset, "loss_chunk": chunk, "block_size": block_size}
    t0 = time.perf_counter()
    compiled = make_nll_fn(graphdef, chunk).lower(params, inputs, targets, weights).compile()
    point["compile_s"] = time.perf_counter() - t0
    mem = compiled_memory(compiled)
    point["xla_memory"] = mem
    estimate = mem["total"] if mem else _dense_estimate(mcfg, length, batch)
    point["xla_peak_gib"] = estimate / GIB if mem else None
    if impl == "dense" and estimate > max_dense_gib * GIB:
        point.update(status="skipped", note=(
            f"dense needs ~{estimate / GIB:.1f} GiB (XLA estimate) > --max-dense-gib="
            f"{max_dense_gib:g}; not run"))
        return point
    rss_before = _rss_kib("VmRSS")
    clean = _reset_peak_rss()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        nll = jax.block_until_ready(compiled(params, inputs, targets, weights))
        best = min(best, time.perf_counter() - t0)
    hwm = _rss_kib("VmHWM") if clean else None
    point.update(status="ok", seconds=best, tokens_per_s=batch * length / best,
                 mean_nll=float(np.asarray(nll).sum() / np.asarray(weights).sum()),
                 rss_peak_growth_gib=(hwm - rss_before) / 1024**2 if hwm and rss_before
                 else None)
    return point


def _dense_estimate(mcfg: ModelConfig, length: int, batch: int) -> int:
    """Fallback when XLA reports no memory analysis: bias + scores + probabilities."""
    return 3 * 4 * batch * mcfg.num_heads * length * length


def _eval_worker(spec_json: str) -> None:
    """Subprocess entry: run :func:`eval_point` and print its result as the last line."""
    print(json.dumps(eval_point(**json.loads(spec_json))), flush=True)


def bench_eval(args, log=print) -> dict:
    """The ``eval`` part of the result: every ``--eval-lengths`` x ``--eval-impls`` point."""
    points = []
    for length in args.eval_lengths:
        for impl in args.eval_impls:
            spec = dict(preset=args.preset, dtype=args.dtype, scheme=args.eval_scheme,
                        impl=impl, length=length, batch=1, chunk=args.eval_chunk,
                        block_size=args.eval_block_size, max_dense_gib=args.max_dense_gib,
                        repeats=args.eval_repeats, seed=args.seed)
            log(f"eval {impl} L={length} ...")
            point = _run_eval_subprocess(spec, args.eval_timeout)
            log(f"  {format_eval_line(point)}")
            points.append(point)
    return {"scheme": args.eval_scheme, "preset": args.preset, "windows": 1,
            "what": "one window: model.hidden + chunked LM head + NLL (make_nll_fn)",
            "memory_note": ("xla_peak_gib: compiled memory analysis, argument + output + temp "
                            "bytes (primary); rss_peak_growth_gib: VmHWM after the run minus "
                            "VmRSS before it, peak mark reset with /proc/self/clear_refs "
                            "(process view, includes allocator slack)"),
            "points": points}


def _run_eval_subprocess(spec: dict, timeout: float) -> dict:
    base = {k: spec[k] for k in ("impl", "length", "scheme", "preset")}
    try:
        proc = subprocess.run([sys.executable, "-c", WORKER_CODE, json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": "error", "note": f"timed out after {timeout:g} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else " | ".join(tail)
    return {**base, "status": "error", "note": f"exit {proc.returncode}: {why}"}
