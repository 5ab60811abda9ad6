"""Console entry points: parse the Hydra config, call the library, report errors.

``relpos-train``, ``relpos-eval`` and ``relpos-plot`` (also ``python -m relpos.cli
train|eval|plot``). A :class:`~relpos.errors.RelposError` is printed as one line
(``relpos-train: error: ...``) with exit status 2; set ``RELPOS_TRACEBACK=1`` (or
``HYDRA_FULL_ERROR=1``) for the full traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from relpos.config import config_dir, register_schemas
from relpos.errors import RelposError

register_schemas()
CONFIG_DIR = config_dir()
log = logging.getLogger("relpos")


def _quiet_libraries() -> None:
    # orbax logs every checkpoint step through absl at INFO; keep the console readable.
    for name in ("absl", "jax", "orbax", "matplotlib", "datasets", "urllib3", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # After a failed read of a corrupt checkpoint, orbax/tensorstore leave coroutines that
    # are garbage-collected at exit ("Exception ignored in ...: Event loop is closed").
    # They are not errors of the run: send them to the log file, not the console.
    sys.unraisablehook = _log_unraisable
    # The same reads, cut off, can also leave coroutines that were never awaited, which
    # Python reports as a RuntimeWarning when it collects them (at exit, "sys:1").
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                            category=RuntimeWarning)


def _log_unraisable(unraisable) -> None:
    log.debug("ignored exception in %r: %s: %s", unraisable.object,
              type(unraisable.exc_value).__name__, unraisable.exc_value)


def _report(prog: str, fn):
    from relpos.train import Preempted

    _quiet_libraries()
    try:
        return fn()
    except Preempted as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except RelposError as e:
        if os.environ.get("RELPOS_TRACEBACK") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


class CheckOutputDir(Callback):
    """Hydra creates the output directory before the task starts, and a failure there
    comes out as a traceback: check it first and report it in one line (exit 2).
    Registered as ``hydra.callbacks.check_output_dir`` in train/eval/plot.yaml."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable(config, "hydra.sweep.dir")


def _check_writable(config: DictConfig, key: str) -> None:
    prog = f"relpos-{config.hydra.job.name}"
    try:
        path = Path(str(OmegaConf.select(config, key))).expanduser()
    except Exception as e:  # noqa: BLE001 - e.g. relpos-eval without run_dir
        _fail(prog, str(e).splitlines()[0])
    try:
        path.mkdir(parents=True, exist_ok=True)
        reason = None if os.access(path, os.W_OK) else "permission denied"
    except OSError as e:
        reason = e.strerror or type(e).__name__
    if reason:
        _fail(prog, f"cannot write the output directory {path} ({reason})")


def _fail(prog: str, message: str):
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def format_table(results: dict) -> str:
    L0 = results["train_length"]
    lines = [f"{'mode':<10} {'length':>7} {'x train':>7} {'loss':>8} {'ppl':>10} "
             f"{'bits/tok':>8} {'tokens':>8}"]
    for e in results["eval"]:
        lines.append(f"{e['mode']:<10} {e['length']:>7} {e['length'] / L0:>7g} {e['loss']:>8.4f} "
                     f"{e['ppl']:>10.4g} {e['bits_per_token']:>8.4f} {e['tokens']:>8}")
    return "\n".join(lines)


def _summary(results: dict, run_dir: Path) -> str:
    tps = results.get("train_tokens_per_second")
    tps = f"{tps:,.0f}" if tps else "n/a"
    return (f"bias={results['bias']} seed={results['seed']} params={results['params']:,} "
            f"train_tokens={results['train_tokens']:,} "
            f"train_seconds={results['train_seconds']:.1f} train_tokens/s={tps}\n"
            f"run dir: {run_dir}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _train(cfg: DictConfig) -> float:
    from relpos.train import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    results = _report("relpos-train", lambda: train(cfg, run_dir))
    print(format_table(results))
    print(_summary(results, run_dir), flush=True)
    first = results["eval"][0]
    return first["loss"]  # for Hydra sweepers that minimise


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _eval(cfg: DictConfig) -> None:
    from relpos.evaluate import evaluate_run

    results = _report("relpos-eval", lambda: evaluate_run(cfg))
    print(format_table(results))
    print(f"wrote {Path(cfg.run_dir) / cfg.output}", flush=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="plot")
def _plot(cfg: DictConfig) -> None:
    from relpos import plots

    def run():
        written = plots.make_all(list(cfg.inputs), cfg.out_dir, cfg.title, cfg.merge_to)
        print(Path(written["table"]).read_text())
        for name, path in written.items():
            print(f"{name}: {path}")

    _report("relpos-plot", run)


def _interruptible(prog: str, app) -> None:
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints first)
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)


def train_main() -> None:
    _interruptible("relpos-train", _train)


def eval_main() -> None:
    _interruptible("relpos-eval", _eval)


def plot_main() -> None:
    _interruptible("relpos-plot", _plot)


if __name__ == "__main__":
    commands = {"train": train_main, "eval": eval_main, "plot": plot_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m relpos.cli {train,eval,plot} [overrides...]")
    cmd = sys.argv.pop(1)
    commands[cmd]()
