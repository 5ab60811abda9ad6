"""The length_tasks study's assoc_recall analysis (experiments/length_tasks/assoc_lookup.py)
on hand-built sequences: first-time vs repeated queries, the most-frequent-value guess,
and reading back the per-run tables of an earlier output."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "length_tasks"))
import assoc_lookup  # noqa: E402  (the study's folder, put on the path above)

from relpos.tasks.base import BOS, PAD, SEP  # noqa: E402

GAP = 99
# keys 5, 6, 7 with values 20, 21, 20; queries 6, 5, 6 (6 is asked twice); one pad
ROW = [BOS, 5, 20, 6, 21, GAP, 7, 20, SEP, 6, 21, 5, 20, 6, 21, PAD]
QUERIES = [9, 11, 13]  # input positions holding a query key; the answer is the next token


def _arrays():
    tokens = np.array([ROW])
    weights = np.zeros_like(tokens, dtype=float)
    weights[0, QUERIES] = 1
    return tokens, weights


def test_split_answers_counts_first_time_and_repeated_queries():
    tokens, weights = _arrays()
    ok = np.zeros_like(weights)
    ok[0, [9, 13]] = 1  # the first query of 6 right, 5 wrong, the repeat of 6 right
    first, repeat = assoc_lookup.split_answers(tokens, weights, ok)
    np.testing.assert_array_equal(first, [[1, 2]])  # 6 (right) and 5 (wrong)
    np.testing.assert_array_equal(repeat, [[1, 1]])


def test_frequent_value_guess_skips_the_gap_and_splits_ties():
    tokens, weights = _arrays()
    guess = assoc_lookup.frequent_value_guess(tokens, weights, GAP)
    # 20 is listed twice, 21 once: the guess 20 answers 5 and misses 6
    np.testing.assert_array_equal(guess[0, QUERIES], [0, 1, 0])
    tie = tokens.copy()
    tie[0, 7] = 22  # values 20, 21, 22 once each: every answer is right 1/3 of the time
    np.testing.assert_allclose(assoc_lookup.frequent_value_guess(tie, weights, GAP)[0, QUERIES],
                               [1 / 3] * 3)


EARLIER = """header

### alibi, seed 0: width 64, 2 layers, 8000 steps, 64 keys, trained at 32

| x train | length | first time asked (lookup) | asked before (copy possible) | first time, most frequent value |
|---|---|---|---|---|
| 1 | 32 | 0.992 [0.988, 0.995] (2303) | 0.993 [0.988, 0.998] (1197) | 0.280 |
| 8 | 256 | 0.316 [0.310, 0.321] (19992) | 0.647 [0.638, 0.656] (11508) | 0.123 |

Runs of earlier.md (their folders are not kept), as written there:

### alibi, seed 1: width 64, 2 layers, 8000 steps, 64 keys, trained at 32

| x train | length | first time asked (lookup) | asked before (copy possible) | first time, most frequent value |
|---|---|---|---|---|
| 1 | 32 | 0.998 [0.997, 1.000] (2303) | 1.000 [1.000, 1.000] (1197) | 0.280 |
| 8 | 256 | 0.445 [0.439, 0.452] (19992) | 0.763 [0.756, 0.771] (11508) | 0.123 |

First-time lookups over seeds (mean [95% t interval over seeds]), by test length:

| scheme (seeds) | 32 | 256 |
|---|---|---|
| offset (mask) (1) | 0.270 | 0.101 |

### offset (mask), seed 0: width 64, 2 layers, 8000 steps, 64 keys, trained at 32

| x train | length | first time asked (lookup) | asked before (copy possible) | first time, most frequent value |
|---|---|---|---|---|
| 1 | 32 | 0.270 [0.256, 0.284] (2303) | 0.298 [0.268, 0.328] (1197) | 0.280 |
"""


@pytest.mark.parametrize("policy, labels", [(None, ["alibi", "alibi"]), ("mask", ["offset (mask)"])])
def test_previous_tables_reads_back_the_runs_of_one_policy(tmp_path, policy, labels):
    path = tmp_path / "earlier.md"
    path.write_text(EARLIER)
    tables, texts = assoc_lookup.previous_tables(path, policy)
    assert [t[0] for t in tables] == labels
    # each text is its heading and its table alone, not the notes and tables after it
    assert all(t.startswith("### ") and t.rstrip().endswith(" |") for t in texts)
    assert not any("Runs of" in t or "scheme (seeds)" in t for t in texts)
    if policy is None:
        assert [t[2] for t in tables] == [{32: 0.992, 256: 0.316}, {32: 0.998, 256: 0.445}]
        assert tables[0][3] == {32: 0.280, 256: 0.123}  # the guess column
        # the seed table pools both seeds: mean 0.3805 at 256, with a t interval
        fresh = ("rope", "rope, seed 0", [(k, 32 * k, np.array([[1.0, 10.0]]), None,
                                           np.array([[2.0, 10.0]])) for k in (1, 8)])
        table = assoc_lookup.seed_table([fresh], tables)
        row = next(r for r in table if r.startswith("| alibi"))
        assert row.startswith("| alibi (2) | 0.995 [") and "| 0.381 [" in row
        assert table[-1] == "| the list's most frequent value (no lookup) | 0.200 | 0.200 |"
        # with no fresh runs the guess row is read back from the earlier output
        assert assoc_lookup.seed_table([], tables)[-1].endswith("| 0.280 | 0.123 |")


def test_main_reprints_earlier_runs_alone_and_refuses_a_run_twice(tmp_path, capsys, monkeypatch):
    path = tmp_path / "earlier.md"
    path.write_text(EARLIER)
    assoc_lookup.main([f"--previous={path}", "--policy=mask"])
    out = capsys.readouterr().out
    assert "| offset (mask) (1) | 0.270 |" in out and out.count("### ") == 1
    heading = "alibi, seed 1: width 64, 2 layers, 8000 steps, 64 keys, trained at 32"
    monkeypatch.setattr(assoc_lookup, "lookup_table", lambda p, policy: ("alibi", heading, []))
    with pytest.raises(SystemExit, match="is both in .* and in the run folders"):
        assoc_lookup.main([f"--previous={path}", "some/run"])
    with pytest.raises(SystemExit, match="no runs: .* with policy nope"):
        assoc_lookup.main([f"--previous={path}", "--policy=nope"])
