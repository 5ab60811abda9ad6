"""Before/after ratio of the training step time between two git revisions.

Runs a training step (relpos.bench.cases.JaxCase; default ``small``, batch 16, T 256, fp32) of each
revision in alternating subprocesses (A B A B ...) on the same machine, so slow drift of
a shared host hits both sides alike, and prints the median step time per side and the
after/before ratio per scheme. The "before" tree is a temporary ``git worktree``.

    python benchmarks/ab_step.py --before HEAD~1 --schemes none,alibi,t5 --rounds 4
    python benchmarks/ab_step.py --before HEAD --out benchmarks/ab-<change>.json  # vs work tree
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys
try:
    from relpos.bench.cases import JaxCase, preset_config
except ImportError:  # a "before" revision from when relpos.bench was one module
    from relpos.bench import JaxCase, preset_config
schemes = sys.argv[1].split(",")
steps, batch, length = (int(x) for x in sys.argv[2:5])
mcfg = preset_config(sys.argv[5])
out = {}
for s in schemes:
    c = JaxCase(s, mcfg, batch=batch, length=length, total_steps=1000)
    c.run(2)
    out[s] = {"ms": min(c.run(steps) / steps for _ in range(2)) * 1000,
              "loss": float(c.metrics["loss"]), "compile_s": c.compile_s}
print("RESULT" + json.dumps(out))
"""


def run_worker(code: str, argv: list[str], *, env: dict, cwd: Path, what: str) -> dict:
    """Run ``python -c code *argv`` and return the JSON of its ``RESULT...`` line."""
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=cwd,
                          capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise SystemExit(f"worker failed ({what}):\n{proc.stderr[-2000:]}")


def run_side(tree: Path, args) -> dict:
    return run_worker(WORKER, [args.schemes, str(args.steps), str(args.batch),
                               str(args.length), args.preset],
                      env=dict(os.environ, PYTHONPATH=str(tree)), cwd=tree, what=str(tree))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision for the 'before' side")
    p.add_argument("--schemes", default="none,alibi,t5")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--preset", default="small", help="model preset (configs/model)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before),
                        args.before], check=True, capture_output=True)
        try:
            samples = {"before": [], "after": []}
            for r in range(args.rounds):
                for side, tree in (("before", before), ("after", ROOT)):
                    samples[side].append(run_side(tree, args))
                    print(f"round {r} {side}: " + ", ".join(
                        f"{s} {v['ms']:.0f} ms" for s, v in samples[side][-1].items()),
                        flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(before)], check=False, capture_output=True)
    rows = {}
    for s in args.schemes.split(","):
        b = statistics.median(x[s]["ms"] for x in samples["before"])
        a = statistics.median(x[s]["ms"] for x in samples["after"])
        rows[s] = {"before_ms": b, "after_ms": a, "ratio": a / b,
                   "loss_before": samples["before"][-1][s]["loss"],
                   "loss_after": samples["after"][-1][s]["loss"]}
        print(f"{s:14s} before {b:7.1f} ms  after {a:7.1f} ms  after/before {a / b:.3f}")
    if args.out:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.before],
                             capture_output=True, text=True).stdout.strip()
        Path(args.out).write_text(json.dumps({"before": rev, "after": "work tree",
                                              "config": vars(args), "rows": rows,
                                              "samples": samples}, indent=1))


if __name__ == "__main__":
    main()
