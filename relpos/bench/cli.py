"""``relpos-bench``: training throughput, MFU and long-evaluation memory per position scheme.

Two parts, one JSON file (``--out``) and printed tables:

* **training** (:mod:`relpos.bench.cases`) — the real step
  (:func:`relpos.training.step.make_train_step` with
  :func:`relpos.training.step.make_optimizer`, AdamW, clipping, the non-finite guard) on
  the model from :mod:`relpos.nn`, random byte tokens. Each scheme's step is compiled
  ahead of time (``lower().compile()``: the compile time), run ``--warmup`` steps, then
  timed in ``--repeats`` rounds of ``--steps`` steps, the host syncing only at the end of
  a round. Steps run ``--steps-per-call`` at a time in one compiled call, as
  ``relpos-train`` does (``train.steps_per_call``; with several values the cases are
  named ``alibi/k25`` etc.). Rounds visit the schemes in turn (round-robin; the order
  rotates each round and reverses every other one, ``round_order``), so slow
  drift in machine load hits every scheme alike; ``ratio_to_none`` is the median over
  rounds of the per-round step-time ratio to ``none`` at the same steps per call
  (always measured, as the reference).
* **evaluation** (:mod:`relpos.bench.memory`) — one window of ``--eval-lengths`` tokens
  through the forward pass and chunked loss of :func:`relpos.evaluation.make_nll_fn`, on
  the dense and the blockwise attention paths. Each point runs in a fresh subprocess so
  that its peak resident memory is its own. Peak memory is XLA's compiled memory analysis
  (argument + output + temp bytes: what the executable needs) and, as a cross-check, the
  growth of the process's peak RSS during the run. Dense points whose XLA estimate
  exceeds ``--max-dense-gib`` are compiled (compiling allocates nothing) but not run, and
  marked ``skipped``.

MFU uses the PaLM convention (Chowdhery et al. 2022, appendix B), see
``relpos.bench.report.FLOP_CONVENTION``; the peak is the best fp32 (or ``--dtype``)
``jnp.dot`` rate measured in the same run, not a data-sheet number.

``--peer`` adds lucidrains' x-transformers (PyTorch, CPU, eager) with ALiBi at the same
sizes as a round-robin participant (:mod:`relpos.bench.peer`), if ``torch`` and
``x_transformers`` import.

Usage::

    relpos-bench --preset small --out benchmarks/cpu-2core.json
    python -m relpos.bench.cli --schemes alibi,t5 --steps-per-call 1 --steps 3 --eval-lengths 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from pathlib import Path

from relpos import positions
from relpos.bench.cases import bench_training, model_presets, preset_config
from relpos.bench.memory import bench_eval
from relpos.bench.report import (
    format_eval_table,
    format_train_table,
    host_info,
    measure_matmul_peak,
)
from relpos.io import atomic_write_json
from relpos.nn import DTYPES, IMPLS, ModelConfig
from relpos.runs import AUTO_STEPS_PER_CALL


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
    # one compiled call per round by default: --steps must be a multiple of --steps-per-call
    p.add_argument("--steps", type=int, default=AUTO_STEPS_PER_CALL,
                   help="timed steps per round (a multiple of every --steps-per-call)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--steps-per-call", type=_csv(int), default=[AUTO_STEPS_PER_CALL],
                   help=f"training steps per compiled call (train.steps_per_call; "
                        f"{AUTO_STEPS_PER_CALL} is what relpos-train picks on CPU for its "
                        f"default intervals (relpos.runs.AUTO_STEPS_PER_CALL), 1 on GPU); a "
                        f"list such as 1,{AUTO_STEPS_PER_CALL} times every scheme at each, "
                        f"in the same rounds")
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
    """The whole benchmark for parsed ``args``: the result that ``--out`` writes."""
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
