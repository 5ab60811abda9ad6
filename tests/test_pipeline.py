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
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import (
    assert_trees_equal,
    compose_train,
    eval_by_key,
    loss_rows,
    restore_state,
    sigterm_after_checkpoint,
)

from relpos import evaluation as eval_lib
from relpos import runs as train_lib
from relpos.config import build_model, register_schemas
from relpos.errors import RelposError
from relpos.training.loop import Preempted

register_schemas()

RESULT_KEYS = {"bias", "train_length", "seed", "tokenizer", "dataset", "params", "train_tokens",
               "train_seconds", "train_tokens_per_second", "eval", "optim", "label"}
EVAL_KEYS = {"length", "mode", "loss", "ppl", "bits_per_token", "tokens"}


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
    saved = json.loads((run / "bias_profile.json").read_text())
    assert again["bias_profile"]["at_max"] == saved["at_max"]  # no overrides: the same scheme
    assert again["attention_far_mass"][0]["length"] == 32 and res["attention_far_mass"]
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
    for name in ("ppl_vs_length", "position_loss", "bias_profiles", "bias_heatmap_alibi"):
        assert (figs / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (figs / "offset_counts.png").exists()  # neither run trained a table
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

    with sigterm_after_checkpoint(monkeypatch, 10), pytest.raises(Preempted) as stop:
        train_lib.train(cfg, parts)
    assert stop.value.signum == signal.SIGTERM and 10 < stop.value.step < 24
    assert str(parts) in str(stop.value)
    assert (parts / "checkpoints" / str(stop.value.step)).is_dir()
    assert not (parts / "results.json").exists()

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


@pytest.mark.slow  # ~13 s; resume and steps_per_call are each checked in the default suite
def test_resume_between_call_boundaries(ws, monkeypatch):
    """A run stopped at step 11 (one step per call) resumes with 2 steps per call: one
    1-step call to the boundary at 12, then 2-step calls; it ends where an uninterrupted
    2-steps-per-call run ends (to fp32 rounding: different compiled call lengths)."""
    base = ws.args + ["train.steps=16", "train.log_every=4", "train.checkpoint_every=10",
                      "eval.modes=[nonoverlap]"]
    ref = train_lib.train(compose_train(base + ["train.steps_per_call=2"]), ws.root / "k2")
    parts = ws.root / "k1_then_k2"
    with sigterm_after_checkpoint(monkeypatch, 10), pytest.raises(Preempted) as stop:
        train_lib.train(compose_train(base + ["train.steps_per_call=1"]), parts)
    assert stop.value.step == 11
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
    model = build_model(cfg, vocab_size=257)
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


def oracle_blocks(val, cfg) -> tuple[np.ndarray, int]:
    """The target blocks evaluate() scores: eval.tokens=512 over a longest length of 32
    is 16 blocks of 32 consecutive targets (block b: targets b+1 .. b+32), disjoint and
    inside the split, each with room for the longest sliding context (16) before it."""
    blocks, size = eval_lib.target_blocks(val.size, [16, 32], cfg.eval)
    assert (len(blocks), size) == (16, 32)
    assert blocks[0] >= 16 and (np.diff(blocks) >= size).all() and blocks[-1] + size < val.size
    return blocks, size


def test_nonoverlap_loss_equals_direct_computation(oracle):
    """Each target block cut into consecutive windows of L (32 is a multiple of 16 and
    32, so no window is moved back): evaluate()'s loss is the mean NLL over them."""
    got, nll_of, val, _, cfg = oracle
    blocks, size = oracle_blocks(val, cfg)
    for L in (16, 32):
        starts = (blocks[:, None] + np.arange(0, size, L)[None, :]).ravel()
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
    """Each target t of a block starting at b (t in [b+1, b+32]) is scored once, by the
    window whose last S positions hold it, so it sees >= L - S tokens."""
    got, nll_of, val, _, cfg = oracle
    blocks, size = oracle_blocks(val, cfg)
    block = np.repeat(blocks, size)
    targets = block + np.tile(np.arange(1, size + 1), len(blocks))
    for L in (16, 32):
        S = L // 2
        k = (targets - block - 1) // S
        starts = block - (L - S) + k * S
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
    (200, [16, 32, 64], 10_000, 0),    # tokens beyond the split: as many blocks as fit
    (1000, [24, 40, 100], 700, 0),     # lengths that do not divide one another
    (1000, [16, 48], 333, 5),          # explicit stride
    (193, [64, 128], 10_000, 0),       # one block and its sliding context exactly fit
])
def test_window_plan_scores_every_target_once(mode, n_val, lengths, tokens, stride):
    """ceil(tokens / longest) blocks of the longest length (fewer if the split has no
    room for more), each after room for the longest sliding context; every length's
    windows stay inside the split and score each target of the blocks exactly once, in
    a window of its own block (sliding: with >= L - S tokens of context)."""
    ecfg = _Eval(tokens, stride)
    size = max(lengths)
    context = max(L - min(stride or L // 2, L) for L in lengths)
    blocks, got_size = eval_lib.target_blocks(n_val, lengths, ecfg)
    assert got_size == size
    assert len(blocks) == min(-(-tokens // size), (n_val - 1 - context) // size) >= 1
    assert blocks[0] >= context and (np.diff(blocks) >= size).all()
    assert blocks[-1] + size <= n_val - 1
    want = np.concatenate([np.arange(b + 1, b + size + 1) for b in blocks])
    plan = eval_lib.window_plan(n_val, lengths, mode, ecfg)
    assert sorted(plan) == sorted(lengths)
    for L in lengths:
        w = plan[L]
        assert (w.starts >= 0).all() and (w.starts + L + 1 <= n_val).all()  # inside the split
        scored = []
        for s, f, stop, b in zip(w.starts, w.first, w.stop, w.block):
            p = np.arange(f, L)
            t = s + p + 1
            keep = t < stop
            assert (t[keep] > blocks[b]).all() and (t[keep] <= blocks[b] + size).all()
            scored.append(t[keep])
            if mode == "sliding":
                step = stride or L // 2
                assert (p[keep] >= L - min(step, L)).all()  # context >= L - S
        scored = np.sort(np.concatenate(scored))
        np.testing.assert_array_equal(scored, want, err_msg=f"L={L}")


@pytest.mark.parametrize("mode", ["nonoverlap", "sliding"])
@pytest.mark.parametrize("n_val", [2, 65, 130, 192])
def test_window_plan_refuses_a_split_too_short_for_one_block(mode, n_val):
    """Windows of 64 and 128 need one block of 128 targets after 64 tokens of sliding
    context (both modes score the same targets): 193 tokens. A shorter split is a clear
    error naming its size, not an empty or out-of-range plan."""
    with pytest.raises(RelposError, match=rf"validation split \({n_val} tokens\) is too short "
                                          r"for windows of length 128 with 64 tokens of "
                                          r"sliding context"):
        eval_lib.window_plan(n_val, [64, 128], mode, _Eval(10_000))
