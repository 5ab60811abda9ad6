"""Metrics to three places: TensorBoard (tensorboardX), a JSONL file, the log."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


def json_safe(v):
    """A metric value as strict JSON allows: non-finite floats become null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricLogger:
    """``enabled=False`` (processes other than 0 of a multi-process run): writes nothing,
    opens no file."""

    def __init__(self, run_dir: Path, *, hparams: dict | None = None, enable_tb: bool = True,
                 enabled: bool = True):
        self.run_dir, self.enabled = run_dir, enabled
        self.tb, self.hparams = None, hparams or {}
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        self.jsonl = open(path, "a")
        if self.jsonl.tell() and not _ends_with_newline(path):
            self.jsonl.write("\n")  # a killed run can leave half a row: start a fresh line
        if enable_tb:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
            if hparams:
                self.tb.add_text("hparams", "\n".join(f"- {k}: {v}" for k, v in hparams.items()))

    def scalars(self, row: dict, step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: json_safe(v) for k, v in row.items() if k != "step"}}
        self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if "loss" in row:
            log.info("step %d loss %s grad_norm %s lr %s tok/s %s", step, *(
                _fmt(row.get(k), f) for k, f in (("loss", ".4f"), ("grad_norm", ".3f"),
                                                 ("lr", ".2e"), ("tokens_per_second", ".0f"))))

    def final(self, results: dict) -> None:
        """Hyper-parameters against the final metrics (TensorBoard's HPARAMS tab)."""
        if self.tb is None:
            return
        metrics = {f"hparam/ppl_{e['mode']}_L{e['length']}": e["ppl"]
                   for e in results.get("eval", []) if "ppl" in e and math.isfinite(e["ppl"])}
        metrics.update({f"hparam/accuracy_{e['mode']}_L{e['length']}": e["accuracy"]
                        for e in results.get("eval", []) if "accuracy" in e})  # tasks, passkey
        self.tb.add_hparams(self.hparams, metrics, name=".")

    def bias_figure(self, profile: dict | None, step: int) -> None:
        if self.tb is None or profile is None:
            return
        from relpos import plots  # matplotlib: imported when a figure is drawn, not at start

        fig = plots.bias_profile_figure(profile)
        if fig is not None:
            self.tb.add_figure("position_bias", fig, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"
