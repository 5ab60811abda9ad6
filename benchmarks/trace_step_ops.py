"""Where the ``small`` training step spends its time, per XLA op (CPU or GPU).

Traces a few steps with ``jax.profiler`` (Perfetto trace), then sums the duration of every
executed op by kind and output shape and prints the largest. Ops may overlap (XLA:CPU
runs independent thunks concurrently on its thread pool), so the sum can exceed the
step time; both are printed.

    python benchmarks/trace_step_ops.py --scheme alibi --top 30
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax

from relpos import bench


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default="alibi")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="traced calls")
    p.add_argument("--steps-per-call", type=int, default=1,
                   help="training steps per compiled call (train.steps_per_call)")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    case = bench.JaxCase(args.scheme, bench.preset_config(args.preset), batch=args.batch,
                         length=args.length, total_steps=1000, steps_per_call=args.steps_per_call)
    k = args.steps_per_call
    case.run(2 * k)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            seconds = case.run(args.steps * k)
        events = json.load(gzip.open(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    shapes = {}
    for line in case.step.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if m:
            shapes[m.group(1)] = m.group(2).split("{")[0]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in shapes:
            key = (re.sub(r"\.\d+$", "", e["name"]), shapes[e["name"]])
            total[key] += e.get("dur", 0) / 1e3 / (args.steps * k)
            count[key] += 1
    print(f"{args.scheme}: step {seconds / (args.steps * k) * 1e3:.0f} ms; "
          f"sum of op times {sum(total.values()):.0f} ms/step")
    print(f"{'ms/step':>8} {'ops':>4}  kind  output")
    for (kind, shape), ms in total.most_common(args.top):
        print(f"{ms:8.1f} {count[(kind, shape)] // (args.steps * k):4d}  {kind}  {shape}")


if __name__ == "__main__":
    main()
