"""The training side of ``relpos-bench``: model presets and scheme options as in
training, one scheme's real step compiled ahead of time and timed (:class:`JaxCase`),
the round-robin order of the timing rounds, and the training benchmark itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from omegaconf import OmegaConf

from relpos.bench.peer import peer_case
from relpos.bench.report import (
    FLOP_CONVENTION,
    non_embedding_params,
    peer_entry,
    train_flops_per_token,
    train_rows,
)
from relpos.config import OptimSection, model_config
from relpos.io import config_dir
from relpos.nn import ModelConfig, TransformerLM, count_params
from relpos.training.step import fresh_guard, last_metric, make_optimizer, make_train_step

VOCAB = 257  # byte tokenizer


# ----------------------------------------------------------------------------- sizes


def preset_config(preset: str, *, dtype: str = "float32", **overrides) -> ModelConfig:
    """ModelConfig from ``configs/model/<preset>.yaml`` (the Hydra presets), byte vocab."""

    path = Path(config_dir()) / "model" / f"{preset}.yaml"
    if not path.exists():
        raise SystemExit(f"relpos-bench: error: no model preset {preset!r} ({path} missing); "
                         f"choose from {', '.join(model_presets())}")
    cfg = model_config(OmegaConf.load(path), VOCAB)
    return dataclasses.replace(cfg, dtype=dtype, **overrides)


def model_presets() -> list[str]:

    return sorted(p.stem for p in (Path(config_dir()) / "model").glob("*.yaml"))


def scheme_options(name: str, length: int) -> dict:
    """The scheme's options as ``relpos-train bias=<name> train.length=<length>`` builds
    them (its YAML file with its defaults list and resolvers: offset ``size``, T5
    ``max_distance``, learned_abs ``max_length`` follow the length)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    from relpos.config import bias_options, register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(Path(config_dir())), version_base=None):
        try:
            cfg = compose("train", overrides=[f"bias={name}", f"train.length={length}"])
        except MissingConfigException:  # an import path (module:Class): its own defaults
            return {}
    return bias_options(cfg.bias)[1]


# ----------------------------------------------------------------------------- XLA analyses


def compiled_flops(compiled) -> float | None:
    """XLA's cost analysis FLOPs of a compiled executable (None where not reported)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None


def compiled_memory(compiled) -> dict | None:
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


# ----------------------------------------------------------------------------- training


class JaxCase:
    """One scheme's compiled training step and its state, advanced ``n`` steps at a time."""

    def __init__(self, scheme: str, mcfg: ModelConfig, *, batch: int, length: int,
                 total_steps: int, seed: int = 0, steps_per_call: int = 1):

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
        self.rusage = Rusage()
        t0 = time.perf_counter()
        self.step = make_train_step(graphdef, tx, multi=steps_per_call > 1).lower(
            *self.state, self.tokens, self.positions, self.step_arg).compile()
        self.compile_s = time.perf_counter() - t0
        # per step either way: XLA's cost analysis counts a loop body once
        self.xla_flops = compiled_flops(self.step)
        self.xla_memory = compiled_memory(self.step)
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

        guard = self.state[2]
        return {"attention": self.attention, "compile_s": self.compile_s,
                "xla_flops_per_step": self.xla_flops,
                "xla_memory": self.xla_memory, "params": self.params_total,
                "final_loss": last_metric(self.metrics["loss"]) if self.metrics else None,
                "skipped_steps": int(guard["skipped"]), **self.rusage.per_step()}


def case_name(scheme: str, steps_per_call: int) -> str:
    """``alibi``, or ``alibi/k8`` for 8 training steps per compiled call."""
    return scheme if steps_per_call == 1 else f"{scheme}/k{steps_per_call}"


class Rusage:
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
        before = resource.getrusage(resource.RUSAGE_SELF)
        yield
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.steps += steps
        for field, key in self.FIELDS:
            self.totals[key] += getattr(after, field) - getattr(before, field)

    def per_step(self) -> dict:
        return {k: v / self.steps for k, v in self.totals.items()} if self.steps else {}


# ----------------------------------------------------------------------------- rounds


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
            case.rusage = Rusage()  # count the timed rounds only
    times = {case.name: [] for case in cases}
    for r in range(repeats):
        for case in round_order(cases, r):
            times[case.name].append(case.run(steps))
        log(f"  round {r + 1}/{repeats}: " + ", ".join(
            f"{c.name} {times[c.name][-1] / steps * 1e3:.0f} ms" for c in cases))
    return times


def bench_training(args, mcfg: ModelConfig, peak: dict, log=print) -> dict:
    """The ``train`` part of the result: every scheme at every ``--steps-per-call``
    (``none`` always, as the reference), and the peer if ``--peer``."""
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
            "peer": peer_entry(rows, peer, peer_reason, args.peer)}
