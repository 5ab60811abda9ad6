"""``relpos-train``: train one run (or a Hydra multirun sweep), evaluate, print the table."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from relpos import runs
from relpos.cli.common import fail, format_table, interruptible, path_override, report
from relpos.config import register_schemas
from relpos.io import config_dir
from relpos.training.distributed import is_primary, process_index_hint
from relpos.training.loop import Preempted

register_schemas()


def summary(results: dict, run_dir: Path) -> str:
    tps = results.get("train_tokens_per_second")
    tps = f"{tps:,.0f}" if tps else "n/a"
    resumed = results.get("resumed_from_step")
    return (f"bias={results['bias']} seed={results['seed']} params={results['params']:,} "
            f"train_tokens={results['train_tokens']:,} "
            f"train_seconds={results['train_seconds']:.1f} train_tokens/s={tps}"
            + (f" (resumed from step {resumed})" if resumed else "") + "\n"
            f"run dir: {run_dir}\n"
            f"re-evaluate: relpos-eval {path_override('run_dir', run_dir)}")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _train(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    results = report("relpos-train", lambda: runs.train(cfg, run_dir), stopped=(Preempted,))
    if is_primary():  # one table for a multi-process run
        print(format_table(results))
        print(summary(results, run_dir), flush=True)
    first = results["eval"][0]  # for Hydra sweepers that minimise
    return first["loss"] if "loss" in first else 1.0 - first["accuracy"]


def check_task_choice(argv: list[str]) -> None:
    """``task=<name>`` (also in a sweep, ``task=a,b``) must name a file of configs/task/:
    one line listing the valid ones, before Hydra's multi-line error."""
    valid = sorted(p.stem for p in (Path(config_dir()) / "task").glob("*.yaml"))
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "task" and re.fullmatch(r"[\w,]+", value):  # else: Hydra's
            for name in value.split(","):
                if name.strip() not in valid:
                    fail("relpos-train", f"unknown task {name.strip()!r}; valid: "
                                         f"{', '.join(valid)} (configs/task/)")


def quiet_secondary_process(argv: list[str]) -> list[str]:
    """In a multi-process run (``train.distributed=true``), processes other than 0 leave
    the run directory to process 0: no ``.hydra/`` copy, no ``train.log`` (their warnings
    and errors still reach the console)."""
    if process_index_hint(argv) == 0:
        return argv
    return [*argv, "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def main() -> None:
    check_task_choice(sys.argv[1:])
    sys.argv[1:] = quiet_secondary_process(sys.argv[1:])
    interruptible("relpos-train", _train)
