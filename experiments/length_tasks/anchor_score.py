"""Ruoss et al. (2023)'s score for the reverse-string anchor, from a merged results file.

Their score is the per-token accuracy averaged uniformly over every test length above
training (their `experiments/example.py`: the mean of the accuracies past the training
length). We test at a grid of string sizes n, not at every n, so the uniform mean over
n in [n_train, n_max] is the trapezoid integral of the grid's accuracies divided by the
range. Its 95% interval is a normal one over test sequences: each size has its own
test sequences, so the trapezoid's variance is the weighted sum of the sizes' variances
(each from its bootstrap interval's half-width / 1.96). One training seed: the interval
holds no seed-to-seed variance.

    python experiments/length_tasks/anchor_score.py results/anchor.json > results/anchor.md
"""

import json
import sys
from pathlib import Path

import numpy as np


def score(entries: list[dict], train_size: int) -> tuple[float, float, float, int]:
    """(score, lo, hi, n_max) over the sizes from train_size up, by the trapezoid rule."""
    pts = sorted((e["size"], e["token_accuracy"], e["token_accuracy_ci"]) for e in entries
                 if e["size"] >= train_size)
    n = np.array([p[0] for p in pts], float)
    acc = np.array([p[1] for p in pts])
    se = np.array([(p[2][1] - p[2][0]) / (2 * 1.959964) for p in pts])
    w = np.zeros_like(n)  # trapezoid weights, normalised by the range
    w[:-1] += np.diff(n) / 2
    w[1:] += np.diff(n) / 2
    w /= n[-1] - n[0]
    mean, half = float(w @ acc), 1.959964 * float(np.sqrt((w**2) @ se**2))
    return mean, max(0.0, mean - half), min(1.0, mean + half), int(n[-1])


def main(path: str) -> None:
    runs = json.loads(Path(path).read_text())
    fps = {r.get("dataset_fingerprint") for r in runs}
    tasks = {(r["task"], json.dumps(r.get("task_options"), sort_keys=True)) for r in runs}
    if len(tasks) != 1:
        sys.exit(f"anchor_score: {path} mixes tasks {sorted(tasks)}; give one task's runs")
    rows = []
    for r in runs:
        ev = [e for e in r["eval"] if e.get("mode") == "task"]
        train_size = max(e["size"] for e in ev if e["length"] <= r["train_length"])
        s, lo, hi, n_max = score(ev, train_size)
        at_train = next(e for e in ev if e["size"] == train_size)
        rows.append((r.get("label") or r["bias"], r["seed"], at_train["token_accuracy"],
                     at_train["accuracy"], s, lo, hi, train_size, n_max))
    task, options = sorted(tasks)[0]
    print(f"Task {task} (options {options}; corpus: "
          f"{sorted(map(str, fps))}). Score: per-token accuracy averaged uniformly over "
          f"string sizes n_train..n_max (trapezoid over the tested sizes), 95% normal "
          f"interval over test sequences, one training seed.\n")
    print("| encoding | seed | per-token at n_train | exact match at n_train "
          "| score over n_train..n_max [95%] | n_train, n_max |")
    print("|---|---|---|---|---|---|")
    for lab, seed, tok, em, s, lo, hi, n0, n1 in rows:
        print(f"| {lab} | {seed} | {tok:.3f} | {em:.3f} | {s:.3f} [{lo:.3f}, {hi:.3f}] "
              f"| {n0}, {n1} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: anchor_score.py <merged results.json>")
    main(sys.argv[1])
