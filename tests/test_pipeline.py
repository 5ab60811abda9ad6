"""The whole pipeline on a tiny model (issue 4): train -> results.json, TensorBoard,
metrics.jsonl and checkpoints; relpos-eval reproduces the numbers from the checkpoint;
a two-scheme multirun feeds relpos-plot; an interrupted run resumes to the same end;
the evaluation protocol agrees with direct computations.

The CLI is run as subprocesses (the console scripts next to ``sys.executable``) on a
generated text corpus, on CPU, sharing one persistent JAX compilation cache per session.
Bad-input behaviour is in ``test_cli_errors.py``; faults (kill -9, signals, NaN,
corrupt checkpoints) in ``test_reliability.py``.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir

from relpos import evaluate as eval_lib
from relpos import train as train_lib
from relpos.config import config_dir, register_schemas

register_schemas()

RESULT_KEYS = {"bias", "train_length", "seed", "tokenizer", "dataset", "params", "train_tokens",
               "train_seconds", "train_tokens_per_second", "eval", "optim", "label"}
EVAL_KEYS = {"length", "mode", "loss", "ppl", "bits_per_token", "tokens"}


# ----------------------------------------------------------------------------- helpers


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


class Workspace:
    """A corpus, a token cache and the tiny-model overrides every run here shares."""

    def __init__(self, root: Path, base: Path):
        self.root = root
        self.corpus = write_corpus(root / "corpus.txt")
        self.env = cli_env(base)
        self.args = [
            "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
            "train.length=16", "train.batch_size=8", "train.progress=false",
            "optim.warmup_steps=5", "data=text_files", f"data.paths=[{self.corpus}]",
            f"data.cache_dir={base / 'data-cache'}",
            "eval.multiples=[1,2]", "eval.tokens=512", "eval.batch_tokens=256",
        ]

    def run(self, cmd: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(cli_argv(cmd) + list(args), capture_output=True, text=True,
                              cwd=self.root, env=self.env, timeout=timeout)

    def train(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("train", *self.args, *args, **kw)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("pipeline"), tmp_path_factory.getbasetemp())


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


# ----------------------------------------------------------------------------- end to end


def test_train_writes_every_output_and_eval_reproduces_it(ws):
    run = ws.root / "run"
    r = ws.train("train.steps=30", "train.log_every=10", "train.checkpoint_every=15",
                 f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr

    res = json.loads((run / "results.json").read_text())
    assert RESULT_KEYS <= set(res)
    assert (res["bias"], res["train_length"], res["seed"]) == ("alibi", 16, 0)
    assert (res["tokenizer"], res["dataset"]) == ("bytes", "text_files")
    assert res["label"] == "alibi" and res["optim"]["position_lr_scale"] == 1.0
    assert isinstance(res["params"], int) and res["params"] > 0
    assert res["train_tokens"] == 30 * 8 * 16
    assert res["train_seconds"] > 0 and res["train_tokens_per_second"] > 0
    assert {(e["mode"], e["length"]) for e in res["eval"]} == {
        (m, L) for m in ("nonoverlap", "sliding") for L in (16, 32)}
    for e in res["eval"]:
        assert EVAL_KEYS <= set(e)
        assert math.isfinite(e["loss"])
        assert e["ppl"] == math.exp(e["loss"])
        assert e["bits_per_token"] == e["loss"] / math.log(2)
    for mode in ("nonoverlap", "sliding"):  # the same targets at every length
        assert {e["tokens"] for e in res["eval"] if e["mode"] == mode} == {512}

    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"loss", "grad_norm", "lr"} <= set(acc.Tags()["scalars"])
    assert [ev.step for ev in acc.Scalars("loss")] == [10, 15, 20, 30]  # logs + checkpoints

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train_rows] == [10, 15, 20, 30]
    assert all(math.isfinite(row["loss"]) and row["grad_norm"] > 0 for row in train_rows)
    assert res["final_train_loss"] == train_rows[-1]["loss"]
    assert any(k.startswith("eval_sliding/ppl_L32") for row in rows for k in row)

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["15", "30"]
    assert (run / "relpos_config.yaml").exists() and (run / "bias_profile.json").exists()

    r = ws.run("eval", f"run_dir={run}", "eval.multiples=[1,2]", "eval.tokens=512",
               "eval.batch_tokens=256")
    assert r.returncode == 0, r.stderr
    again = json.loads((run / "eval_results.json").read_text())
    assert again["checkpoint_step"] == 30
    want, got = eval_by_key(res), eval_by_key(again)
    assert got.keys() == want.keys()
    for key in want:  # same checkpoint, same windows, same compiled shapes: bitwise
        for field in ("loss", "ppl", "bits_per_token", "tokens", "position_loss"):
            assert got[key][field] == want[key][field], (key, field)


def test_multirun_two_schemes_then_plot(ws):
    sweep, figs = ws.root / "sweep", ws.root / "figs"
    r = ws.run("train", "-m", *ws.args, "bias=alibi,none", "train.steps=10",
               "train.log_every=5", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    found = sorted(sweep.rglob("results.json"))
    assert len(found) == 2
    assert {json.loads(p.read_text())["bias"] for p in found} == {"alibi", "none"}

    r = ws.run("plot", f"inputs=[{sweep}]", f"out_dir={figs}")
    assert r.returncode == 0, r.stderr
    for name in ("ppl_vs_length", "position_loss", "offset_counts", "bias_profiles",
                 "bias_heatmap_alibi"):
        assert (figs / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (figs / "table.md").read_text()
    assert "alibi" in table and "none" in table
    assert not [p for p in figs.iterdir() if p.name.startswith(".")]  # no temp files left


# ----------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_to_the_same_end(ws, monkeypatch):
    """Library level: SIGTERM right after the step-10 checkpoint stops the run (a
    checkpoint at the stop step), a second call resumes; the end equals an
    uninterrupted run bit for bit. Subprocess variants are in test_reliability.py."""
    overrides = ws.args + ["train.steps=24", "train.log_every=4", "train.checkpoint_every=10",
                           "eval.modes=[nonoverlap]"]
    cfg = compose_train(overrides)
    whole, parts = ws.root / "whole", ws.root / "parts"
    ref = train_lib.train(cfg, whole)

    save = train_lib.Checkpoints.save

    def save_then_signal(self, step, state, meta):
        save(self, step, state, meta)
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_lib.Checkpoints, "save", save_then_signal)
    with pytest.raises(train_lib.Preempted) as stop:
        train_lib.train(cfg, parts)
    assert stop.value.signum == signal.SIGTERM and 10 < stop.value.step < 24
    assert str(parts) in str(stop.value)
    assert (parts / "checkpoints" / str(stop.value.step)).is_dir()
    assert not (parts / "results.json").exists()
    monkeypatch.setattr(train_lib.Checkpoints, "save", save)

    out = train_lib.train(cfg, parts)
    assert out["final_train_loss"] == ref["final_train_loss"]
    assert [e["loss"] for e in out["eval"]] == [e["loss"] for e in ref["eval"]]
    assert_trees_equal(restore_state(parts, 24), restore_state(whole, 24))


def test_steps_per_call_trains_like_one_step_per_call(ws):
    """train.steps_per_call=4: the same logged steps (4, 8, 12 and the 2-step tail to 14),
    losses, evaluation and final parameters as one step per call (to fp32 rounding: the
    scan body is compiled separately from the single step)."""
    base = ws.args + ["train.steps=14", "train.log_every=4", "train.checkpoint_every=8",
                      "eval.modes=[nonoverlap]"]
    runs = {}
    for k in (1, 4):
        out = train_lib.train(compose_train(base + [f"train.steps_per_call={k}"]),
                              ws.root / f"k{k}")
        runs[k] = (out, loss_rows(ws.root / f"k{k}"), restore_state(ws.root / f"k{k}", 14))
    (ref, ref_rows, ref_state), (got, got_rows, got_state) = runs[1], runs[4]
    assert [r["step"] for r in got_rows] == [r["step"] for r in ref_rows] == [4, 8, 12, 14]
    np.testing.assert_allclose([r["loss"] for r in got_rows], [r["loss"] for r in ref_rows],
                               rtol=1e-5)
    np.testing.assert_allclose([r["lr"] for r in got_rows], [r["lr"] for r in ref_rows])
    np.testing.assert_allclose([e["loss"] for e in got["eval"]], [e["loss"] for e in ref["eval"]],
                               rtol=1e-5)
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(got_state["params"])])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(ref_state["params"])])
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5


def test_resume_between_call_boundaries(ws, monkeypatch):
    """A run stopped at step 11 (one step per call) resumes with 2 steps per call: one
    1-step call to the boundary at 12, then 2-step calls; it ends where an uninterrupted
    2-steps-per-call run ends (to fp32 rounding: different compiled call lengths)."""
    base = ws.args + ["train.steps=16", "train.log_every=4", "train.checkpoint_every=10",
                      "eval.modes=[nonoverlap]"]
    ref = train_lib.train(compose_train(base + ["train.steps_per_call=2"]), ws.root / "k2")
    save = train_lib.Checkpoints.save

    def save_then_signal(self, step, state, meta):
        save(self, step, state, meta)
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    parts = ws.root / "k1_then_k2"
    monkeypatch.setattr(train_lib.Checkpoints, "save", save_then_signal)
    with pytest.raises(train_lib.Preempted) as stop:
        train_lib.train(compose_train(base + ["train.steps_per_call=1"]), parts)
    assert stop.value.step == 11
    monkeypatch.setattr(train_lib.Checkpoints, "save", save)
    out = train_lib.train(compose_train(base + ["train.steps_per_call=2"]), parts)
    rows = {r["step"]: r for r in loss_rows(parts)}
    ref_rows = {r["step"]: r for r in loss_rows(ws.root / "k2")}
    assert sorted(rows) == [4, 8, 10, 11, 12, 16] and sorted(ref_rows) == [4, 8, 10, 12, 16]
    np.testing.assert_allclose([rows[s]["loss"] for s in (12, 16)],
                               [ref_rows[s]["loss"] for s in (12, 16)], rtol=1e-5)
    np.testing.assert_allclose([e["loss"] for e in out["eval"]], [e["loss"] for e in ref["eval"]],
                               rtol=1e-5)
    assert out["train_seconds"] > 0 and out["train_tokens_per_second"] > 0


# ----------------------------------------------------------------------------- protocol


@pytest.fixture(scope="module")
def oracle(ws):
    """An untrained tiny model, random validation tokens, and evaluate()'s results for
    both modes at lengths 16 and 32 (LM head in chunks of 8 positions)."""
    cfg = compose_train(ws.args + ["eval.loss_chunk=8", "bias=alibi"])
    model = train_lib.build_model(cfg, vocab_size=257)
    val = np.random.default_rng(0).integers(0, 257, size=3000).astype(np.uint16)
    got = eval_by_key({"eval": eval_lib.evaluate(model, val, train_length=16, ecfg=cfg.eval)})
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(windows):  # [W, L+1] -> [W, L]: the model's logits, optax's cross-entropy
        logits = nnx.merge(graphdef, state)(windows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])

    def nll_of(windows: np.ndarray) -> np.ndarray:
        return np.asarray(nll(jnp.asarray(windows, jnp.int32)), np.float64)

    return got, nll_of, val, model, cfg


def test_nonoverlap_loss_equals_direct_computation(oracle):
    got, nll_of, val, *_ = oracle
    for L in (16, 32):
        starts = np.arange(0, 512, L)  # the first 512 targets, consecutive windows
        want = nll_of(val[starts[:, None] + np.arange(L + 1)]).mean()
        e = got[("nonoverlap", L)]
        assert e["tokens"] == 512 and e["windows"] == len(starts)
        np.testing.assert_allclose(e["loss"], want, rtol=1e-5)


def test_quick_val_loss_is_the_nonoverlap_loss_and_compiles_once(oracle):
    got, _, val, model, cfg = oracle
    eval_lib.make_nll_fn.cache_clear()
    for _ in range(2):  # as at two train.eval_every steps: the second reuses the function
        loss = eval_lib.quick_val_loss(model, val, 16, cfg.eval)
        np.testing.assert_allclose(loss, got[("nonoverlap", 16)]["loss"], rtol=1e-6)
    info = eval_lib.make_nll_fn.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_sliding_loss_equals_per_target_oracle(oracle):
    """Each target t in [C+1, C+E] (C: the context of the longest window) is scored
    once, by the window whose last S positions hold it, so it sees >= L - S tokens."""
    got, nll_of, val, *_ = oracle
    context = max(L - L // 2 for L in (16, 32))
    targets = np.arange(context + 1, context + 512 + 1)
    for L in (16, 32):
        S = L // 2
        k = (targets - context - 1) // S
        starts = context - (L - S) + k * S
        pos = targets - 1 - starts
        assert (pos >= L - S).all() and (pos < L).all()
        uniq, inv = np.unique(starts, return_inverse=True)
        want = nll_of(val[uniq[:, None] + np.arange(L + 1)])[inv, pos].mean()
        e = got[("sliding", L)]
        assert e["tokens"] == 512 and e["stride"] == S
        np.testing.assert_allclose(e["loss"], want, rtol=1e-5)


class _Eval:
    def __init__(self, tokens, stride=0):
        self.tokens, self.stride = tokens, stride


@pytest.mark.parametrize("mode", ["nonoverlap", "sliding"])
@pytest.mark.parametrize("n_val,lengths,tokens,stride", [
    (3000, [16, 32, 64], 512, 0),      # power-of-two multiples, tokens fit
    (3000, [16, 32, 64], 100, 0),      # tokens not a multiple of the lengths
    (200, [16, 32, 64], 10_000, 0),    # tokens beyond the split: windows clamped at the end
    (1000, [24, 40, 100], 700, 0),     # lengths that do not divide one another
    (1000, [16, 48], 333, 5),          # explicit stride
    (130, [64, 128], 10_000, 0),       # the longest window barely fits
])
def test_window_plan_scores_every_target_once(mode, n_val, lengths, tokens, stride):
    ecfg = _Eval(tokens, stride)
    try:
        plan, e = eval_lib.window_plan(n_val, lengths, mode, ecfg)
    except eval_lib.RelposError:
        assert mode == "sliding"  # no room for context + a target: a clear error is right
        return
    assert e >= 1
    offsets = {plan[L][2] for L in lengths}
    assert len(offsets) == 1
    offset = offsets.pop()
    want = np.arange(offset + 1, offset + e + 1)
    for L in lengths:
        starts, first, _ = plan[L]
        assert (starts >= 0).all() and (starts + L + 1 <= n_val).all()  # inside the split
        scored = []
        for s, f in zip(starts, first):
            p = np.arange(f, L)
            t = s + p + 1
            keep = t < offset + e + 1
            scored.append(t[keep])
            if mode == "sliding":
                step = stride or L // 2
                assert (p[keep] >= L - min(step, L)).all()  # context >= L - S
        scored = np.sort(np.concatenate(scored))
        np.testing.assert_array_equal(scored, want, err_msg=f"L={L}")
