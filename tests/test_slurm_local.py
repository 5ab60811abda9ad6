"""The SLURM launcher path, run locally (issue 20): Hydra's ``submitit_local`` launcher
(hydra-submitit-launcher's local executor, the same plugin code as ``submitit_slurm``)
runs a two-job multirun sweep; one job gets SIGUSR2, which SLURM sends ahead of a time
limit (``--signal``) and submitit uses to requeue. relpos checkpoints the current step
(not the last ``train.checkpoint_every`` multiple), hands over to submitit's handler,
which requeues the job; the requeued job resumes from that step and ends bit for bit
where the same run without a launcher ends. Needs ``pip install -e ".[slurm]"``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import assert_trees_equal, cli_argv, restore_state

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

STEPS = 600
RUN_ARGS = [f"train.steps={STEPS}", "train.checkpoint_every=200", "train.log_every=50",
            "train.steps_per_call=1", "eval.modes=[nonoverlap]"]


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def has_checkpoint(job_dir: Path) -> bool:
    return any(p.name.isdigit() for p in (job_dir / "checkpoints").glob("*"))


@pytest.mark.slow
def test_submitit_local_sweep_requeues_on_sigusr2_and_resumes_bitwise(ws, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = cli_argv("train") + ["-m", "hydra/launcher=submitit_local",
                               "hydra.launcher.timeout_min=30", f"hydra.sweep.dir={sweep}",
                               "hydra.sweep.subdir=${hydra.job.num}", *ws.args, *RUN_ARGS,
                               "bias=alibi,none"]
    sweep_proc = subprocess.Popen(cmd, cwd=ws.root, env=ws.env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # both jobs training (a checkpoint each), then SIGUSR2 to job 0's task, as SLURM
    # signals a job's tasks ahead of its time limit
    deadline = time.monotonic() + 600
    while not all(has_checkpoint(sweep / str(k)) for k in (0, 1)):
        assert sweep_proc.poll() is None, sweep_proc.communicate()
        assert time.monotonic() < deadline, "no checkpoints appeared"
        time.sleep(0.1)
    jobs = sorted((sweep / ".submitit").glob("[0-9]*"), key=lambda p: p.stat().st_mtime)
    tasks = {}
    for folder in jobs:  # the folder is named by the job id, its controller's pid
        for kid in children(int(folder.name)):
            tasks[folder.name] = kid
    assert tasks, list(jobs)
    job, task = next(iter(tasks.items()))
    os.kill(task, signal.SIGUSR2)
    out, err = sweep_proc.communicate(timeout=1200)
    assert sweep_proc.returncode == 0, err[-3000:]

    log = "\n".join(p.read_text() for p in (sweep / ".submitit" / job).glob("*_log.*"))
    stops = [int(x) for x in re.findall(r"stopped by SIGUSR2 at step (\d+)", log)]
    assert len(stops) == 1 and "Requeued job" in log, log[-3000:]
    resumed = {k: json.loads((sweep / str(k) / "results.json").read_text()) for k in (0, 1)}
    stopped = [k for k, r in resumed.items() if r["resumed_from_step"]]
    assert len(stopped) == 1, resumed
    res = resumed[stopped[0]]
    # the checkpoint of the step it stopped at: no step computed twice
    assert res["resumed_from_step"] == stops[0]
    print(f"job {job}: stopped by SIGUSR2 at step {stops[0]}, requeued, resumed from "
          f"{res['resumed_from_step']}")

    # bit for bit the same run without a launcher
    ref = tmp_path / "reference"
    r = subprocess.run(cli_argv("train") + [*ws.args, *RUN_ARGS, f"bias={res['bias']}",
                                            f"hydra.run.dir={ref}"],
                       cwd=ws.root, env=ws.env, text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    want = json.loads((ref / "results.json").read_text())
    assert res["final_train_loss"] == want["final_train_loss"]
    assert [e["loss"] for e in res["eval"]] == [e["loss"] for e in want["eval"]]
    assert_trees_equal(restore_state(sweep / str(stopped[0]), STEPS), restore_state(ref, STEPS))
