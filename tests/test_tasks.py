"""Length-generalization tasks (issue 18): every generator against a plain-Python oracle
of its task, deterministic batches, the answer-only loss, an untrained model at chance,
bitwise resume in the middle of a task run, relpos-eval on it, the LM's passkey
evaluation, the accuracy figure, and one-line errors. The slow test trains a tiny model
to copy."""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess

import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_equal,
    cli_argv,
    compose_train,
    restore_state,
    sigterm_after_checkpoint,
    write_corpus,
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from relpos import evaluation, plots, tasks
from relpos import runs as train_lib
from relpos.config import build_model, load_saved_config
from relpos.errors import RelposConfigError, RelposError
from relpos.io import config_dir
from relpos.tasks.passkey import QUESTION
from relpos.training.loop import Preempted
from relpos.training.step import WeightedTokens, lm_loss

SOURCE = np.frombuffer(("".join(f"line {i}: some filler text.\n" for i in range(400)))
                       .encode(), np.uint8).astype(np.uint16)  # a corpus split, as bytes
TASK_OPTIONS = {"selective_copy": {"copies": 4}}


def build(name: str):
    return tasks.build(name, **TASK_OPTIONS.get(name, {}))


# ----------------------------------------------------------------------------- oracles
# Each oracle reads only the prompt (the tokens before the answer, as a plain list) and
# returns {position: expected token} for every answer position.


def copy_oracle(toks):
    sep = toks.index(tasks.SEP)
    assert toks[0] == tasks.BOS and sep >= 2
    return {sep + 1 + i: x for i, x in enumerate(toks[1:sep])}


def reverse_oracle(toks):
    sep = toks.index(tasks.SEP)
    return {sep + 1 + i: x for i, x in enumerate(reversed(toks[1:sep]))}


def assoc_recall_oracle(toks, gap_id=None):
    sep = toks.index(tasks.SEP)
    pairs = toks[1:sep]
    if gap_id is not None:  # task.pairs: k pairs, then a gap of gap_id up to SEP
        k = pairs.index(gap_id) if gap_id in pairs else len(pairs)
        assert 2 <= k <= 2 * ASSOC_PAIRS and set(pairs[k:]) <= {gap_id}
        pairs = pairs[:k]
    table = dict(zip(pairs[0::2], pairs[1::2]))
    assert len(table) == len(pairs) // 2  # distinct keys
    queries = toks[sep + 1::2]
    assert len(queries) == len(table) and set(queries) <= set(table)  # n queries of its keys
    return {sep + 2 + 2 * i: table[q] for i, q in enumerate(queries)}


def assoc_queries(task, size=7, examples=2000):
    """The query keys of ``examples`` instances of ``size`` pairs, as ranks in the list."""
    out = []
    for i in range(examples):
        toks = list(map(int, task.make(np.random.default_rng(i), size, None).tokens))
        keys = toks[1:2 * size + 1:2]
        out.append([keys.index(q) for q in toks[2 * size + 2::2]])
    return np.array(out)


def test_assoc_recall_queries_each_asks_every_key_once():
    ranks = assoc_queries(tasks.build("assoc_recall", queries="each"))
    assert all(sorted(r) == list(range(7)) for r in ranks)


def test_assoc_recall_random_queries_leave_nothing_to_eliminate():
    """``queries=random`` (the default): each query an independent uniform draw from
    the sequence's keys, so the keys asked before say nothing about the next one."""
    assert tasks.build("assoc_recall").queries == "random"
    ranks = assoc_queries(tasks.build("assoc_recall"))
    distinct = np.array([len(set(r)) for r in ranks])
    assert abs(distinct.mean() - 7 * (1 - (6 / 7) ** 7)) < 0.1  # 4.71 keys asked of 7
    assert (distinct == 7).mean() < 0.02  # all 7 once: 7!/7^7 = 0.006
    # every query position asks every key rank about equally often (1/7 each)
    freq = np.stack([(ranks == k).mean(0) for k in range(7)])
    assert np.abs(freq - 1 / 7).max() < 0.03
    # the last query's key was asked before about as often as independence predicts
    seen = np.array([r[-1] in r[:-1] for r in ranks]).mean()
    assert abs(seen - (1 - (6 / 7) ** 6)) < 0.04  # 0.60


def test_assoc_recall_bounded_pairs_puts_the_gap_between_list_and_queries():
    """``task.pairs=k``: an instance holds 1..k pairs (uniform) at every length; the gap
    grows with the length, so a test sequence at 8x asks for keys about 8x farther away
    with the same mix of list sizes, not with 8x as many pairs; the gap's token is one id
    past the values."""
    task = tasks.build("assoc_recall", keys=64, pairs=4)
    assert task.vocab_size == 3 + 64 + 16 + 1 and task.sizes(32) == (0, 15)
    for length in (32, 256):
        counts = np.zeros(5)
        for inst in tasks.test_instances(task, length=length, examples=400):
            toks = list(map(int, inst.tokens))
            n = (len(toks) - (length - 17) - 2) // 4  # every test gap is the largest
            counts[n] += 1
            assert toks[1 + 2 * n:toks.index(tasks.SEP)] == [task.gap_id] * (length - 17)
            keys = toks[1:1 + 2 * n:2]
            for q in np.flatnonzero(inst.answer) - 1:  # each query: its key's distance
                assert q - (1 + 2 * keys.index(toks[q])) >= length - 17 + 2
        assert counts[0] == 0 and counts[1:].min() > 70  # 1..4 pairs, 100 each expected
    assert tasks.build("assoc_recall").vocab_size == 3 + 512 + 16  # pairs=0: as before
    with pytest.raises(RelposConfigError, match="task.pairs=9 needs as many distinct keys"):
        tasks.build("assoc_recall", keys=8, pairs=9)


def test_saved_assoc_run_without_queries_reads_as_each(tmp_path):
    """A run saved before ``task.queries`` existed was trained with every key asked
    once: relpos-eval must regenerate that format, not the new default."""
    cfg = compose_train(["task=assoc_recall"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["task"]["queries"]
    path = tmp_path / "relpos_config.yaml"
    path.write_text(OmegaConf.to_yaml(saved))
    assert load_saved_config(path).task.queries == "each"
    assert train_lib.task_of(load_saved_config(path)).queries == "each"
    saved["task"]["queries"] = "random"
    path.write_text(OmegaConf.to_yaml(saved))
    assert load_saved_config(path).task.queries == "random"


def flipflop_oracle(toks):
    w, r, i, zero, one = 2, 3, 4, 5, 6
    assert toks[0] == tasks.BOS and toks[1] == w and toks[-2] == r
    memory, out = None, {}
    for pos in range(1, len(toks), 2):
        instr, bit = toks[pos], pos + 1
        assert instr in (w, r, i) and toks[bit] in (zero, one)
        if instr == w:
            memory = toks[bit]
        elif instr == r:
            out[bit] = memory
    return out


def selective_copy_oracle(toks):
    sep = toks.index(tasks.SEP)
    data = [t for t in toks[1:sep] if t != 3]
    assert len(data) == 4
    return {sep + 1 + i: x for i, x in enumerate(data)}


def passkey_oracle(toks):
    text = bytes(t for t in toks if t < 256).decode("ascii")
    m = re.search(r" The pass key is (\d+)\. Remember it\. \1 is the pass key\. ", text)
    assert m and text.endswith(QUESTION + m.group(1)), text[-80:]
    filler = text[:m.start()] + text[m.end():-len(QUESTION) - len(m.group(1))]
    assert filler.encode() in SOURCE.astype(np.uint8).tobytes()  # a window of the split
    start = len(toks) - len(m.group(1))
    return {start + i: ord(c) for i, c in enumerate(m.group(1))}


ASSOC_PAIRS = 3  # assoc_recall with a fixed number of pairs and a gap (task.pairs)
ORACLES = {"copy": copy_oracle, "reverse": reverse_oracle,
           "assoc_recall": assoc_recall_oracle, "flipflop": flipflop_oracle,
           "selective_copy": selective_copy_oracle, "passkey": passkey_oracle}
VARIANTS = {"assoc_recall (pairs)": ("assoc_recall", {"keys": 64, "pairs": ASSOC_PAIRS},
                                     functools.partial(assoc_recall_oracle, gap_id=3 + 64 + 16))}


def test_every_task_has_an_oracle():
    assert sorted(ORACLES) == tasks.available()


@pytest.mark.parametrize("name", sorted(ORACLES) + sorted(VARIANTS))
def test_generator_answers_match_the_oracle(name):
    """Training batches (sizes uniform up to the length, padded, weights on the answers)
    and test instances (the largest size that fits) agree with the task's oracle at
    every answer position, and nothing else carries a weight."""
    if name in VARIANTS:
        task_name, options, oracle = VARIANTS[name]
        task = tasks.build(task_name, **options)
    else:
        task, oracle = build(name), ORACLES[name]
    length = 128
    lo, hi = task.sizes(length)
    rows, sizes_seen = [], set()
    for step in range(40):
        tokens, weights = tasks.train_batch(task, seed=3, step=step, batch_size=8,
                                            length=length, source=SOURCE)
        assert tokens.shape == (8, length + 1) and weights.shape == (8, length)
        rows += [(list(map(int, t)), w) for t, w in zip(tokens, weights)]
    for inst in tasks.test_instances(task, length=length, examples=20, source=SOURCE):
        assert len(inst.tokens) <= length + 1
        w = np.zeros(length, np.float32)
        w[:len(inst.tokens) - 1] = inst.answer[1:]
        rows.append((list(map(int, inst.tokens)) + [task.pad_id] * (length + 1 - len(inst.tokens)),
                     w))
    for toks, w in rows:
        end = max(np.flatnonzero(w)) + 2  # the sequence ends with its last answer
        assert all(t == task.pad_id for t in toks[end:])
        want = oracle(toks[:end])
        assert sorted(want) == [int(i) + 1 for i in np.flatnonzero(w)]  # target t+1
        assert all(toks[p] == v for p, v in want.items())
        assert all(0 <= t < task.vocab_size for t in toks)
        sizes_seen.add(end)
    assert len(sizes_seen) > 5  # lengths vary across the batch


def test_training_sizes_are_uniform_up_to_the_length():
    task = tasks.build("copy")
    lo, hi = task.sizes(64)
    counts = np.zeros(hi + 1)
    for step in range(200):
        _, w = tasks.train_batch(task, seed=0, step=step, batch_size=16, length=64)
        np.add.at(counts, w.sum(1).astype(int), 1)
    assert (lo, hi) == (1, 31) and counts[0] == 0 and counts[lo:].min() > 0
    expected = 3200 / (hi - lo + 1)  # chi-square test of uniformity, 1e-3 false alarm
    stat = ((counts[lo:] - expected) ** 2 / expected).sum()
    assert stat < 61.1  # chi2(30).ppf(0.999)


def test_same_seed_and_step_give_the_same_batch():
    for name in tasks.available():
        task = build(name)
        a = tasks.train_batch(task, seed=1, step=7, batch_size=4, length=128, source=SOURCE)
        b = tasks.train_batch(task, seed=1, step=7, batch_size=4, length=128, source=SOURCE)
        c = tasks.train_batch(task, seed=1, step=8, batch_size=4, length=128, source=SOURCE)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not np.array_equal(a[0], c[0])
        # test sets: instance i depends on (length, i) only
        whole = tasks.test_instances(task, length=128, examples=6, source=SOURCE)
        part = tasks.test_instances(task, length=128, examples=3, start=3, source=SOURCE)
        assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(whole[3:], part))


def test_run_batches_are_the_tasks_and_multi_step_stacks_them():
    cfg = compose_train(["task=flipflop", "train.length=32", "train.batch_size=4"])
    task = train_lib.task_of(cfg)
    sample = train_lib.task_sampler(cfg, task, None)
    one = train_lib._batches(cfg, None, False, lambda x, p: (x, p), sample)
    many = train_lib._batches(cfg, None, True, lambda x, p: (x, p), sample)
    stacked, _ = many(5, 3)
    assert isinstance(stacked, WeightedTokens) and stacked.shape == (3, 4, 33)
    for k in range(3):
        batch, positions = one(5 + k, 1)
        ref = tasks.train_batch(task, seed=0, step=5 + k, batch_size=4, length=32)
        np.testing.assert_array_equal(batch.tokens, ref[0])
        np.testing.assert_array_equal(stacked.tokens[k], ref[0])
        np.testing.assert_array_equal(stacked.weights[k], ref[1])
    np.testing.assert_array_equal(positions, np.arange(32))


@pytest.mark.parametrize("name", ["copy", "reverse"])
def test_without_teacher_forcing_answer_inputs_are_blank(name):
    """teacher_forcing=false: the model reads the prompt as it is and the blank id at
    every answer position (one more vocabulary id); the targets and weights are those of
    the teacher-forced format, and the sampler hands the inputs to the loss."""
    forced = tasks.build(name, symbols=2)
    blank = tasks.build(name, symbols=2, teacher_forcing=False)
    assert (blank.vocab_size, blank.blank_id) == (forced.vocab_size + 1, 3 + 2)
    assert tasks.model_inputs(forced, *tasks.train_batch(
        forced, seed=0, step=1, batch_size=2, length=20)) is None
    tokens, weights = tasks.train_batch(blank, seed=0, step=1, batch_size=8, length=20)
    ref = tasks.train_batch(forced, seed=0, step=1, batch_size=8, length=20)
    np.testing.assert_array_equal(tokens, ref[0])
    np.testing.assert_array_equal(weights, ref[1])
    inputs = tasks.model_inputs(blank, tokens, weights)
    for row in range(8):
        toks = tokens[row].tolist()
        sep = toks.index(tasks.SEP)
        n = sep - 1  # symbols in the prompt; the answer fills positions sep+1 .. sep+n
        want = toks[:sep + 1] + [blank.blank_id] * n + toks[sep + 1 + n:-1]
        assert inputs[row].tolist() == want
    cfg = compose_train([f"task={name}", "task.symbols=2", "task.teacher_forcing=false",
                         "train.length=20", "train.batch_size=8"])
    batch = train_lib.task_sampler(cfg, train_lib.task_of(cfg), None)(1)
    np.testing.assert_array_equal(batch.inputs, inputs)


def test_without_teacher_forcing_no_answer_sees_another():
    """An answer token's prediction cannot depend on any answer token: changing the
    answers leaves the logits at every scored position unchanged (causal attention over
    a prompt and blanks only)."""
    cfg = compose_train(["task=reverse", "task.symbols=2", "task.teacher_forcing=false",
                         "model.d_model=32", "model.num_layers=2", "model.num_heads=2"])
    task = train_lib.task_of(cfg)
    model = build_model(cfg, task.vocab_size)
    tokens, weights = tasks.train_batch(task, seed=0, step=0, batch_size=4, length=24)
    other = np.where(np.concatenate([np.zeros((4, 1)), weights], 1) > 0,
                     7 - tokens, tokens)  # every answer bit flipped (ids 3 <-> 4)
    assert (other != tokens).any()
    a = np.asarray(model(tasks.model_inputs(task, tokens, weights), np.arange(24)))
    b = np.asarray(model(tasks.model_inputs(task, other, weights), np.arange(24)))
    np.testing.assert_array_equal(a[weights > 0], b[weights > 0])
    teacher = np.asarray(model(other[:, :-1], np.arange(24)))  # teacher forcing: they do
    assert not np.allclose(teacher[weights > 0], a[weights > 0])


# ----------------------------------------------------------------------------- loss


def test_task_loss_is_the_mean_over_answer_tokens():
    cfg = compose_train(["task=copy", "model.d_model=32", "model.num_layers=1",
                         "model.num_heads=2"])
    task = train_lib.task_of(cfg)
    model = build_model(cfg, task.vocab_size)
    tokens, weights = tasks.train_batch(task, seed=0, step=0, batch_size=4, length=16)
    got = lm_loss(model, WeightedTokens(tokens, weights), np.arange(16))
    nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
        model(tokens[:, :-1], np.arange(16)), tokens[:, 1:]), np.float64)
    np.testing.assert_allclose(float(got), (nll * weights).sum() / weights.sum(), rtol=1e-6)
    plain = lm_loss(model, tokens, np.arange(16))  # the LM's loss: every target
    np.testing.assert_allclose(float(plain), nll.mean(), rtol=1e-6)


# ----------------------------------------------------------------------------- chance


@pytest.mark.parametrize("name", ["copy", "assoc_recall", "flipflop"])
def test_an_untrained_model_scores_no_better_than_chance(name):
    """500 test sequences at 2x, untrained model. Per sequence the fraction of answer
    tokens right lies in [0, 1] and, for a model that has learnt nothing about the task,
    has mean at most ``chance`` (each answer is uniform over its alphabet given the
    rest of the task's structure); sequences are independent, so by Hoeffding the mean
    over N sequences exceeds chance + t with probability at most exp(-2 N t^2) = 1e-3.
    Exact match: the Wilson interval must reach down to chance ** answers (or below)."""
    cfg = compose_train([f"task={name}", "model.d_model=32", "model.num_layers=1",
                         "model.num_heads=2", "train.length=32"])
    task = train_lib.task_of(cfg)
    model = build_model(cfg, task.vocab_size)
    correct, total = evaluation.score_task_length(model, task, 64, examples=500,
                                                  batch_tokens=8192, chunk=64)
    n = len(correct)
    bound = math.sqrt(math.log(1e3) / (2 * n))
    assert (correct / total).mean() <= task.chance + bound
    entry = evaluation.tasks.summarize(64, correct, total, task, "task")
    assert entry["accuracy_ci"][0] <= task.chance ** total.min() + 1e-12


def test_wilson_interval_matches_the_formula():
    for k, n in ((0, 500), (250, 500), (499, 500), (7, 20)):
        p, z = k / n, 1.959963984540054
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        np.testing.assert_allclose(evaluation.wilson_interval(k, n),
                                   [centre - half, centre + half], rtol=1e-9,
                                   atol=1e-15)  # k = 0: the bound is 0 exactly


# ----------------------------------------------------------------------------- runs


TASK_RUN = ["task=assoc_recall", "task.keys=64", "train.steps=20", "train.log_every=5",
            "train.checkpoint_every=10", "eval.task_examples=50", "eval.task_multiples=[1,2]",
            "eval.progress=false"]


def test_task_run_resumes_bitwise_and_relpos_eval_reproduces_it(ws, monkeypatch):
    """A task run stopped by SIGTERM after its step-10 checkpoint and resumed ends
    exactly where an uninterrupted run ends (losses, parameters, accuracies); the
    results carry the task's keys; relpos-eval recomputes the same entries."""
    cfg = compose_train(ws.args + TASK_RUN)
    whole, parts = ws.root / "task_whole", ws.root / "task_parts"
    ref = train_lib.train(cfg, whole)
    with sigterm_after_checkpoint(monkeypatch, 10), pytest.raises(Preempted) as stop:
        train_lib.train(cfg, parts)
    assert 10 <= stop.value.step < 20
    out = train_lib.train(cfg, parts)
    assert out["resumed_from_step"] == stop.value.step
    assert out["final_train_loss"] == ref["final_train_loss"]
    assert out["eval"] == ref["eval"]
    assert_trees_equal(restore_state(parts, 20), restore_state(whole, 20))

    assert (ref["task"], ref["task_options"]) == ("assoc_recall", {"keys": 64, "values": 16,
                                                                  "queries": "random", "pairs": 0})
    assert ref["dataset"] is None and "attention_far_mass" not in ref
    assert [(e["length"], e["mode"], e["examples"]) for e in ref["eval"]] == \
        [(16, "task", 50), (32, "task", 50)]
    for e in ref["eval"]:
        assert {"accuracy", "token_accuracy", "accuracy_ci", "token_accuracy_ci", "examples",
                "chance", "size"} <= set(e)
        assert e["accuracy_ci"][0] <= e["accuracy"] <= e["accuracy_ci"][1]
    rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_task/accuracy_L32" in r for r in rows)  # TensorBoard / JSONL scalars

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        ecfg = compose("eval", overrides=[f"run_dir={whole}", "eval.task_examples=50",
                                          "eval.task_multiples=[1,2]", "eval.progress=false"])
    again = train_lib.evaluate_run(ecfg)
    assert again["eval"] == ref["eval"] and again["task"] == "assoc_recall"


def test_lm_passkey_evaluation(ws):
    """eval.passkey on a corpus LM (untrained here): passkey entries at the evaluation
    lengths that fit the prompt (104 bytes with 5 digits), on validation filler."""
    cfg = compose_train(ws.args + ["eval.multiples=[4,8]", "eval.passkey=true",
                                   "eval.task_examples=40", "eval.progress=false"])
    train_lib.check_train_config(cfg)
    model = build_model(cfg, 257)
    val = np.frombuffer(write_corpus(ws.root / "val.txt", 5000, seed=1).read_bytes(),
                        np.uint8).astype(np.uint16)
    out = train_lib.task_evaluations(model, None, _Corpus(val), 16, cfg.eval)
    assert [(e["length"], e["mode"], e["task"], e["examples"]) for e in out] == \
        [(128, "passkey", "passkey", 40)]
    assert out[0]["chance"] == 0.1 and out[0]["answer_tokens"] == 200
    short = compose_train(ws.args + ["eval.passkey=true"])  # eval at 16, 32: no fit
    with pytest.raises(RelposError, match="no evaluation length fits the passkey prompt"):
        train_lib.check_train_config(short)


class _Corpus:
    tokenizer = "bytes"

    def __init__(self, val):
        self.val = val


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, message", [
    (["task.name=nope"], "unknown task 'nope'; available: lm, assoc_recall, copy, flipflop, "
                         "passkey, reverse, selective_copy"),
    (["task=copy", "+task.foo=1"], "'foo' is not an option of task 'copy'; valid options: "
                                   "symbols, teacher_forcing"),
    (["task=copy", "task.symbols=1"], "task.symbols must be an integer >= 2, got 1"),
    (["task=reverse", "task.teacher_forcing=2"], "task.teacher_forcing must be true or false, "
                                                 "got 2"),
    (["task=passkey", "train.length=64"], "task=passkey needs a train.length of at least 103 "
                                          "tokens"),
    (["task=passkey", "train.length=128", "data.tokenizer=bpe"],
     "task=passkey writes its sentences as bytes and needs data.tokenizer=bytes; got bpe"),
    (["task=assoc_recall", "task.keys=64", "train.length=64"],
     "task=assoc_recall at test length 512 holds 127 key-value pairs, more than task.keys=64"),
    (["task=assoc_recall", "task.queries=once"], "task.queries must be one of random, each, "
                                                 "got 'once'"),
    (["task=selective_copy", "train.length=16"], "task=selective_copy needs a train.length of "
                                                 "at least 17 tokens"),
    (["task=copy", "eval.task_examples=0"], "eval.task_examples must be an integer >= 1, got 0"),
    (["task=copy", "model.vocab_size=8"], "model.vocab_size=8 is smaller than task=copy's "
                                          "vocabulary of 19"),
])
def test_bad_task_input_is_one_clear_error(overrides, message):
    with pytest.raises(RelposError) as e:
        train_lib.check_train_config(compose_train(overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_task_on_the_command_line_lists_the_valid_ones(tmp_path):
    r = subprocess.run(cli_argv("train") + ["task=copy,nope"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "relpos-train: error: unknown task 'nope'; valid: assoc_recall, copy, flipflop, lm, "
        "passkey, reverse, selective_copy (configs/task/)"]


# ----------------------------------------------------------------------------- plots


def _fake_run(label, seed, task="copy", acc=(1.0, 0.5, 0.0), train_length=16):
    return {"bias": label, "label": label, "seed": seed, "train_length": train_length,
            "task": task, "task_options": {}, "eval": [
                {"length": train_length * 2 ** i, "mode": "task", "task": task, "accuracy": a,
                 "accuracy_ci": evaluation.wilson_interval(int(a * 100), 100),
                 "token_accuracy": min(1.0, a + 0.1), "token_accuracy_ci": [a, min(1, a + .2)],
                 "examples": 100, "chance": 0.0625} for i, a in enumerate(acc)]}


def test_accuracy_figure_and_table(tmp_path):
    results = [_fake_run("alibi", s) for s in (0, 1)] + [_fake_run("rope", 0, acc=(0.9, 0, 0)),
                                                         _fake_run("alibi", 0, task="flipflop")]
    for i, r in enumerate(results):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "results.json").write_text(json.dumps(r))
    written = plots.make_all([str(tmp_path)], str(tmp_path / "figs"))
    assert "ppl_vs_length" not in written
    assert (tmp_path / "figs" / "accuracy_vs_length.png").stat().st_size > 0
    table = (tmp_path / "figs" / "table.md").read_text()
    assert "| alibi | 2 | 1.000" in table and "flipflop" in table
    assert "Per-token accuracy, task copy" in table


def test_accuracy_table_columns_follow_each_tasks_training_length():
    """copy trained at 16 and passkey at 64 in one table: each panel's multiples are its
    own; a t interval over seeds is clipped to [0, 1]."""
    results = [_fake_run("alibi", s, acc=(a, 0.5, 0.0)) for s, a in ((0, 1.0), (1, 0.5))]
    results += [_fake_run("alibi", 0, task="passkey", train_length=64)]
    table = plots.accuracy_table(results)
    copy, passkey = table.split("Exact-match accuracy, task passkey")[0], \
        table.split("Exact-match accuracy, task passkey")[1].split("Per-token")[0]
    assert "| scheme | seeds | 16 (1x) | 32 (2x) | 64 (4x) |" in copy
    assert "| scheme | seeds | 64 (1x) | 128 (2x) | 256 (4x) |" in passkey
    # mean 0.75 over (1.0, 0.5): t interval 0.75 +- 12.71 * 0.354 / sqrt(2), clipped
    assert "| alibi | 2 | 0.750 [0.000, 1.000] | 0.500 [0.500, 0.500] |" in copy


def test_one_accuracy_panel_of_two_training_lengths_is_refused():
    results = [_fake_run("alibi", 0), _fake_run("rope", 0, train_length=32)]
    with pytest.raises(RelposError, match=r"task copy pools runs trained at lengths \[16, 32\]"):
        plots.accuracy_table(results)


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_a_tiny_model_learns_to_copy(tmp_path):
    """A 2-layer, 64-wide ALiBi model trained on copy at length 32 (strings of up to 15
    symbols) copies more than 90% of 500 test strings of 15 symbols exactly."""
    cfg = compose_train(["task=copy", "bias=alibi", "model.d_model=64", "model.num_layers=2",
                         "model.num_heads=4", "train.length=32", "train.steps=1200",
                         "train.batch_size=32", "train.log_every=100",
                         "train.checkpoint_every=1200", "train.progress=false",
                         "optim.warmup_steps=50", "eval.task_multiples=[1]",
                         "eval.progress=false"])
    out = train_lib.train(cfg, tmp_path / "copy")
    (entry,) = out["eval"]
    assert (entry["length"], entry["examples"], entry["size"]) == (32, 500, 15)
    assert entry["accuracy"] > 0.9, entry
