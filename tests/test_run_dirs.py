"""Run directories of any name a user or Hydra can produce: they save, resume and
re-evaluate; a checkpoint that cannot be read back fails the save; no message advises
deleting trained weights."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compose_train

from relpos import runs
from relpos.errors import RelposError
from relpos.training.checkpoint import Checkpoints

# Hydra's multirun job folders are named by their overrides, e.g. eval.multiples=[1,2].
NAMES = ["bias=alibi,eval.multiples=[1,2],seed=0", "a b'c", "x[1]*?{y}"]


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_in_any_folder_name_read_back(tmp_path, name):
    ckpt = Checkpoints(tmp_path / name / "checkpoints", keep=2)
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "guard": {"n": jnp.int32(3)}}
    for step in (1, 2, 3):
        ckpt.save(step, state, {"step": step})
    step, back, meta = ckpt.restore_latest(state)
    assert (step, meta) == (3, {"step": 3})
    np.testing.assert_array_equal(back["params"]["w"], state["params"]["w"])
    step, params = ckpt.restore_params(state["params"])  # no optimiser state needed
    np.testing.assert_array_equal(params["w"], state["params"]["w"])
    ckpt.close()


def test_a_checkpoint_that_does_not_read_back_fails_at_save(tmp_path, monkeypatch):
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=2)
    state = {"w": jnp.ones(3)}

    def unreadable(*args, **kwargs):
        raise ValueError("NOT_FOUND: metadata missing")

    monkeypatch.setattr(ckpt, "_restore", unreadable)
    with pytest.raises(RelposError, match="checkpoint 7 .* cannot be read back"):
        ckpt.save(7, state, {})
    monkeypatch.undo()
    monkeypatch.setattr(ckpt, "_restore", lambda step, st, **kw: {"state": {"w": st["w"] + 1}})
    with pytest.raises(RelposError, match="reads back different values"):
        ckpt.save(8, state, {})
    ckpt.close()


def test_no_readable_checkpoint_keeps_the_folders_and_never_says_delete(tmp_path):
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=2)
    ckpt.save(1, {"w": jnp.ones(3)}, {})
    with pytest.raises(RelposError) as err:
        ckpt.restore_latest({"v": jnp.ones(2)})  # another structure: unreadable as asked
    ckpt.close()
    assert "delete" not in str(err.value).lower()
    assert (tmp_path / "checkpoints" / "1").is_dir()


def test_multirun_job_folder_trains_resumes_and_reevaluates_from_the_cli(ws):
    steps = ["bias=alibi", "train.steps=20", "train.log_every=10", "train.checkpoint_every=10"]
    whole = runs.train(compose_train(ws.args + steps), ws.root / "whole")
    job = ws.root / "multirun" / "bias=alibi,eval.multiples=[1,2],seed=0"
    first = ws.train(*steps, f"hydra.run.dir={job}")
    assert first.returncode == 0, first.stderr
    shutil.rmtree(job / "checkpoints" / "20")  # as if stopped after step 10's checkpoint
    (job / "results.json").unlink()
    again = ws.train(*steps, f"hydra.run.dir={job}")
    assert again.returncode == 0, again.stderr
    assert "resumed from step 10" in again.stderr  # on the console, not only in train.log
    res = json.loads((job / "results.json").read_text())
    assert res["resumed_from_step"] == 10
    assert [e["loss"] for e in res["eval"]] == [e["loss"] for e in whole["eval"]]
    # as the README writes it: run_dir=<folder>, no extra quoting
    r = ws.run("eval", f"run_dir={job}", "eval.multiples=[1]", "eval.tokens=256")
    assert r.returncode == 0, r.stderr
    assert json.loads((job / "eval_results.json").read_text())["checkpoint_step"] == 20


def test_sweep_job_folder_names_fit_one_path_component(tmp_path):
    """A sweep with many overrides names its jobs within NAME_MAX bytes: cut, with a
    hash of the whole name, so two jobs that differ only past the cut stay apart (a
    255+ byte name failed the whole sweep with 'File name too long')."""
    from relpos.config import NAME_MAX, sweep_subdir

    short = "bias=alibi,seed=0"
    assert sweep_subdir(short) == short
    common = ",".join(f"model.option_{i}={i}" for i in range(40))
    a, b = sweep_subdir(f"{common},seed=0"), sweep_subdir(f"{common},seed=1")
    assert a != b and a[:200] == b[:200] and a == sweep_subdir(f"{common},seed=0")
    wide = sweep_subdir("é" * 300)  # two bytes each: the cut never splits a character
    for name in (a, b, wide):
        assert len(name.encode()) <= NAME_MAX
        (tmp_path / name).mkdir()
    assert len(a.encode()) == NAME_MAX and a.startswith("model.option_0=0,")
