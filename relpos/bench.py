"""``relpos-bench``: training throughput, MFU and long-evaluation memory per position scheme.

Two parts, one JSON file (``--out``) and printed tables:

* **training** — the real step (:func:`relpos.train.make_train_step` with
  :func:`relpos.train.make_optimizer`, AdamW, clipping, the non-finite guard) on the
  model from :mod:`relpos.model`, random byte tokens. Each scheme's step is compiled
  ahead of time (``lower().compile()``: the compile time), run ``--warmup`` steps, then
  timed in ``--repeats`` rounds of ``--steps`` steps, the host syncing only at the end of
  a round. Steps run ``--steps-per-call`` at a time in one compiled call, as
  ``relpos-train`` does (``train.steps_per_call``; with several values the cases are
  named ``alibi/k10`` etc.). Rounds visit the schemes in turn (round-robin; the order
  rotates each round and reverses every other one, :func:`round_order`), so slow
  drift in machine load hits every scheme alike; ``ratio_to_none`` is the median over
  rounds of the per-round step-time ratio to ``none`` at the same steps per call
  (always measured, as the reference).
* **evaluation** — one window of ``--eval-lengths`` tokens through the forward pass and
  chunked loss of :func:`relpos.evaluate.make_nll_fn`, on the dense and the blockwise
  attention paths. Each point runs in a fresh subprocess so that its peak resident memory
  is its own. Peak memory is XLA's compiled memory analysis (argument + output + temp
  bytes: what the executable needs) and, as a cross-check, the growth of the process's
  peak RSS during the run. Dense points whose XLA estimate exceeds ``--max-dense-gib``
  are compiled (compiling allocates nothing) but not run, and marked ``skipped``.

MFU uses the PaLM convention (Chowdhery et al. 2022, appendix B), see
:data:`FLOP_CONVENTION`; the peak is the best fp32 (or ``--dtype``) ``jnp.dot`` rate
measured in the same run, not a data-sheet number.

``--peer`` adds lucidrains' x-transformers (PyTorch, CPU, eager) with ALiBi at the same
sizes as a round-robin participant, if ``torch`` and ``x_transformers`` import.

Usage::

    relpos-bench --preset small --out benchmarks/cpu-2core.json
    python -m relpos.bench --schemes alibi,t5 --steps-per-call 1 --steps 3 --eval-lengths 4096
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from relpos import positions
from relpos.attention import IMPLS
from relpos.io import atomic_write_json
from relpos.model import DTYPES, ModelConfig, TransformerLM, count_params

VOCAB = 257  # byte tokenizer
GIB = 1024**3

FLOP_CONVENTION = (
    "PaLM (Chowdhery et al. 2022, appendix B): training FLOPs per token = 6 N + 12 L T d, "
    "N = non-embedding parameters (transformer blocks + final LayerNorm; excludes the token "
    "embedding, the tied LM head and position-scheme parameters), L layers, T the training "
    "length (context), d = d_model. The attention term counts the full T x T score matrix "
    "(the causal half is NOT discounted), forward + backward. The same model FLOPs are "
    "used for every scheme, so position-scheme work (bias evaluation, rotations) lowers "
    "MFU rather than adding FLOPs."
)


# ----------------------------------------------------------------------------- sizes


def preset_config(preset: str, *, dtype: str = "float32", **overrides) -> ModelConfig:
    """ModelConfig from ``configs/model/<preset>.yaml`` (the Hydra presets), byte vocab."""
    from omegaconf import OmegaConf

    from relpos.config import ModelSection, config_dir

    path = Path(config_dir()) / "model" / f"{preset}.yaml"
    if not path.exists():
        raise SystemExit(f"relpos-bench: error: no model preset {preset!r} ({path} missing); "
                         f"choose from {', '.join(model_presets())}")
    section = ModelSection(**OmegaConf.to_container(OmegaConf.load(path)))
    cfg = section.to_model_config(VOCAB)
    return dataclasses.replace(cfg, dtype=dtype, **overrides)


def model_presets() -> list[str]:
    from relpos.config import config_dir

    return sorted(p.stem for p in (Path(config_dir()) / "model").glob("*.yaml"))


def scheme_options(name: str, length: int) -> dict:
    """The scheme's options from ``configs/bias/<name>.yaml`` with ``${train.length}``
    resolved to ``length`` (offset ``size``, learned_abs ``max_length``), as in training."""
    from omegaconf import OmegaConf

    from relpos.config import config_dir

    path = Path(config_dir()) / "bias" / f"{name}.yaml"
    if not path.exists():
        return {}
    cfg = OmegaConf.merge({"train": {"length": length}}, {"bias": OmegaConf.load(path)})
    opts = OmegaConf.to_container(cfg.bias, resolve=True)
    opts.pop("name", None)
    return opts


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


# ----------------------------------------------------------------------------- training


class JaxCase:
    """One scheme's compiled training step and its state, advanced ``n`` steps at a time."""

    def __init__(self, scheme: str, mcfg: ModelConfig, *, batch: int, length: int,
                 total_steps: int, seed: int = 0, steps_per_call: int = 1):
        from relpos.config import OptimSection
        from relpos.train import fresh_guard, make_optimizer, make_train_step

        self.scheme, self.steps_per_call = scheme, steps_per_call
        self.name = case_name(scheme, steps_per_call)
        model = TransformerLM(mcfg, scheme, scheme_options(scheme, length),
                              rngs=nnx.Rngs(params=seed))
        self.params_total = count_params(model)
        self.attention = model.attention_impl(length)
        graphdef, params = nnx.split(model, nnx.Param)
        tx, _ = make_optimizer(OptimSection(), total_steps, params)
        self.state = (params, tx.init(params), fresh_guard())
        stack = (steps_per_call,) if steps_per_call > 1 else ()
        self.tokens = jax.random.randint(jax.random.key(seed + 1), (*stack, batch, length + 1),
                                         0, mcfg.vocab_size, jnp.int32)
        self.positions = jnp.arange(length, dtype=jnp.int32)
        self.step_arg = jnp.int32(0)
        self.rusage = _Rusage()
        t0 = time.perf_counter()
        self.step = make_train_step(graphdef, tx, multi=steps_per_call > 1).lower(
            *self.state, self.tokens, self.positions, self.step_arg).compile()
        self.compile_s = time.perf_counter() - t0
        # per step either way: XLA's cost analysis counts a loop body once
        self.xla_flops = _cost_flops(self.step)
        self.xla_memory = _memory(self.step)
        self.metrics = None

    def run(self, n: int) -> float:
        """Seconds for ``n`` steps (a multiple of ``steps_per_call``); dispatch is
        asynchronous, one sync at the end."""
        if n % self.steps_per_call:
            raise ValueError(f"{n} steps is not a multiple of {self.steps_per_call} per call")
        params, opt_state, guard = self.state
        with self.rusage.count(n):
            t0 = time.perf_counter()
            for _ in range(n // self.steps_per_call):
                params, opt_state, guard, metrics = self.step(
                    params, opt_state, guard, self.tokens, self.positions, self.step_arg)
            jax.block_until_ready((params, opt_state, metrics))
            elapsed = time.perf_counter() - t0
        self.state, self.metrics = (params, opt_state, guard), metrics
        return elapsed

    def summary(self) -> dict:
        from relpos.train import last_metric

        guard = self.state[2]
        return {"attention": self.attention, "compile_s": self.compile_s,
                "xla_flops_per_step": self.xla_flops,
                "xla_memory": self.xla_memory, "params": self.params_total,
                "final_loss": last_metric(self.metrics["loss"]) if self.metrics else None,
                "skipped_steps": int(guard["skipped"]), **self.rusage.per_step()}


def case_name(scheme: str, steps_per_call: int) -> str:
    """``alibi``, or ``alibi/k8`` for 8 training steps per compiled call."""
    return scheme if steps_per_call == 1 else f"{scheme}/k{steps_per_call}"


class _Rusage:
    """Process CPU and page-fault counts per step (``getrusage``), accumulated over the
    timed calls. Page faults matter on CPU: XLA's temp buffer is allocated per call, and
    glibc serves large blocks with fresh ``mmap`` pages that the kernel must zero."""

    FIELDS = (("ru_utime", "user_s_per_step"), ("ru_stime", "sys_s_per_step"),
              ("ru_minflt", "minor_faults_per_step"))

    def __init__(self):
        self.steps = 0
        self.totals = dict.fromkeys((k for _, k in self.FIELDS), 0.0)

    @contextlib.contextmanager
    def count(self, steps: int):
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF)
        yield
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.steps += steps
        for field, key in self.FIELDS:
            self.totals[key] += getattr(after, field) - getattr(before, field)

    def per_step(self) -> dict:
        return {k: v / self.steps for k, v in self.totals.items()} if self.steps else {}


class PeerCase:
    """lucidrains/x-transformers ``TransformerWrapper`` + ``Decoder(alibi_pos_bias=True)``,
    PyTorch AdamW (same betas, decay, clipping as relpos), fp32, CPU, eager."""

    name = "x-transformers(alibi)"

    def __init__(self, mcfg: ModelConfig, *, batch: int, length: int, threads: int,
                 seed: int = 0):
        import torch
        from x_transformers import Decoder, TransformerWrapper

        from relpos.config import OptimSection

        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = TransformerWrapper(
            num_tokens=mcfg.vocab_size, max_seq_len=length,
            attn_layers=Decoder(dim=mcfg.d_model, depth=mcfg.num_layers,
                                heads=mcfg.num_heads, alibi_pos_bias=True))
        o = OptimSection()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2),
                                     eps=o.eps, weight_decay=o.weight_decay)
        self.clip = o.clip_norm
        self.tokens = torch.randint(0, mcfg.vocab_size, (batch, length + 1))
        self.params_total = sum(p.numel() for p in self.model.parameters())
        self.versions = {"torch": torch.__version__, "x_transformers": _version("x-transformers"),
                         "threads": torch.get_num_threads()}
        t0 = time.perf_counter()
        self.loss = self._step()
        self.compile_s = None
        self.first_step_s = time.perf_counter() - t0

    def _step(self) -> float:
        torch = self.torch
        x, y = self.tokens[:, :-1], self.tokens[:, 1:]
        logits = self.model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss.detach()

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            self.loss = self._step()
        return time.perf_counter() - t0

    def summary(self) -> dict:
        return {"compile_s": None, "first_step_s": self.first_step_s,
                "params": self.params_total, "final_loss": float(self.loss), **self.versions}


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None


def _memory(compiled) -> dict | None:
    """XLA's compiled memory analysis in bytes; ``total`` = argument + output + temp
    minus aliased (donated) bytes, counted once."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp",
                                                               "alias")}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def peer_case(mcfg: ModelConfig, *, batch: int, length: int) -> tuple[PeerCase | None, str]:
    """A :class:`PeerCase`, or None and the reason it is unavailable."""
    try:
        import torch  # noqa: F401
        import x_transformers  # noqa: F401
    except ImportError as e:
        return None, (f"not importable ({e}); install torch and x-transformers "
                      "(pip install 'relpos[bench]') to compare")
    try:
        return PeerCase(mcfg, batch=batch, length=length, threads=_cpu_threads()), ""
    except Exception as e:  # noqa: BLE001 - a peer's API change must not sink our numbers
        return None, f"failed to build: {type(e).__name__}: {e}"


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def round_order(cases: list, r: int) -> list:
    """Round ``r``'s order: the cases rotated by ``r``, reversed in odd rounds (a rotation
    alone keeps every case's predecessor)."""
    k = r % len(cases) if cases else 0
    order = cases[k:] + cases[:k]
    return order[::-1] if r % 2 else order


def time_rounds(cases: list, *, steps: int, warmup: int, repeats: int,
                log=print) -> dict[str, list[float]]:
    """Warm every case up, then ``repeats`` round-robin rounds of ``steps`` steps each.

    :func:`round_order`: no case always runs right after the same one (whatever the
    previous case leaves behind, e.g. the peer's PyTorch threads, is not always paid by
    the same scheme)."""
    for case in cases:
        if warmup:  # whole calls: at least ``warmup`` steps
            k = getattr(case, "steps_per_call", 1)
            case.run(-(-warmup // k) * k)
        if hasattr(case, "rusage"):
            case.rusage = _Rusage()  # count the timed rounds only
    times = {case.name: [] for case in cases}
    for r in range(repeats):
        for case in round_order(cases, r):
            times[case.name].append(case.run(steps))
        log(f"  round {r + 1}/{repeats}: " + ", ".join(
            f"{c.name} {times[c.name][-1] / steps * 1e3:.0f} ms" for c in cases))
    return times


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


def bench_training(args, mcfg: ModelConfig, peak: dict, log=print) -> dict:
    schemes = list(args.schemes)
    if "none" not in schemes:
        schemes.insert(0, "none")  # the reference for ratio_to_none
    total = args.warmup + args.steps * args.repeats + 1
    cases = []
    for k in args.steps_per_call:
        for name in schemes:
            case = JaxCase(name, mcfg, batch=args.batch, length=args.length,
                           total_steps=total, seed=args.seed, steps_per_call=k)
            if len(args.steps_per_call) == 1:  # one setting: plain scheme names
                case.name = name
            log(f"compiled training step: {case.name} ({case.compile_s:.1f} s)")
            cases.append(case)
    peer, peer_reason = (None, "not requested")
    if args.peer:
        log("building peer: x-transformers")
        peer, peer_reason = peer_case(mcfg, batch=args.batch, length=args.length)
        if peer is None:
            log(f"peer unavailable: {peer_reason}")
    all_cases = cases + ([peer] if peer else [])
    times = time_rounds(all_cases, steps=args.steps, warmup=args.warmup,
                        repeats=args.repeats, log=log)
    model = TransformerLM(mcfg, "none", rngs=nnx.Rngs(params=0))
    n = non_embedding_params(model)
    per_token = train_flops_per_token(n, mcfg.num_layers, args.length, mcfg.d_model)
    tokens_per_step = args.batch * args.length
    rows = train_rows(times, all_cases, steps=args.steps, tokens_per_step=tokens_per_step,
                      flops_per_step=per_token * tokens_per_step,
                      peak_flops=peak["gflops"] * 1e9,
                      spec_peak_flops=(args.spec_peak_tflops or 0) * 1e12)
    out_rows = rows[:len(cases)]
    flops = {"convention": FLOP_CONVENTION, "causal_half_discounted": False,
             "non_embedding_params": n, "flops_per_token": per_token,
             "flops_per_step": per_token * tokens_per_step}
    return {"rows": out_rows, "flops": flops,
            "peer": _peer_entry(rows, peer, peer_reason, args.peer)}


def _peer_entry(rows, peer, reason, requested) -> dict:
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


# ----------------------------------------------------------------------------- evaluation


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
    from relpos.evaluate import make_nll_fn

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
    mem = _memory(compiled)
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
        nll, count = compiled(params, inputs, targets, weights)
        jax.block_until_ready((nll, count))
        best = min(best, time.perf_counter() - t0)
    hwm = _rss_kib("VmHWM") if clean else None
    point.update(status="ok", seconds=best, tokens_per_s=batch * length / best,
                 mean_nll=float(np.asarray(nll).sum() / np.asarray(count).sum()),
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
    points = []
    for length in args.eval_lengths:
        for impl in args.eval_impls:
            spec = dict(preset=args.preset, dtype=args.dtype, scheme=args.eval_scheme,
                        impl=impl, length=length, batch=1, chunk=args.eval_chunk,
                        block_size=args.eval_block_size, max_dense_gib=args.max_dense_gib,
                        repeats=args.eval_repeats, seed=args.seed)
            log(f"eval {impl} L={length} ...")
            point = _run_eval_subprocess(spec, args.eval_timeout)
            log(f"  {_eval_line(point)}")
            points.append(point)
    return {"scheme": args.eval_scheme, "preset": args.preset, "windows": 1,
            "what": "one window: model.hidden + chunked LM head + NLL (make_nll_fn)",
            "memory_note": ("xla_peak_gib: compiled memory analysis, argument + output + temp "
                            "bytes (primary); rss_peak_growth_gib: VmHWM after the run minus "
                            "VmRSS before it, peak mark reset with /proc/self/clear_refs "
                            "(process view, includes allocator slack)"),
            "points": points}


def _run_eval_subprocess(spec: dict, timeout: float) -> dict:
    code = "import sys; from relpos.bench import _eval_worker; _eval_worker(sys.argv[1])"
    base = {k: spec[k] for k in ("impl", "length", "scheme", "preset")}
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": "error", "note": f"timed out after {timeout:g} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else " | ".join(tail)
    return {**base, "status": "error", "note": f"exit {proc.returncode}: {why}"}


# ----------------------------------------------------------------------------- report


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


def _eval_line(p: dict) -> str:
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


def host_info() -> dict:
    cpu = None
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), None)
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_threads": _cpu_threads(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "ld_preload": os.environ.get("LD_PRELOAD"), "xla_flags": os.environ.get("XLA_FLAGS"),
            "loadavg_start": list(os.getloadavg())}


# ----------------------------------------------------------------------------- CLI


def _csv(kind, off=("", "none", "off")):
    """Comma-separated values; any of ``off`` alone gives an empty list."""
    def parse(text: str):
        text = text.strip()
        if text.lower() in off:
            return []
        return [kind(x.strip()) for x in text.split(",") if x.strip()]

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="relpos-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small", choices=model_presets())
    p.add_argument("--schemes", type=_csv(str, off=()), default=None,  # "none": the scheme
                   help="comma-separated; default: all of relpos.positions.available()")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--steps-per-call", type=_csv(int), default=[10],
                   help="training steps per compiled call (train.steps_per_call; 10 is what "
                        "relpos-train picks on CPU for its default intervals, 1 on GPU); a list "
                        "such as 1,10 times every scheme at each, in the same rounds")
    p.add_argument("--repeats", type=int, default=3, help="round-robin timing rounds")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--attn-impl", default="auto", choices=IMPLS,
                   help="training attention path (model.attn_impl; auto: cuDNN on GPU in "
                        "half precision, for learned biases if cuDNN's bias gradient checks "
                        "out; dense otherwise)")
    p.add_argument("--spec-peak-tflops", type=float, default=None,
                   help="also report MFU against this data-sheet peak (e.g. 989 for an "
                        "H100 SXM in dense bf16)")
    p.add_argument("--length", type=int, default=256, help="training length T")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-train", dest="train", action="store_false",
                   help="skip the training benchmark")
    p.add_argument("--peer", action="store_true",
                   help="also time x-transformers (needs torch and x-transformers)")
    p.add_argument("--eval-lengths", type=_csv(int), default=[4096, 16384, 65536],
                   help="comma-separated window lengths; 'none' skips evaluation")
    p.add_argument("--eval-impls", type=_csv(str), default=["dense", "blockwise"])
    p.add_argument("--eval-scheme", default="alibi")
    p.add_argument("--eval-chunk", type=int, default=2048, help="loss chunk (positions)")
    p.add_argument("--eval-block-size", type=int, default=ModelConfig.block_size,
                   help="blockwise attention block (queries and keys)")
    p.add_argument("--eval-repeats", type=int, default=1)
    p.add_argument("--eval-timeout", type=float, default=1800.0, help="seconds per point")
    p.add_argument("--max-dense-gib", type=float, default=8.0,
                   help="skip dense evaluation points whose XLA memory estimate exceeds this")
    p.add_argument("--peak-sizes", type=_csv(int), default=[1024, 2048, 4096])
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = p.parse_args(argv)
    args.schemes = args.schemes or positions.available()
    unknown = [s for s in args.schemes + [args.eval_scheme] if s not in positions.available()]
    if unknown:
        p.error(f"unknown scheme(s) {', '.join(unknown)}; choose from "
                f"{', '.join(positions.available())}")
    for name in ("steps", "repeats", "length", "batch", "eval_chunk", "eval_block_size",
                 "eval_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if len(set(args.steps_per_call)) < len(args.steps_per_call):
        p.error(f"--steps-per-call {args.steps_per_call}: a value is repeated")
    for k in args.steps_per_call:
        if k < 1 or args.steps % k:
            p.error(f"--steps-per-call {k}: must be >= 1 and divide --steps ({args.steps})")
    return args


def run(args, log=print) -> dict:
    mcfg = preset_config(args.preset, dtype=args.dtype, attn_impl=args.attn_impl)
    result = {
        "tool": "relpos-bench", "schema": 1,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": host_info(),
        "config": {"preset": args.preset, "model": dataclasses.asdict(mcfg),
                   "batch": args.batch, "length": args.length, "dtype": args.dtype,
                   "attn_impl": args.attn_impl, "spec_peak_tflops": args.spec_peak_tflops,
                   "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                   "steps_per_call": args.steps_per_call,
                   "seed": args.seed, "data": "uniform random byte tokens (fixed batch)"},
        "notes": ["wall-clock timings on a possibly shared machine: compare only numbers "
                  "from the same run; see host.loadavg_start/end"],
    }
    log("measuring matmul peak ...")
    result["matmul_peak"] = measure_matmul_peak(args.dtype, tuple(args.peak_sizes))
    log(f"  {result['matmul_peak']['gflops']:.1f} GFLOP/s")
    if args.train:
        result["train"] = bench_training(args, mcfg, result["matmul_peak"], log=log)
    if args.eval_lengths:
        result["eval"] = bench_eval(args, log=log)
    result["host"]["loadavg_end"] = list(os.getloadavg())
    return result


def main(argv=None) -> None:
    """Console entry (``relpos-bench``): tables on stdout, progress on stderr."""
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    result = run(args, log=log)
    if args.out:
        atomic_write_json(args.out, result)
    tables = []
    if "train" in result:
        tables.append(format_train_table(result))
    if "eval" in result:
        tables.append(format_eval_table(result["eval"]))
    print("\n\n".join(tables))
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
