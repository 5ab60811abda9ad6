"""Two processes training one model on one host (issue 20): ``jax.distributed`` with a
coordinator on 127.0.0.1, gloo collectives on CPU, 2 simulated CPU devices per process
(a global mesh of 4), started the way ``srun`` starts tasks (SLURM's variables in the
environment) or with explicit ``train.coordinator/num_processes/process_id``.

Each run is a real ``relpos-train`` command; the single-process reference is the same
command with ``train.parallel=none`` on one device. The 2-process runs must match it to
fp32 rounding (the data-parallel gradient is summed in another order), write the run's
files once (process 0), and their checkpoints must resume on another process count.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import cli_argv, loss_rows, restore_state

from relpos.training.distributed import process_index_hint

RUN_ARGS = ["bias=alibi", "train.steps=12", "train.log_every=4", "train.checkpoint_every=8",
            "eval.modes=[nonoverlap]", "eval.multiples=[1]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_job_id() -> int:
    """A SLURM job id whose coordinator port is free (JAX's SLURM support puts the
    coordinator on port 61440 + job id % 4096 of the step's first node)."""
    for _ in range(50):
        offset = int.from_bytes(os.urandom(2), "little") % 4096
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 61440 + offset))
            return 4096 * 300 + offset
        except OSError:
            continue
    raise RuntimeError("no free port in SLURM's range")


def env_for(ws, devices: int) -> dict:
    env = {k: v for k, v in ws.env.items() if not k.startswith("JAX_PERSISTENT")
           and k != "JAX_COMPILATION_CACHE_DIR"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def start(ws, run_dir: Path, nproc: int, *extra: str, style: str = "slurm",
          devices: int = 2) -> list[subprocess.Popen]:
    """``nproc`` relpos-train processes of one run, as srun would start them."""
    cmd = cli_argv("train") + ws.args + RUN_ARGS + [f"hydra.run.dir={run_dir}", *extra]
    if nproc == 1:
        return [subprocess.Popen(cmd, cwd=ws.root, env=env_for(ws, devices), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    cmd += ["train.distributed=true"]
    if style == "slurm":
        job = slurm_job_id()
    else:
        port = free_port()
    procs = []
    for i in range(nproc):
        env = env_for(ws, devices)
        args = list(cmd)
        if style == "slurm":  # what srun exports to task i (jax reads these)
            env.update(SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="127.0.0.1",
                       SLURM_NTASKS=str(nproc), SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                       SLURM_STEP_NUM_NODES="1")
        else:
            args += [f"train.coordinator=127.0.0.1:{port}", f"train.num_processes={nproc}",
                     f"train.process_id={i}"]
        procs.append(subprocess.Popen(args, cwd=ws.root, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(procs, timeout: int = 400) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, o, e))
    return out


def run(ws, run_dir: Path, nproc: int, *extra: str, **kw):
    out = finish(start(ws, run_dir, nproc, *extra, **kw))
    for code, _, err in out:
        assert code == 0, err[-3000:]
    return out


def params(run_dir: Path, step: int, like=None) -> list[np.ndarray]:
    """The checkpointed parameters at ``step``; a checkpoint written on a mesh of another
    size restores with ``like`` (a checkpoint's state) as the target, on one device."""
    if like is None:
        state = restore_state(run_dir, step)
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                                like)
        path = (run_dir / "checkpoints" / str(step) / "state").resolve()
        state = ocp.StandardCheckpointer().restore(path, abstract)
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def agreement(run_dir: Path, ref_dir: Path, step: int = 12) -> dict:
    """max |loss diff| over the steps both runs logged and max |param diff| at
    ``step``."""
    a = {r["step"]: r["loss"] for r in loss_rows(run_dir)}
    b = {r["step"]: r["loss"] for r in loss_rows(ref_dir)}
    common = sorted(set(a) & set(b))
    like = restore_state(ref_dir, step)
    pa, pb = params(run_dir, step, like), params(ref_dir, step)
    return {"loss": max(abs(a[s] - b[s]) for s in common), "steps": len(common),
            "param": max(float(np.abs(x - y).max()) for x, y in zip(pa, pb)),
            "param_scale": max(float(np.abs(y).max()) for y in pb)}


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def reference(ws) -> Path:
    run_dir = ws.root / "one-process"
    run(ws, run_dir, 1, devices=1)
    return run_dir


@pytest.mark.parametrize("mode,style", [  # FSDP over 2 processes: ~22 s more, run on purpose
    ("data", "slurm"), pytest.param("fsdp", "explicit", marks=pytest.mark.slow)])
def test_two_processes_train_like_one(ws, reference, mode, style):
    """Data parallel (started as srun starts tasks) and FSDP (explicit settings) over 2
    processes x 2 devices: the losses, final parameters and evaluation of the 1-process
    run (fp32 rounding); process 0 alone writes results, metrics, TensorBoard, train.log
    and .hydra; the checkpoints hold every array once."""
    run_dir = ws.root / f"two-processes-{mode}"
    out = run(ws, run_dir, 2, f"train.parallel={mode}", style=style)
    agree = agreement(run_dir, reference)
    print(f"agreement 2 processes, {mode}:", agree)
    assert agree["loss"] < 1e-5 and agree["param"] < 1e-5, agree
    got, want = results(run_dir), results(reference)
    np.testing.assert_allclose([e["loss"] for e in got["eval"]],
                               [e["loss"] for e in want["eval"]], rtol=1e-6)
    assert got["final_train_loss"] == pytest.approx(want["final_train_loss"], rel=1e-6)
    # one writer: one row per logged step, one log, one config copy, one TensorBoard run
    assert [r["step"] for r in loss_rows(run_dir)] == [4, 8, 12]
    log = (run_dir / "train.log").read_text()
    assert "process 0 of 2" in log and "process 1 of 2" not in log
    assert len(list((run_dir / "tb").glob("events.*"))) == \
        len(list((reference / "tb").glob("events.*")))
    assert sorted(p.name for p in run_dir.iterdir()) == \
        sorted(p.name for p in reference.iterdir())
    # each array once: orbax spreads a replicated array's chunks over its replicas, so
    # the checkpoint holds as many bytes as the 1-process one (chunk headers aside)
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())  # noqa: E731
    two, one = (d / "checkpoints" / "12" / "state" for d in (run_dir, reference))
    assert size(two) < 1.1 * size(one), (size(two), size(one))
    assert sum(1 for _ in two.rglob(".zarray")) == sum(1 for _ in one.rglob(".zarray"))
    assert "bias=alibi" in out[0][1] and "bias=alibi" not in out[1][1]  # one table printed


@pytest.mark.parametrize("extra,line", [
    (["train.parallel=data", "train.batch_size=6"],
     "batch size 6 is not divisible by the 4 devices of the data mesh; choose a multiple of 4"),
    (["train.parallel=none"],
     "train.distributed=true runs 2 processes training one model: set train.parallel=data "
     "or fsdp"),
], ids=["batch", "parallel-none"])
def test_a_setup_that_cannot_split_over_the_processes_is_one_line(ws, extra, line):
    """batch 6 over 2 processes x 2 devices, or no mesh: one clear line on each process,
    before any data is loaded."""
    out = finish(start(ws, ws.root / f"bad-{extra[-1]}", 2, *extra, style="explicit"))
    for code, _, err in out:
        assert code == 2, err[-2000:]
        lines = [x for x in err.splitlines() if x.strip() and not x.startswith("[Gloo]")]
        assert lines == [f"relpos-train: error: {line}"], err[-2000:]


def wait_for_checkpoint(procs, run_dir: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        folder = run_dir / "checkpoints"
        if folder.exists() and any(p.name.isdigit() for p in folder.iterdir()):
            return
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["data", "fsdp"])
def test_stop_on_two_processes_resume_on_one_and_back(ws, reference, mode):
    """A 2-process run (data or FSDP) that one SIGUSR2 to process 0 stops: both processes
    stop after the same step, checkpoint it and exit 140; the run resumes on one process
    and ends where the 1-process run ends. Then a 1-process checkpoint resumes on 2
    processes."""
    long = ["train.steps=400", "train.checkpoint_every=100", "train.log_every=50"]
    ref = ws.root / f"long-one-{mode}"
    run(ws, ref, 1, *long, devices=1)
    run_dir = ws.root / f"stopped-two-{mode}"
    procs = start(ws, run_dir, 2, f"train.parallel={mode}", *long, style="explicit")
    wait_for_checkpoint(procs, run_dir)
    procs[0].send_signal(signal.SIGUSR2)
    out = finish(procs)
    steps = set()
    for code, _, err in out:
        assert code == 128 + signal.SIGUSR2, err[-3000:]
        m = re.search(r"stopped by SIGUSR2 at step (\d+)", err)
        steps.add(int(m.group(1)))
    (step,) = steps
    assert 100 <= step < 400 and (run_dir / "checkpoints" / str(step)).is_dir()
    run(ws, run_dir, 1, *long, devices=1)  # resume on one process, one device
    agree = agreement(run_dir, ref, 400)
    print(f"agreement stopped at {step} on 2 processes ({mode}), resumed on 1:", agree)
    assert agree["loss"] < 1e-4 and agree["param"] < 1e-4, agree
    assert results(run_dir)["resumed_from_step"] == step

    # and back: the 1-process reference's checkpoint 300 resumed on 2 processes
    back = ws.root / f"one-then-two-{mode}"
    back.mkdir()
    shutil.copytree(ref / "checkpoints", back / "checkpoints")
    shutil.copy(ref / "relpos_config.yaml", back / "relpos_config.yaml")
    shutil.rmtree(back / "checkpoints" / "400")
    run(ws, back, 2, f"train.parallel={mode}", *long, style="explicit")
    assert results(back)["resumed_from_step"] == 300
    agree = agreement(back, ref, 400)
    print(f"agreement 1 process to 300, 2 processes ({mode}) to 400:", agree)
    assert agree["param"] < 1e-4, agree


def test_process_index_before_jax():
    argv = ["train.parallel=data", "train.distributed=true"]
    assert process_index_hint(argv, {"SLURM_PROCID": "3"}) == 3
    assert process_index_hint(argv, {"JAX_PROCESS_ID": "2", "SLURM_PROCID": "3"}) == 2
    assert process_index_hint(argv + ["train.process_id=1"], {"SLURM_PROCID": "3"}) == 1
    assert process_index_hint(["train.parallel=data"], {"SLURM_PROCID": "3"}) == 0
    assert process_index_hint(argv, {}) == 0
