"""Shared test helpers: a generated corpus, the tiny-run overrides, CLI invocation,
composing configs, comparing pytrees, the built-in scheme names (imported as ``helpers``;
tests/ is on sys.path)."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from hydra import compose, initialize_config_dir

from relpos import positions
from relpos.config import register_schemas
from relpos.io import config_dir
from relpos.training.checkpoint import Checkpoints

register_schemas()


def write_corpus(path: Path, n_chars: int = 60_000, seed: int = 0) -> Path:
    """Generated English-like text: learnable in a few steps, no download."""
    rng = random.Random(seed)
    words = ("the a position bias offset attention head query key value token length "
             "train test long short model layer window slope table relative").split()
    parts, size = [], 0
    while size < n_chars:
        s = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ". "
        parts.append(s)
        size += len(s)
    path.write_text("".join(parts))
    return path


def tiny_args(corpus: Path, cache_dir: Path, *, multiples: str = "[1,2]") -> list[str]:
    """Overrides of a tiny CPU run: a 1-layer, 32-wide, 2-head model trained at length 16
    on the text file ``corpus`` (token cache in ``cache_dir``), no progress bar, evaluated
    at ``multiples`` of the training length."""
    return ["model.d_model=32", "model.num_layers=1", "model.num_heads=2",
            "train.length=16", "train.progress=false",
            "data=text_files", f"data.paths=[{corpus}]", f"data.cache_dir={cache_dir}",
            f"eval.multiples={multiples}"]


def builtin_schemes() -> list[str]:
    """The registered scheme names defined in relpos itself (sorted): an installed plug-in
    (an entry point in group ``relpos.positions``) adds names to ``available()``, not here."""
    return [name for name in positions.available()
            if positions.lookup(name).__module__.startswith("relpos.positions.")]


def cli_env(base: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RELPOS_TRACEBACK", "HYDRA_FULL_ERROR")}
    env.update({
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(base / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    })
    return env


def cli_argv(cmd: str) -> list[str]:
    script = Path(sys.executable).parent / f"relpos-{cmd}"
    return [str(script)] if script.exists() else [sys.executable, "-m", "relpos.cli", cmd]


def run_cli_in_process(cmd: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``relpos-<cmd> args`` run in this process, as its console script would run it
    (``main()`` with ``sys.argv``, in ``cwd``): the exit status and what it printed, with
    no interpreter start or imports per call. Hydra's logging set-up is skipped (it would
    close every logging handler of this process, pytest's too), so no train.log is
    written: a test of the log runs the script itself. argv, the working directory, the
    unraisable hook and Hydra's global state are restored afterwards."""
    import importlib
    import io
    from unittest import mock

    from hydra._internal import logging_config
    from hydra.core.global_hydra import GlobalHydra

    main = importlib.import_module(f"relpos.cli.{cmd}").main
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, os.getcwd(), sys.unraisablehook
    sys.argv = [f"relpos-{cmd}", *args]
    os.chdir(cwd)
    GlobalHydra.instance().clear()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                mock.patch.object(logging_config, "configure_logging"):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        GlobalHydra.instance().clear()
        sys.argv, _, sys.unraisablehook = saved
        os.chdir(saved[1])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


class Workspace:
    """A corpus, a token cache and the tiny-model overrides every run here shares."""

    def __init__(self, root: Path, base: Path):
        self.root = root
        self.corpus = write_corpus(root / "corpus.txt")
        self.env = cli_env(base)
        self.args = tiny_args(self.corpus, base / "data-cache") + [
            "train.batch_size=8", "optim.warmup_steps=5",
            "eval.tokens=512", "eval.batch_tokens=256",
        ]

    def run(self, cmd: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(cli_argv(cmd) + list(args), capture_output=True, text=True,
                              cwd=self.root, env=self.env, timeout=timeout)

    def train(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("train", *self.args, *args, **kw)


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides)


def restore_state(run_dir: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore((run_dir / "checkpoints" / str(step) / "state")
                                              .resolve())


def assert_trees_equal(a, b) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def loss_rows(run_dir: Path) -> list[dict]:
    """The training rows (those with a loss) of a run's metrics.jsonl, in order."""
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if "loss" in r]


def eval_by_key(results: dict) -> dict:
    return {(e["mode"], e["length"]): e for e in results["eval"]}


@contextlib.contextmanager
def sigterm_after_checkpoint(monkeypatch, at_step: int):
    """Within the block, the process sends itself SIGTERM right after the checkpoint of
    ``at_step`` is saved (as a scheduler's preemption would arrive)."""
    save = Checkpoints.save

    def save_then_signal(self, step, state, meta):
        save(self, step, state, meta)
        if step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Checkpoints, "save", save_then_signal)
    try:
        yield
    finally:
        monkeypatch.setattr(Checkpoints, "save", save)
