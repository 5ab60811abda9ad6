"""``relpos-eval``: re-evaluate a finished run from its latest checkpoint."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from relpos import runs
from relpos.cli.common import format_table, interruptible, report
from relpos.config import register_schemas
from relpos.io import config_dir

register_schemas()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _eval(cfg: DictConfig) -> None:
    results = report("relpos-eval", lambda: runs.evaluate_run(cfg))
    print(format_table(results))
    print(f"wrote {Path(cfg.run_dir) / cfg.output}", flush=True)


def main() -> None:
    interruptible("relpos-eval", _eval)
