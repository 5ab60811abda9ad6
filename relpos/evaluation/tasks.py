"""Accuracy of a task model (or of an LM on passkey retrieval) at lengths beyond training.

At each test length M, ``examples`` sequences of the largest task size that fits M
(:func:`relpos.tasks.test_instances`: the same sequences for every run) are scored by the
greedy (argmax) prediction of every answer token given the true prefix (teacher forcing;
with a single answer token per step this equals greedy decoding until the first error,
so exact match is the same either way). A task with ``teacher_forcing=false`` reads a
blank id at every answer position (:func:`relpos.tasks.model_inputs`), so there every
answer token is predicted from the prompt alone, as the model was trained:

* ``accuracy``: exact match, the fraction of sequences whose answer tokens are all right,
  with a 95% **Wilson** score interval (``accuracy_ci``). Sequences are independent draws,
  so exact match is a binomial proportion; Wilson's interval keeps near-nominal coverage
  at proportions of 0 or 1 (common here: perfect at 1x, nothing at 16x), where the
  normal-approximation interval collapses to a point.
* ``token_accuracy``: the fraction of answer tokens predicted right (pooled over the
  sequences), with a 95% percentile **bootstrap over sequences** (``token_accuracy_ci``):
  tokens of one sequence share its prompt and are not independent, sequences are.

Each entry also records ``examples``, ``answer_tokens``, ``size`` (the task's size at M)
and ``chance`` (per-token accuracy of uniform guessing over the answer alphabet).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from relpos import tasks as tasks_lib
from relpos.errors import RelposError
from relpos.evaluation.protocols import ratio_ci


def task_lengths(ecfg, train_length: int) -> list[int]:
    return sorted({int(m) * train_length for m in ecfg.task_multiples})


def check_task_eval(ecfg) -> None:
    if not ecfg.task_multiples:
        raise RelposError("eval.task_multiples must list at least one multiple")
    for x in ecfg.task_multiples:
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise RelposError(f"eval.task_multiples entries must be integers >= 1, got {x!r}")
    n = ecfg.task_examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RelposError(f"eval.task_examples must be an integer >= 1, got {n!r}")


def wilson_interval(successes: int, n: int, level: float = 0.95) -> list[float]:
    """The Wilson score interval of a binomial proportion (scipy)."""
    import scipy.stats  # here, not at module level: it adds ~1 s to every CLI's start

    ci = scipy.stats.binomtest(int(successes), int(n)).proportion_ci(level, method="wilson")
    return [float(ci.low), float(ci.high)]


@functools.lru_cache(maxsize=8)
def make_argmax_fn(graphdef, chunk: int):
    """jit ``(params, inputs [B, M]) -> argmax ids [B, M]``, the LM head applied ``chunk``
    positions at a time (so ``[B, M, vocab]`` logits never exist whole)."""

    def fn(params, inputs):
        model = nnx.merge(graphdef, params)
        h = model.hidden(inputs)  # [B, M, D]
        b, m, d = h.shape
        c = min(chunk, m)
        pad = (-m) % c
        hc = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, c, d).transpose(1, 0, 2, 3)
        ids = jax.lax.map(lambda x: jnp.argmax(model.logits(x), axis=-1).astype(jnp.int32), hc)
        return ids.transpose(1, 0, 2).reshape(b, -1)[:, :m]

    return jax.jit(fn)


def score_task_length(model, task, length: int, *, examples: int, batch_tokens: int,
                 chunk: int, source=None, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Per test sequence at ``length``: ``(correct answer tokens, answer tokens)``."""
    graphdef, params = nnx.split(model)
    fn = make_argmax_fn(graphdef, chunk)
    batch = max(1, min(examples, batch_tokens // length))
    correct = np.zeros(examples, np.int64)
    total = np.zeros(examples, np.int64)
    for start in range(0, examples, batch):
        n = min(batch, examples - start)
        insts = tasks_lib.test_instances(task, length=length, examples=n, start=start,
                                         source=source)
        insts += insts[:1] * (batch - n)  # pad: one compiled shape per length
        tokens, weights = tasks_lib.pack(insts, length, task.pad_id)
        inputs = tasks_lib.model_inputs(task, tokens, weights)
        pred = np.asarray(fn(params, tokens[:, :-1] if inputs is None else inputs))
        scored = weights[:n] > 0
        correct[start:start + n] = ((pred[:n] == tokens[:n, 1:]) & scored).sum(1)
        total[start:start + n] = scored.sum(1)
        if progress is not None:
            progress.update(n)
    return correct, total


def summarize(length: int, correct: np.ndarray, total: np.ndarray, task, mode: str) -> dict:
    exact = int((correct == total).sum())
    n = len(correct)
    return {"length": length, "mode": mode, "task": task.name,
            "accuracy": exact / n, "accuracy_ci": wilson_interval(exact, n),
            "token_accuracy": float(correct.sum() / total.sum()),
            "token_accuracy_ci": ratio_ci(correct.astype(np.float64), total.astype(np.float64)),
            "examples": n, "answer_tokens": int(total.sum()),
            "size": task.sizes(length)[1], "chance": task.chance}


def evaluate_task(model, task, lengths: list[int], ecfg, *, source=None,
                  mode: str = "task") -> list[dict]:
    """One entry per length (see the module docstring); ``mode`` names the protocol in
    results.json (``task``; ``passkey`` for the LM's passkey retrieval)."""
    progress = tqdm(total=len(lengths) * ecfg.task_examples, disable=not ecfg.progress,
                    unit="seq", dynamic_ncols=True, mininterval=1.0, leave=False)
    out = []
    for length in lengths:
        progress.set_description(f"eval {task.name} {length}")
        correct, total = score_task_length(model, task, length, examples=ecfg.task_examples,
                                      batch_tokens=ecfg.batch_tokens, chunk=ecfg.loss_chunk,
                                      source=source, progress=progress)
        out.append(summarize(length, correct, total, task, mode))
    progress.close()
    return out


def passkey_lengths(ecfg, train_length: int, task) -> list[int]:
    """The LM's evaluation lengths (eval.multiples / eval.lengths) that fit a passkey
    prompt."""
    from_eval = ecfg.lengths if ecfg.lengths else [m * train_length for m in ecfg.multiples]
    return sorted({int(x) for x in from_eval if task.sizes(int(x))[1] >= task.sizes(int(x))[0]})


def evaluate_passkey(model, val: np.ndarray, tokenizer: str, train_length: int, ecfg
                     ) -> list[dict]:
    """Passkey retrieval by a model trained on the corpus alone (``eval.passkey``): the
    :mod:`relpos.tasks.passkey` prompts on validation-split filler, at every evaluation
    length the prompt fits (``mode: passkey``)."""
    task = tasks_lib.build("passkey")
    tasks_lib.check_tokenizer(task, tokenizer)
    lengths = passkey_lengths(ecfg, train_length, task)
    if not lengths:
        raise RelposError(f"eval.passkey: no evaluation length fits the passkey prompt "
                          f"({task.fixed} tokens); add longer eval.multiples")
    return evaluate_task(model, task, lengths, ecfg, source=val, mode="passkey")
