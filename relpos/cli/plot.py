"""``relpos-plot``: figures and a markdown table from results files (imports no JAX)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from relpos import plots
from relpos.cli.common import interruptible, report
from relpos.io import config_dir


@dataclass
class PlotConfig:
    inputs: list[str] = field(default_factory=lambda: ["multirun"])
    out_dir: str = "figures"
    title: str = ""
    merge_to: str | None = None  # also write every run's results (+ bias profile) here


ConfigStore.instance().store(name="plot_schema", node=PlotConfig)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="plot")
def _plot(cfg: DictConfig) -> None:
    def run():
        written = plots.make_all(list(cfg.inputs), cfg.out_dir, cfg.title, cfg.merge_to)
        print(Path(written["table"]).read_text())
        for name, path in written.items():
            print(f"{name}: {path}")

    report("relpos-plot", run)


def main() -> None:
    interruptible("relpos-plot", _plot)
