"""The one training step that ``trace_step_ops.py`` and ``ab_blas_gemm.py`` study: its
command-line options and the ``relpos.bench.cases.JaxCase`` they describe."""

from __future__ import annotations

import argparse

from relpos.bench.cases import JaxCase, preset_config


def add_arguments(p: argparse.ArgumentParser, *, steps_per_call: int) -> None:
    p.add_argument("--scheme", default="alibi")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps-per-call", type=int, default=steps_per_call,
                   help="training steps per compiled call (train.steps_per_call)")


def build(args: argparse.Namespace) -> JaxCase:
    """Compiles the step (so a patch that must act while tracing wraps this call)."""
    return JaxCase(args.scheme, preset_config(args.preset), batch=args.batch,
                   length=args.length, total_steps=1000, steps_per_call=args.steps_per_call)
