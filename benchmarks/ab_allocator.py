"""Step time under glibc malloc and under a preloaded allocator, at 1 and N steps per call.

Each side is a fresh subprocess (``LD_PRELOAD`` must be set before the process starts),
alternating glibc / preload for ``--rounds``; in each process one scheme's ``small``
training step is timed at one step per compiled call and at ``--steps-per-call`` N
(best of 3 alternating timings of N steps, after N untimed: ``relpos.bench.cases.time_rounds``).
Prints and writes the median per side.

    python benchmarks/ab_allocator.py --out benchmarks/allocator-steps-per-call.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from pathlib import Path

from ab_step import run_worker  # benchmarks/ is this script's sys.path[0]

ROOT = Path(__file__).resolve().parents[1]
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"

WORKER = r"""
import json, sys
from relpos.bench.cases import JaxCase, preset_config, time_rounds
scheme, k, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mcfg = preset_config("small")
cases = [JaxCase(scheme, mcfg, batch=16, length=256, total_steps=1000,
                 steps_per_call=n) for n in (1, k)]
times = time_rounds(cases, steps=steps, warmup=steps, repeats=3, log=lambda _: None)
out = {}
for c in cases:
    out[str(c.steps_per_call)] = min(times[c.name]) / steps * 1000
    out[f"faults_{c.steps_per_call}"] = c.rusage.per_step()["minor_faults_per_step"]
print("RESULT" + json.dumps(out))
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preload", default=TCMALLOC, help="library for LD_PRELOAD")
    p.add_argument("--scheme", default="alibi")
    p.add_argument("--steps-per-call", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not Path(args.preload).exists():
        raise SystemExit(f"--preload {args.preload}: no such file")
    k = args.steps_per_call
    sides = {"glibc": {}, "preload": {"LD_PRELOAD": args.preload}}
    runs = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, extra in sides.items():
            runs[name].append(run_worker(WORKER, [args.scheme, str(k), str(k)],
                                         env=dict(os.environ, **extra), cwd=ROOT, what=name))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    median = {name: {key: statistics.median(d[key] for d in rs) for key in rs[0]}
              for name, rs in runs.items()}
    base = median["glibc"]["1"]
    for name, m in median.items():
        print(f"{name:8s} 1 step/call {m['1']:.0f} ms ({m['1'] / base:.2f}x), {k} steps/call "
              f"{m[str(k)]:.0f} ms ({m[str(k)] / base:.2f}x); minor faults/step "
              f"{m['faults_1']:.0f} / {m[f'faults_{k}']:.0f}")
    if args.out:
        result = {"tool": "ab_allocator.py", "created": datetime.datetime.now(datetime.UTC)
                  .isoformat(timespec="seconds"), "preload": args.preload, "scheme": args.scheme,
                  "preset": "small", "steps_per_call": k, "rounds": runs, "median_ms": median,
                  "ratio_to_glibc_1": {n: {s: m[s] / base for s in ("1", str(k))}
                                       for n, m in median.items()},
                  "loadavg_end": list(os.getloadavg())}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
