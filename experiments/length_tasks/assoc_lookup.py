"""assoc_recall with random queries: is the answer looked up, or copied from an earlier query?

    python experiments/length_tasks/assoc_lookup.py [--policy=mask] [--previous=FILE] RUN_DIR [RUN_DIR ...] > results/assoc_lookup.md

With ``task.queries=random`` a key may be asked twice. The second time, its answer also
stands right after the first query, so a model can get it right by
copying instead of finding the key in the list. This splits each run's answers (500 test
sequences at each of its test lengths, the same as its results.json) into queries whose
key is asked for the first time, which only a lookup in the key-value list answers, and
repeated ones, beside what answering the list's most frequent value scores on the
first-time queries of the same sequences (no lookup: the plateau of runs that did not
learn it). Intervals: 95% percentile bootstrap over test sequences. ``--policy=P``
re-evaluates the runs with ``bias.policy=P`` (the offset table's ``mask``: no attention
to keys at offsets >= L), as relpos-eval's ``+bias_overrides.policy=P`` does.
``--previous=FILE`` adds the per-run tables of an earlier output of this script (runs
whose folders are gone) to the seed table, and prints them again below the new ones;
with ``--policy`` only its tables, without only the unmasked ones.
"""

import re
import sys
from pathlib import Path

import numpy as np
from assoc_by_query import restore_assoc_run  # this folder, beside this script

from relpos import runs
from relpos import tasks as tasks_lib
from relpos.evaluation import ratio_ci
from relpos.evaluation.tasks import make_argmax_fn
from relpos.plots import seed_interval
from relpos.positions.offset import OFFSET_POLICIES

EXAMPLES = 500


def split_answers(tokens: np.ndarray, weights: np.ndarray, ok: np.ndarray):
    """Per sequence: (correct, asked) for first-time queries and for repeated ones."""
    first, repeat = np.zeros((len(tokens), 2)), np.zeros((len(tokens), 2))
    for b in range(len(tokens)):
        asked = set()
        for a in np.flatnonzero(weights[b]):  # input position a holds the query key
            key = int(tokens[b, a])
            row = repeat if key in asked else first
            row[b] += (ok[b, a], 1)
            asked.add(key)
    return first, repeat


def frequent_value_guess(tokens: np.ndarray, weights: np.ndarray, gap_id: int) -> np.ndarray:
    """The expected correctness of answering every query with the value most frequent in
    the sequence's list (ties split evenly), at each answer: what a model scores without
    any lookup, the plateau the runs that did not learn sit on."""
    ok = np.zeros(weights.shape)
    for b in range(len(tokens)):
        row = list(map(int, tokens[b]))
        listed = [t for t in row[1:row.index(tasks_lib.SEP)] if t != gap_id]
        values, counts = np.unique(listed[1::2], return_counts=True)
        best = values[counts == counts.max()]
        for a in np.flatnonzero(weights[b]):
            ok[b, a] = np.mean(best == row[a + 1])
    return ok


def lookup_table(run_dir: Path, policy: str | None = None) -> tuple[str, list[tuple]]:
    tcfg, task, step, gd, state = restore_assoc_run(run_dir,
                                                    {"policy": policy} if policy else None)
    argmax = make_argmax_fn(gd, 512)
    L, rows = tcfg.train.length, []
    for k in tcfg.eval.task_multiples:
        insts = tasks_lib.test_instances(task, length=k * L, examples=EXAMPLES, start=0)
        tokens, weights = tasks_lib.pack(insts, k * L, task.pad_id)
        ok = np.asarray(argmax(state, tokens[:, :-1])) == tokens[:, 1:]
        guess = frequent_value_guess(tokens, weights, task.gap_id)
        rows.append((k, k * L, *split_answers(tokens, weights, ok),
                     split_answers(tokens, weights, guess)[0]))
    m = tcfg.model
    label = runs.default_label(tcfg.bias.name, tcfg.optim) + (f" ({policy})" if policy else "")
    pairs = f"{task.pairs} pairs and a gap" if task.pairs else f"{task.keys} keys"
    what = (f"{label}, seed {tcfg.seed}: width "
            f"{m.d_model}, {m.num_layers} layers, {step} steps, {pairs}, trained at {L}")
    return label, what, rows


def share(counts: np.ndarray) -> float:
    return counts[:, 0].sum() / counts[:, 1].sum()


def summary(counts: np.ndarray) -> str:
    hit, n = counts[:, 0], counts[:, 1]
    lo, hi = ratio_ci(hit, n)
    return f"{share(counts):.3f} [{lo:.3f}, {hi:.3f}] ({int(n.sum())})"


def seed_table(tables: list[tuple], earlier: list[tuple] = ()) -> list[str]:
    """First-time lookups per scheme over its seeds: mean [95% t interval over seeds,
    ddof=1, clipped to [0, 1]] (n seeds); one seed: its value alone. ``earlier``:
    (label, heading, {length: share}, {length: guess}) of runs read back from an earlier
    output."""
    by_label: dict[str, list] = {}
    for label, _, rows in tables:
        by_label.setdefault(label, []).append({n: share(first) for _, n, first, *_ in rows})
    for label, _, shares, _ in earlier:
        by_label.setdefault(label, []).append(shares)
    by_label = dict(sorted(by_label.items()))
    # the guess is the same for every run of one task setting (the same test sequences)
    by_label["the list's most frequent value (no lookup)"] = [
        {n: share(guess) for _, n, *_, guess in tables[0][2]} if tables
        else next((g for *_, g in earlier if g), {})]
    lengths = sorted({n for runs_ in by_label.values() for r in runs_ for n in r})
    out = ["| scheme (seeds) | " + " | ".join(str(n) for n in lengths) + " |",
           "|---|" + "---|" * len(lengths)]
    for label, runs_ in by_label.items():
        cells = []
        for n in lengths:
            vals = [r[n] for r in runs_ if n in r]
            m, lo, hi = seed_interval(vals)
            cells.append(f"{m:.3f}" if len(vals) == 1
                         else f"{m:.3f} [{max(lo, 0):.3f}, {min(hi, 1):.3f}]")
        seeds = "" if label.endswith("(no lookup)") else f" ({len(runs_)})"
        out.append(f"| {label}{seeds} | " + " | ".join(cells) + " |")
    return out


def previous_tables(path: Path, policy: str | None) -> tuple[list[tuple], list[str]]:
    """The per-run sections of an earlier output, wherever they stand in it: (label,
    heading, {length: first-time share}, {length: guess}) for the seed table, and the
    sections' text (heading and table), of the runs with (without) the policy."""
    tables, texts = [], []
    for section in path.read_text().split("\n### ")[1:]:
        heading, _, rest = section.partition("\n\n")
        body = rest.split("\n\n", 1)[0].strip()  # the run's table, up to the next blank line
        label = heading.split(", seed ")[0]
        m = re.search(r" \((\w+)\)$", label)  # the label's policy suffix, if any
        if (m[1] if m and m[1] in OFFSET_POLICIES else None) != policy:
            continue
        shares, guess = {}, {}
        for line in body.splitlines():  # | k | length | first share [lo, hi] (n) | ... | guess |
            if m := re.match(r"\| \d+ \| (\d+) \| ([\d.]+) \[", line):
                shares[int(m[1])] = float(m[2])
                cells = line.strip(" |").split(" | ")
                if len(cells) == 5:  # the guess column (outputs before it had four)
                    guess[int(m[1])] = float(cells[4])
        tables.append((label, heading, shares, guess))
        texts.append(f"### {heading}\n\n{body}\n")
    return tables, texts


def main(args: list[str]) -> None:
    opts = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--")}
    if unknown := set(opts) - {"--policy", "--previous"}:
        raise SystemExit(f"unknown option {sorted(unknown)[0]}: valid are --policy, --previous")
    policy = opts.get("--policy")
    paths = [a for a in args if not a.startswith("--")]
    if not paths and "--previous" not in opts:
        raise SystemExit(__doc__)
    print(f"assoc_recall answers split by whether the query's key was asked before "
          f"({EXAMPLES} test sequences per length; experiments/length_tasks/assoc_lookup.py). "
          f"Correct share [95% bootstrap over sequences] (answers). Chance: 1/values.\n")
    earlier, earlier_text = ([], []) if "--previous" not in opts else previous_tables(
        Path(opts["--previous"]), policy)
    tables = [lookup_table(Path(p), policy) for p in paths]
    if again := {h for _, h, *_ in earlier} & {what for _, what, _ in tables}:
        raise SystemExit(f"run {sorted(again)[0]!r} is both in {opts['--previous']} and in the "
                         f"run folders: drop one of them (a seed must count once)")
    if not tables and not earlier:
        raise SystemExit(f"no runs: no run folders given and none in {opts['--previous']}"
                         + (f" with policy {policy}" if policy else ""))
    print("First-time lookups over seeds (mean [95% t interval over seeds]), by test length:\n")
    print("\n".join(seed_table(tables, earlier)) + "\n")
    for _, what, rows in tables:
        print(f"### {what}\n")
        print("| x train | length | first time asked (lookup) | asked before (copy possible) "
              "| first time, most frequent value |")
        print("|---|---|---|---|---|")
        for k, n, first, repeat, guess in rows:
            print(f"| {k} | {n} | {summary(first)} | {summary(repeat)} | {share(guess):.3f} |")
        print()
    if earlier_text:
        print(f"Runs of {opts['--previous']} (their folders are not kept), as written there:\n")
        print("\n".join(earlier_text))


if __name__ == "__main__":
    main(sys.argv[1:])
