"""The trainer against the bare step: ``relpos-train``'s steady tokens/s over
``relpos-bench``'s timed step for the same model, batch and length, in one process.

Issue 19's CPU target: at one step per call (``train.steps_per_call=1``) the training loop
(batches, dispatch, metrics, hooks) costs at most 3% of the step, i.e. ratio >= 0.97.
Per process (one source tree, one preset) the worker alternates ``--repeats`` times:

* the bench step (:class:`relpos.bench.cases.JaxCase`, random tokens already on the
  device, the host syncing once per round), ``--rounds`` rounds of ``--interval`` steps
  before and again after each trainer run;
* one ``relpos-train`` run (:func:`relpos.runs.train`, the stdlib corpus, alibi, the same
  preset, batch and length) of ``(--rows + 1) x --interval`` steps, logging every
  ``--interval`` steps; its ``metrics.jsonl`` rows give the tokens/s of each interval (the
  first, which holds the first execution, is dropped) and ``results.json`` the whole
  run's ``train_tokens_per_second``.

Per repeat, the ratio is the trainer's median interval tokens/s over the median of the
bench rounds just before and after that run (a shared host drifts); the figure is the
median over repeats. With ``--before REV`` the same worker also runs on a ``git worktree`` of
REV, alternating with the working tree (before, after, before, after ...) so that both
sides see the same drift of a shared host.

    python benchmarks/loop_ratio.py --presets tiny,small --out benchmarks/loop-ratio.json
    python benchmarks/loop_ratio.py --before HEAD~3 --presets tiny,small --out ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, statistics, sys, tempfile
from pathlib import Path
from hydra import compose, initialize_config_dir
from relpos import runs
from relpos.bench.cases import JaxCase, preset_config
from relpos.config import register_schemas
from relpos.io import config_dir
register_schemas()
preset = sys.argv[1]
interval, rows, rounds, repeats, batch, length = (int(x) for x in sys.argv[2:8])
extra = sys.argv[8].split() if len(sys.argv) > 8 else []
steps = (rows + 1) * interval
overrides = [f"model={preset}", "bias=alibi", f"train.length={length}",
             f"train.batch_size={batch}", f"train.steps={steps}",
             f"train.log_every={interval}", f"train.checkpoint_every={steps}",
             "train.steps_per_call=1", "train.progress=false", "eval.multiples=[1]",
             "eval.modes=[nonoverlap]", f"eval.tokens={length * 2}",
             f"eval.batch_tokens={length * 2}", "eval.attention_windows=0",
             "eval.progress=false", *extra]
with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
    cfg = compose("train", overrides=overrides)
case = JaxCase("alibi", preset_config(preset), batch=batch, length=length,
               total_steps=10_000)
case.run(2)
bench, train, whole, ratios = [], [], [], []
for r in range(repeats):  # bench rounds on both sides of each trainer run
    before = [batch * length * interval / case.run(interval) for _ in range(rounds)]
    with tempfile.TemporaryDirectory() as d:
        res = runs.train(cfg, Path(d) / "run")
        lines = (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()
    after = [batch * length * interval / case.run(interval) for _ in range(rounds)]
    tps = [json.loads(l).get("tokens_per_second") for l in lines]
    rows = [x for x in tps if x][1:]  # the first interval holds the first execution
    b = statistics.median(before + after)
    bench += before + after
    train += rows
    whole.append(res["train_tokens_per_second"] / b)
    ratios.append(statistics.median(rows) / b)
print("RESULT" + json.dumps({
    "ratio": statistics.median(ratios), "ratio_per_repeat": ratios,
    "bench_tokens_per_second": statistics.median(bench),
    "train_tokens_per_second": statistics.median(train),
    "results_json_ratio_per_repeat": whole,
    "bench_rounds": bench, "train_intervals": train}))
"""


def run_side(tree: Path, preset: str, interval: int, length: int, args,
             extra: str = "") -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    argv = [preset, str(interval), *(str(getattr(args, k)) for k in
                                     ("rows", "rounds", "repeats", "batch")), str(length),
            extra]
    proc = subprocess.run([sys.executable, "-c", WORKER, *argv], env=env, cwd=tree,
                          capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise SystemExit(f"worker failed ({tree}, {preset}):\n{proc.stderr[-3000:]}")


def rev_of(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, text=True,
                          capture_output=True).stdout.strip()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--before", default=None, help="a git revision to compare against")
    p.add_argument("--interval", type=int, default=None,
                   help="steps per log row and per bench round (default: tiny 40, else 10)")
    p.add_argument("--rows", type=int, default=3, help="timed trainer intervals per run")
    p.add_argument("--rounds", type=int, default=2,
                   help="bench rounds before and after each trainer run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=None,
                   help="training length (default: tiny 128 as relpos-train's default "
                        "config, else 256 as relpos-bench's)")
    p.add_argument("--variant", action="append", default=[],
                   help="also the working tree with these trainer overrides (space-separated, "
                        "e.g. 'train.prefetch=0'); repeatable")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sides = {"after": ROOT}
    tmp = None
    if args.before:
        tmp = tempfile.mkdtemp(prefix="relpos-before-")
        subprocess.run(["git", "worktree", "add", "--detach", tmp, args.before], cwd=ROOT,
                       check=True, capture_output=True)
        sides = {"before": Path(tmp), "after": ROOT}
    load0 = os.getloadavg()
    out = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "host": {"machine": platform.machine(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "loadavg_start": load0},
           "command": "python benchmarks/loop_ratio.py " + " ".join(argv or sys.argv[1:]),
           "config": {"scheme": "alibi", "batch": args.batch,
                      "steps_per_call": 1, "rows": args.rows, "rounds": args.rounds,
                      "repeats": args.repeats},
           "revisions": {k: rev_of(v) for k, v in sides.items()}, "presets": {}}
    try:
        for preset in args.presets.split(","):
            interval = args.interval or (40 if preset == "tiny" else 10)
            length = args.length or (128 if preset == "tiny" else 256)
            res = {k: run_side(v, preset, interval, length, args) for k, v in sides.items()}
            for extra in args.variant:
                res[f"after {extra}"] = run_side(ROOT, preset, interval, length, args, extra)
            out["presets"][preset] = {"interval": interval, "length": length, **res}
            for k, r in res.items():
                print(f"{preset:6s} {k:6s} bench {r['bench_tokens_per_second']:9,.0f} tok/s  "
                      f"train {r['train_tokens_per_second']:9,.0f} tok/s  "
                      f"ratio {r['ratio']:.3f} (per repeat "
                      + ", ".join(f"{x:.3f}" for x in r["ratio_per_repeat"])
                      + "; results.json's train_tokens_per_second: "
                      + ", ".join(f"{x:.3f}" for x in r["results_json_ratio_per_repeat"]) + ")",
                      flush=True)
    finally:
        if tmp:
            subprocess.run(["git", "worktree", "remove", "--force", tmp], cwd=ROOT,
                           capture_output=True)
    out["host"]["loadavg_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
