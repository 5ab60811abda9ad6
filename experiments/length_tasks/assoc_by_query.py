"""assoc_recall: exact answers by query index, and by the queried pair's place in the list.

    python experiments/length_tasks/assoc_by_query.py RUN_DIR [RUN_DIR ...] > results/assoc_by_query.md

For each finished assoc_recall run, the model of its last checkpoint answers 512 test
sequences at its training length (the largest size that fits, every query in a new
order); printed: the share of correct answers for the 1st..n-th query (a model that
looks the key up is flat here), and for each position of the queried pair in the key-value
list. If a model predicted the value of a pair not yet asked, at random, its accuracy
would rise with the query index towards 1 at the last query (one pair left).
"""

import sys
from pathlib import Path

import numpy as np
from flax import nnx

from relpos import runs
from relpos import tasks as tasks_lib
from relpos.config import build_model
from relpos.evaluation.tasks import make_argmax_fn

EXAMPLES = 512


def restore_assoc_run(run_dir: Path, bias_overrides=None):
    """A finished assoc_recall run: ``(config, task, step, graphdef, state)`` of its
    latest checkpoint (also used by assoc_lookup.py)."""
    tcfg = runs.saved_run_config(run_dir, bias_overrides)
    task = runs.task_of(tcfg)
    if task is None or task.name != "assoc_recall":
        raise SystemExit(f"{run_dir}: not an assoc_recall run")
    corpus = runs.load_data(tcfg.data, task)
    step, model = runs.restore_model(run_dir, tcfg, build_model(tcfg, corpus.vocab_size))
    return (tcfg, task, step, *nnx.split(model))


def by_query(run_dir: Path) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    tcfg, task, step, gd, state = restore_assoc_run(run_dir)
    L = tcfg.train.length
    insts = tasks_lib.test_instances(task, length=L, examples=EXAMPLES, start=0)
    tokens, weights = tasks_lib.pack(insts, L, task.pad_id)
    pred = np.asarray(make_argmax_fn(gd, 512)(state, tokens[:, :-1]))
    ok = (pred == tokens[:, 1:]) & (weights > 0)
    answers = np.where(weights[0] > 0)[0]  # input position of each query key
    n = len(answers)
    hit, seen = np.zeros(n), np.zeros(n)
    for b in range(EXAMPLES):
        keys = tokens[b, 1:1 + 2 * n:2]
        for a in answers:
            j = int(np.flatnonzero(keys == tokens[b, a])[0])
            hit[j] += ok[b, a]
            seen[j] += 1
    # chance of "the value of a random pair not yet asked" at query i: 1/(n - i) plus
    # the chance that another remaining pair has the same value
    v = task.values
    guess = np.array([1 / (n - i) + (1 - 1 / (n - i)) / v for i in range(n)])
    m = tcfg.model
    what = (f"{tcfg.bias.name}, width {m.d_model}, {m.num_layers} layers, {step} steps at lr "
            f"{tcfg.optim.lr:g}, {task.keys} keys, seed {tcfg.seed}")
    return what, ok[:, answers].mean(0), hit / seen, guess


def main(paths: list[str]) -> None:
    print(f"Correct answers of assoc_recall runs at their training length ({EXAMPLES} test "
          "sequences, the largest size; run with experiments/length_tasks/assoc_by_query.py)\n")
    for p in paths:
        what, q, pair, guess = by_query(Path(p))
        n = len(q)
        print(f"### {what}\n")
        print("| | " + " | ".join(str(i + 1) for i in range(n)) + " |")
        print("|---|" + "---|" * n)
        print("| correct, by query index | " + " | ".join(f"{x:.3f}" for x in q) + " |")
        print("| correct, by the queried pair's place in the list | "
              + " | ".join(f"{x:.3f}" for x in pair) + " |")
        print("| guessing a pair not yet asked | " + " | ".join(f"{x:.3f}" for x in guess)
              + " |\n")


if __name__ == "__main__":
    main(sys.argv[1:])
