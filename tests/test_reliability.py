"""Faults during training and how relpos comes through them (issue 7, items 1-5).

Every run here is the same tiny command (see ``Workspace`` in helpers.py, whose
helpers this file shares); an uninterrupted run of it is the reference, and a run that
was killed, signalled or given a corrupt checkpoint must end with exactly the reference's
losses and parameters (bitwise: same seed, same (seed, step) batches, CPU).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import Workspace, assert_trees_equal, cli_argv, compose_train, restore_state
from omegaconf import OmegaConf

from relpos import io as io_lib
from relpos.config import build_model
from relpos.errors import RelposError
from relpos.runs import check_resume_compatible
from relpos.training.step import make_optimizer

STEPS, EVERY = 400, 100
# The offset table (the project's seed scheme) has an interpolated option, size: ${train.length}.
RUN_ARGS = ["bias=offset", f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}",
            "train.log_every=50"]


def train_cmd(ws: Workspace, run_dir: Path, *extra: str) -> list[str]:
    return cli_argv("train") + ws.args + RUN_ARGS + [f"hydra.run.dir={run_dir}", *extra]


def run_train(ws: Workspace, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(ws, run_dir, *extra), capture_output=True, text=True,
                          cwd=ws.root, env=ws.env, timeout=300)


def start_train(ws: Workspace, run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(train_cmd(ws, run_dir), cwd=ws.root, env=ws.env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
        if folder.exists() else []


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, above: int) -> int:
    """Poll until a finished checkpoint newer than ``above`` exists (orbax renames a
    step folder into place only when it is complete)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = [s for s in checkpoint_steps(run_dir) if s > above]
        if done:
            return done[0]
        assert proc.poll() is None, f"run ended early: {proc.stderr.read()}"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def assert_same_run(run_dir: Path, ref_dir: Path) -> None:
    got, want = results(run_dir), results(ref_dir)
    assert got["final_train_loss"] == want["final_train_loss"]
    assert [(e["mode"], e["length"], e["loss"]) for e in got["eval"]] == \
        [(e["mode"], e["length"], e["loss"]) for e in want["eval"]]
    assert got["skipped_steps"] == want["skipped_steps"] == 0
    assert_trees_equal(restore_state(run_dir, STEPS), restore_state(ref_dir, STEPS))


def one_line(stderr: str, allow: str | None = None) -> str:
    """The one line a failure printed (lines matching ``allow`` aside: a resume notice)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines()
             if line.strip() and not (allow and re.fullmatch(allow, line))]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def reference(ws) -> Path:
    run_dir = ws.root / "reference"
    r = run_train(ws, run_dir)
    assert r.returncode == 0, r.stderr
    return run_dir


# ----------------------------------------------------------------------------- 5. determinism


def test_same_command_twice_gives_identical_results(ws, reference):
    again = ws.root / "again"
    r = run_train(ws, again)
    assert r.returncode == 0, r.stderr
    assert_same_run(again, reference)


# ----------------------------------------------------------------------------- 1. kill -9


@pytest.mark.slow  # ~15 s; resume after a signal is in the default suite (SIGTERM below)
def test_kill9_then_rerun_resumes_to_identical_end(ws, reference):
    run_dir = ws.root / "killed"
    proc = start_train(ws, run_dir)
    wait_for_checkpoint(proc, run_dir, above=0)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()

    r = run_train(ws, run_dir)
    assert r.returncode == 0, r.stderr
    assert "resumed from step" in (run_dir / "train.log").read_text()
    assert_same_run(run_dir, reference)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # a row cut by the kill does not swallow the next one


# ----------------------------------------------------------------------------- 2. signals


def stop_with(proc: subprocess.Popen, run_dir: Path, sig: signal.Signals, above: int) -> int:
    """Signal a run once it has a checkpoint newer than ``above``; check it saves a
    checkpoint at the step it stopped at and exits 128 + signum with one line."""
    wait_for_checkpoint(proc, run_dir, above)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    line = one_line(err, allow=r"resumed from step \d+ in \S+")
    m = re.fullmatch(rf"relpos-train: stopped by {sig.name} at step (\d+); checkpoint saved in "
                     rf"(\S+); to resume, rerun the same command with hydra.run.dir=(\S+)", line)
    assert m, line
    step = int(m.group(1))
    assert Path(m.group(2)) == Path(m.group(3)) == run_dir
    assert above < step < STEPS and step in checkpoint_steps(run_dir)
    assert not (run_dir / "results.json").exists()
    return step


def test_sigterm_sigint_and_sigusr2_checkpoint_exit_cleanly_and_resume(ws, reference):
    """SIGUSR2 is SLURM's time-limit warning (``--signal``) and submitit's requeue
    signal: like SIGTERM it checkpoints the step it stopped at (exit 140)."""
    run_dir = ws.root / "signalled"
    first = stop_with(start_train(ws, run_dir), run_dir, signal.SIGTERM, above=0)
    second = stop_with(start_train(ws, run_dir), run_dir, signal.SIGINT, above=first)
    stop_with(start_train(ws, run_dir), run_dir, signal.SIGUSR2, above=second)
    r = run_train(ws, run_dir)
    assert r.returncode == 0, r.stderr
    assert_same_run(run_dir, reference)


# ----------------------------------------------------------------------------- 3. NaN / inf


def test_nonfinite_loss_stops_naming_step_and_metric(ws):
    run_dir = ws.root / "nan"
    r = subprocess.run(
        cli_argv("train") + ws.args + ["train.steps=10", "train.checkpoint_every=1",
                                       "train.log_every=5", "optim.lr=1e30",
                                       f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=ws.root, env=ws.env, timeout=300)
    assert r.returncode == 2
    m = re.match(r"relpos-train: error: non-finite (loss|grad_norm) at step (\d+); training "
                 r"stopped, the last good checkpoint is kept", one_line(r.stderr))
    assert m, r.stderr
    bad = int(m.group(2))
    kept = checkpoint_steps(run_dir)
    assert kept and kept[-1] == bad - 1  # checkpoint_every=1: every good step was saved
    state = restore_state(run_dir, kept[-1])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    assert not (run_dir / "results.json").exists()


def test_nonfinite_skip_policy_skips_and_counts(ws):
    run_dir = ws.root / "nan_skip"
    r = subprocess.run(
        cli_argv("train") + ws.args + ["train.steps=10", "train.log_every=5", "optim.lr=1e30",
                                       "train.on_nonfinite=skip", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=ws.root, env=ws.env, timeout=300)
    assert r.returncode == 0, r.stderr
    res = results(run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    counts = [row["skipped_steps"] for row in rows if "skipped_steps" in row]
    assert res["skipped_steps"] > 0 and res["skipped_steps"] == counts[-1]
    assert counts == sorted(counts)
    # The logged lr is the one the optimiser used: skipped steps do not advance its count.
    cfg = compose_train(ws.args + ["train.steps=10", "optim.lr=1e30"])
    params = nnx.split(build_model(cfg, vocab_size=257), nnx.Param)[1]
    _, schedule = make_optimizer(cfg.optim, 10, params)
    state = restore_state(run_dir, 10)  # a skipped update never reaches the parameters
    count = {int(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(
        state["opt_state"])[0] if "count" in jax.tree_util.keystr(path)}
    assert count == {10 - res["skipped_steps"]}  # updates applied
    last = [row for row in rows if "lr" in row][-1]
    assert last["step"] == 10
    assert last["lr"] == pytest.approx(float(schedule(count.pop() - 1)))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


# ----------------------------------------------------------------------------- 4. atomic outputs


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    io_lib.atomic_write_json(path, {"ok": 1})

    def half_then_fail(tmp):
        Path(tmp).write_text('{"ok": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io_lib.atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not 0600


def test_failed_plot_leaves_the_old_figures(reference, tmp_path, monkeypatch):
    import matplotlib.figure

    from relpos import plots

    written = plots.make_all([str(reference)], str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert "ppl_vs_length.png" in before and "table.md" in before

    def broken_savefig(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        plots.make_all([str(reference)], str(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert set(written.values()) <= {str(tmp_path / name) for name in before}


def corrupt(step_dir: Path) -> None:
    """Cut the largest parameter file of a checkpoint short, as a crash or full disk might
    (a parameter: evaluation reads the parameters alone)."""
    biggest = max((p for p in (step_dir / "state").rglob("*")
                   if p.is_file() and p.relative_to(step_dir / "state").parts[0].startswith(
                       "params")),
                  key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(100)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(ws, reference):
    run_dir = ws.root / "corrupt"
    shutil.copytree(reference, run_dir)
    (run_dir / "results.json").unlink()
    corrupt(run_dir / "checkpoints" / str(STEPS))

    r = ws.run("eval", f"run_dir={run_dir}", "eval.multiples=[1]", "eval.tokens=64")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert json.loads((run_dir / "eval_results.json").read_text())["checkpoint_step"] == \
        STEPS - EVERY
    assert f"checkpoint(s) {STEPS} (" in r.stdout + r.stderr

    r = run_train(ws, run_dir)  # the same command: resumes from the previous checkpoint
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert (run_dir / "checkpoints" / f"{STEPS}.unreadable").is_dir()  # kept, set aside
    assert f"resumed from step {STEPS - EVERY}" in (run_dir / "train.log").read_text()
    assert_same_run(run_dir, reference)


def test_no_readable_checkpoint_is_one_clear_error(ws, reference):
    run_dir = ws.root / "all_corrupt"
    shutil.copytree(reference, run_dir)
    for step in checkpoint_steps(run_dir):
        corrupt(run_dir / "checkpoints" / str(step))
    r = ws.run("eval", f"run_dir={run_dir}", "eval.multiples=[1]", "eval.tokens=64")
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert line.startswith("relpos-eval: error: no readable checkpoint in ")
    assert all(f"{s} (" in line for s in (STEPS, STEPS - EVERY))



def test_resume_check_compares_resolved_config_once_a_checkpoint_exists(ws, tmp_path):
    cfg = compose_train(ws.args + ["bias=offset"])
    (tmp_path / "relpos_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    other = compose_train(ws.args + ["bias=offset", "train.length=32"])
    check_resume_compatible(tmp_path, other)  # no checkpoint yet: nothing to protect
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    check_resume_compatible(tmp_path, cfg)  # bias.size=${train.length} saved resolved
    with pytest.raises(RelposError, match=r"different configuration \(bias.size, train.length\)"):
        check_resume_compatible(tmp_path, other)
    # How attention is computed may change between attempts; what is computed may not.
    check_resume_compatible(tmp_path, compose_train(ws.args + [
        "bias=offset", "model.attn_impl=blockwise", "model.block_size=64",
        "model.dense_max_len=64"]))
    with pytest.raises(RelposError, match=r"different configuration \(model.d_model\)"):
        check_resume_compatible(tmp_path, compose_train(ws.args + [
            "bias=offset", "model.block_size=64", "model.d_model=64"]))


def test_a_run_saved_before_a_config_key_existed_still_resumes(ws, tmp_path):
    """optim.position_lr_scale came after some runs were saved: their config lacks it and
    reads as the default (1.0), so they resume; another value is a different run."""
    cfg = compose_train(ws.args)
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["optim"]["position_lr_scale"]
    (tmp_path / "relpos_config.yaml").write_text(OmegaConf.to_yaml(old))
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    check_resume_compatible(tmp_path, cfg)
    with pytest.raises(RelposError, match=r"different configuration \(optim.position_lr_scale\)"):
        check_resume_compatible(tmp_path, compose_train(ws.args + ["optim.position_lr_scale=2"]))


def test_a_run_saved_before_a_config_key_existed_still_evaluates(ws, reference, tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(reference, run_dir)
    path = run_dir / "relpos_config.yaml"
    old = OmegaConf.to_container(OmegaConf.load(path))
    del old["optim"]["position_lr_scale"]
    path.write_text(OmegaConf.to_yaml(old))
    r = ws.run("eval", f"run_dir={run_dir}", "eval.multiples=[1]", "eval.tokens=64")
    assert r.returncode == 0, r.stderr
    assert json.loads((run_dir / "eval_results.json").read_text())["checkpoint_step"] == STEPS


def test_metrics_after_a_cut_row_start_on_a_fresh_line(tmp_path):
    from relpos.training.metrics import MetricLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    log = MetricLogger(tmp_path, enable_tb=False)  # as after kill -9 mid-write
    log.scalars({"loss": 1.5}, 3)
    log.close()
    last = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last) == {"step": 3, "loss": 1.5}
