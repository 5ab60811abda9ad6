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
import step_case  # benchmarks/ is this script's sys.path[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_case.add_arguments(p, steps_per_call=1)
    p.add_argument("--steps", type=int, default=3, help="traced calls")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    case = step_case.build(args)
    k = args.steps_per_call
    n = args.steps * k  # traced training steps
    case.run(2 * k)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            seconds = case.run(n)
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
            total[key] += e.get("dur", 0) / 1e3 / n
            count[key] += 1
    print(f"{args.scheme}: step {seconds / n * 1e3:.0f} ms; "
          f"sum of op times {sum(total.values()):.0f} ms/step")
    print(f"{'ms/step':>8} {'ops':>4}  kind  output")
    for (kind, shape), ms in total.most_common(args.top):
        print(f"{ms:8.1f} {count[(kind, shape)] // n:4d}  {kind}  {shape}")


if __name__ == "__main__":
    main()
