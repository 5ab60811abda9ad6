"""What every command shares: one-line errors, the output-directory check, quoting of
paths on the command line. Imports no JAX (``relpos-plot`` uses it)."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from relpos.errors import RelposError

log = logging.getLogger("relpos")

# Overrides whose value is a path or a free text: quoted for Hydra's parser when it holds
# characters that the override grammar reads as syntax (Hydra's own multirun job
# folders are named like `bias=alibi,eval.multiples=[1,2]`; labels like `offset (mask)`).
STRING_KEYS = ("run_dir", "hydra.run.dir", "hydra.sweep.dir", "out_dir", "merge_to", "label",
               "title")
_SPECIAL = set("=,[]{}()'\" \\:$*?")


def hydra_quote(value: str) -> str:
    """``value`` as a single-quoted Hydra string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def path_override(key: str, path) -> str:
    """``key=<path>`` as one shell argument; the commands quote its value for Hydra
    (:func:`quote_path_arguments`)."""
    return shlex.quote(f"{key}={path}")


def quote_path_arguments(argv: list[str]) -> list[str]:
    """Quote the value of ``run_dir=...`` (and the other :data:`STRING_KEYS`) when it holds
    override syntax and is not quoted already, so ``relpos-eval run_dir=<a multirun job
    folder>`` works as written."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in STRING_KEYS and value and value[0] not in "'\"" \
                and _SPECIAL & set(value):
            arg = f"{key}={hydra_quote(value)}"
        out.append(arg)
    return out


def quiet_libraries() -> None:
    # orbax logs every checkpoint step through absl at INFO; keep the console readable.
    for name in ("absl", "jax", "orbax", "matplotlib", "datasets", "urllib3", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Checkpoints are written without OCDBT (see relpos.training.checkpoint), and orbax
    # warns at every save that it found no OCDBT files to merge.
    logging.getLogger("absl").addFilter(
        lambda record: "Skipping merge of OCDBT" not in record.getMessage())
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


def report(prog: str, fn, *, stopped: tuple[type, ...] = ()):
    """Run ``fn``; a :class:`RelposError` becomes one line on stderr (and in the log
    file) and exit 2; an exception of a ``stopped`` type (with ``signum``) exits
    ``128 + signum``."""
    quiet_libraries()
    try:
        return fn()
    except stopped as e:
        log.info("%s", e)  # the log file (the console shows the line below)
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except RelposError as e:
        log.info("error: %s", e)  # the log file (the console shows the line below)
        if os.environ.get("RELPOS_TRACEBACK") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


class CheckOutputDir(Callback):
    """Hydra creates the output directory before the task starts, and a failure there
    comes out as a traceback: check it first and report it in one line (exit 2).
    ``relpos-eval`` also refuses a ``run_dir`` that is not a run directory, before Hydra
    writes anything there. Registered as ``hydra.callbacks.check_output_dir``."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.job.name == "eval":
            _check_run_dir(config)
        _check_writable(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable(config, "hydra.sweep.dir")


def _check_run_dir(config: DictConfig) -> None:
    if OmegaConf.is_missing(config, "run_dir"):
        fail("relpos-eval", "run_dir is required: relpos-eval run_dir=<a run directory that "
                            "relpos-train wrote> [eval.multiples=[...]]")
    run_dir = Path(str(config.run_dir)).expanduser()
    if not (run_dir / "relpos_config.yaml").is_file():
        fail("relpos-eval", f"{run_dir} is not a relpos run directory (no relpos_config.yaml); "
                            "give run_dir=<the run directory relpos-train printed>")


def _check_writable(config: DictConfig, key: str) -> None:
    prog = f"relpos-{config.hydra.job.name}"
    try:
        path = Path(str(OmegaConf.select(config, key))).expanduser()
    except Exception as e:  # noqa: BLE001 - an interpolation that cannot be resolved
        fail(prog, str(e).splitlines()[0])
    try:
        path.mkdir(parents=True, exist_ok=True)
        reason = None if os.access(path, os.W_OK) else "permission denied"
    except OSError as e:
        reason = e.strerror or type(e).__name__
    if reason:
        fail(prog, f"cannot write the output directory {path} ({reason})")


def fail(prog: str, message: str):
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def interruptible(prog: str, app) -> None:
    sys.argv[1:] = quote_path_arguments(sys.argv[1:])
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints first)
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)


def format_table(results: dict) -> str:
    """The evaluation table the commands print (perplexity to 3 decimals)."""
    L0 = results["train_length"]
    lines = [f"{'mode':<10} {'length':>7} {'x train':>7} {'loss':>8} {'ppl':>10} "
             f"{'bits/tok':>8} {'tokens':>8}"]
    for e in results["eval"]:
        if "ppl" not in e:
            continue
        lines.append(f"{e['mode']:<10} {e['length']:>7} {e['length'] / L0:>7g} {e['loss']:>8.4f} "
                     f"{e['ppl']:>10.3f} {e['bits_per_token']:>8.4f} {e['tokens']:>8}")
    accuracy = [e for e in results["eval"] if "accuracy" in e]  # tasks, passkey retrieval
    if accuracy:
        if len(lines) == 1:
            lines = []
        lines.append(f"{'mode':<10} {'length':>7} {'x train':>7} {'exact match [95% Wilson]':>26} "
                     f"{'token acc':>9} {'chance':>6} {'examples':>8}")
        for e in accuracy:
            lo, hi = e["accuracy_ci"]
            lines.append(f"{e['mode']:<10} {e['length']:>7} {e['length'] / L0:>7g} "
                         f"{e['accuracy']:>9.3f} [{lo:.3f}, {hi:.3f}]  {e['token_accuracy']:>9.3f} "
                         f"{e['chance']:>6.3g} {e['examples']:>8}")
    return "\n".join(lines)
