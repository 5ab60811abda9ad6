"""Synthetic tasks with their own small vocabularies (ids: ``PAD 0, BOS 1, SEP 2``, then
the task's own tokens). Formats (``|`` marks where the answer starts; the answer tokens
alone carry a loss and are scored):

* ``copy`` — ``BOS x1 .. xn SEP | x1 .. xn``; symbols ``x`` uniform over ``symbols``
  ids from 3. Size n; ``2n + 2`` tokens. Copying as in Kazemnejad et al. 2023 (NoPE)
  and Jelassi et al. 2024 ("Repeat after me"); with ``symbols=2`` close to Ruoss et
  al. 2023's *duplicate string*, whose answer is the string twice.
* ``reverse`` — ``BOS x1 .. xn SEP | xn .. x1`` (Ruoss et al.'s *reverse string* with
  ``symbols=2``).

  Both take ``teacher_forcing`` (default true: the model reads the true answer so far,
  next-token prediction). With ``teacher_forcing=false`` every answer position reads a
  blank id (``3 + symbols``, one more id in the vocabulary) instead of the answer token,
  so each answer token is predicted from the prompt alone and all of them at once. That
  is how Ruoss et al.'s encoder reads its output slots; here the attention stays causal.
* ``assoc_recall`` — multi-query associative recall (Arora et al. 2023, Zoology's MQAR):
  ``BOS k1 v1 .. kn vn SEP q1 | a1 q2 | a2 ..`` with n distinct keys (ids 3 ..
  3+keys-1), values from ``values`` ids after them (repeats allowed), n queries and
  each answer the value bound to its query. Size n; ``4n + 2`` tokens. Only the answers
  are scored (as in MQAR), not the query tokens. ``queries`` says how the n queries are
  drawn: ``random`` (default) draws each independently and uniformly from the n keys (a
  key may be asked twice or never); ``each`` asks every key once, in a random order.
  With ``each`` the pairs not yet asked narrow the answer (the last query has one left),
  so a model can score well above chance by elimination without looking the key up;
  ``random`` leaves nothing to eliminate. Runs saved before the option existed read as
  ``each``, the format they were trained on.

  ``pairs`` (default 0: as many as fit) bounds the number of pairs by k instead: each
  instance holds n pairs, n uniform over 1..k at every length, then a gap of g blank
  tokens (id ``3 + keys + values``, one more id in the vocabulary) before ``SEP``:
  ``BOS k1 v1 .. kn vn _ .. _ SEP q1 | a1 ..``. Size g (the gap, from 0, up to what k
  pairs leave of the length); ``4n + g + 2`` tokens. Longer test sequences then put the
  keys farther from the queries with the same mix of list sizes, so distance is
  measured apart from the number of pairs.
* ``flipflop`` — flip-flop language modelling (Liu et al. 2023): ``BOS`` then n pairs
  ``(instruction, bit)`` with instruction ``w`` (write, id 2), ``r`` (read, 3) or ``i``
  (ignore, 4) and bit ``0``/``1`` (ids 5, 6); ``i`` with probability ``ignore_prob``
  (the paper's FFL(0.8) by default), ``w`` and ``r`` sharing the rest. The first
  instruction is ``w`` and the last ``r``; a read's bit is the bit of the most recent
  write, and only read bits are scored (the paper trains on every token and reports
  read bits; here the loss is on the answers, like every task here). Size n; ``2n + 1``
  tokens. Id 2 is ``w`` here, not SEP.
* ``selective_copy`` — selective copying (Gu & Dao 2023, Mamba; in CoPE's suite):
  ``BOS s1 .. sn SEP | d1 .. dk``: a span of n tokens holding ``copies`` = k data symbols
  (ids from 4, ``symbols`` of them) at random places, the rest the blank id 3; the
  answer is the k data symbols in order. Size n (the span); ``n + k + 2`` tokens.

Sizes start at the smallest sensible instance (n = 1 for copy/reverse/assoc_recall, 2
instruction pairs for flipflop, a span of k for selective_copy).
"""

from __future__ import annotations

import numpy as np

from relpos.errors import RelposConfigError, RelposError, check_positive_int
from relpos.tasks.base import BOS, SEP, Instance, Task, register


def instance(prompt, answer) -> Instance:
    """``prompt`` then ``answer``, the answer flagged."""
    prompt, answer = np.asarray(prompt, np.int32), np.asarray(answer, np.int32)
    return Instance(np.concatenate([prompt, answer]),
                    np.concatenate([np.zeros(len(prompt), bool), np.ones(len(answer), bool)]))


class _Symbols(Task):
    FIRST = 3  # first symbol id

    def __init__(self, symbols: int = 16, teacher_forcing: bool = True):
        self.symbols = check_positive_int("task.symbols", symbols, minimum=2)
        if not isinstance(teacher_forcing, bool):
            raise RelposConfigError(f"task.teacher_forcing must be true or false, got "
                                    f"{teacher_forcing!r}")
        self.teacher_forcing = teacher_forcing
        self.vocab_size = self.FIRST + self.symbols
        if not teacher_forcing:
            self.blank_id = self.vocab_size
            self.vocab_size += 1
        self.chance = 1.0 / self.symbols

    def draw(self, rng, n: int) -> np.ndarray:
        return rng.integers(self.FIRST, self.FIRST + self.symbols, size=n)

    def sizes(self, length: int) -> tuple[int, int]:
        return 1, (length - 1) // 2  # 2n + 2 <= length + 1


@register("copy")
class Copy(_Symbols):
    def make(self, rng, size, source=None) -> Instance:
        x = self.draw(rng, size)
        return instance([BOS, *x, SEP], x)


@register("reverse")
class Reverse(_Symbols):
    def make(self, rng, size, source=None) -> Instance:
        x = self.draw(rng, size)
        return instance([BOS, *x, SEP], x[::-1])


@register("assoc_recall")
class AssocRecall(Task):
    QUERIES = ("random", "each")

    def __init__(self, keys: int = 512, values: int = 16, queries: str = "random",
                 pairs: int = 0):
        self.keys = check_positive_int("task.keys", keys)
        self.values = check_positive_int("task.values", values, minimum=2)
        if queries not in self.QUERIES:
            raise RelposConfigError(f"task.queries must be one of {', '.join(self.QUERIES)}, "
                                    f"got {queries!r}")
        self.queries = queries
        self.pairs = check_positive_int("task.pairs", pairs, minimum=0)
        if self.pairs > self.keys:
            raise RelposConfigError(f"task.pairs={pairs} needs as many distinct keys; set "
                                    f"task.keys>={pairs}")
        self.gap_id = 3 + self.keys + self.values  # the gap's token (pairs > 0 only)
        self.vocab_size = self.gap_id + (1 if self.pairs else 0)
        self.chance = 1.0 / self.values

    def sizes(self, length: int) -> tuple[int, int]:
        if self.pairs:  # the gap: 4k + g + 2 <= length + 1
            return 0, length - 1 - 4 * self.pairs
        return 1, (length - 1) // 4  # 4n + 2 <= length + 1

    def check_length(self, length: int, what: str = "length") -> tuple[int, int]:
        lo, hi = super().check_length(length, what)
        if not self.pairs and hi > self.keys:  # keys are distinct within a sequence
            raise RelposError(
                f"task=assoc_recall at {what} {length} holds {hi} key-value pairs, more than "
                f"task.keys={self.keys} distinct keys; set task.keys>={hi} or test shorter "
                f"lengths (eval.task_multiples)")
        return lo, hi

    def make(self, rng, size, source=None) -> Instance:
        n, gap = (int(rng.integers(1, self.pairs + 1)), size) if self.pairs else (size, 0)
        if n > self.keys:
            raise RelposError(f"task=assoc_recall: {n} pairs need task.keys>={n}")
        keys = 3 + rng.choice(self.keys, size=n, replace=False)
        values = 3 + self.keys + rng.integers(0, self.values, size=n)
        order = rng.permutation(n) if self.queries == "each" else rng.integers(0, n, size=n)
        pairs = np.stack([keys, values], 1).reshape(-1)
        tokens = np.concatenate([[BOS], pairs, np.full(gap, self.gap_id), [SEP],
                                 np.stack([keys[order], values[order]], 1).reshape(-1)])
        answer = np.zeros(len(tokens), bool)
        answer[2 * n + gap + 3::2] = True  # the value after each query
        return Instance(tokens.astype(np.int32), answer)


@register("flipflop")
class FlipFlop(Task):
    W, R, I, ZERO = 2, 3, 4, 5  # ONE = 6

    def __init__(self, ignore_prob: float = 0.8):
        p = ignore_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise RelposConfigError(f"task.ignore_prob must be a number in [0, 1), got {p!r}")
        self.ignore_prob = float(p)
        self.vocab_size = 7
        self.chance = 0.5

    def sizes(self, length: int) -> tuple[int, int]:
        return 2, length // 2  # 2n + 1 <= length + 1

    def make(self, rng, size, source=None) -> Instance:
        q = (1 - self.ignore_prob) / 2
        instr = rng.choice(np.array([self.W, self.R, self.I]), size=size,
                           p=[q, q, self.ignore_prob])
        instr[0], instr[-1] = self.W, self.R
        bits = rng.integers(0, 2, size=size)
        idx = np.arange(size)
        last_write = np.maximum.accumulate(np.where(instr == self.W, idx, 0))
        reads = instr == self.R
        bits[reads] = bits[last_write[reads]]
        tokens = np.empty(1 + 2 * size, np.int32)
        tokens[0], tokens[1::2], tokens[2::2] = BOS, instr, self.ZERO + bits
        answer = np.zeros(len(tokens), bool)
        answer[2::2] = reads
        return Instance(tokens, answer)


@register("selective_copy")
class SelectiveCopy(Task):
    BLANK, FIRST = 3, 4

    def __init__(self, symbols: int = 16, copies: int = 8):
        self.symbols = check_positive_int("task.symbols", symbols, minimum=2)
        self.copies = check_positive_int("task.copies", copies)
        self.vocab_size = self.FIRST + self.symbols
        self.chance = 1.0 / self.symbols

    def sizes(self, length: int) -> tuple[int, int]:
        return self.copies, length - 1 - self.copies  # n + k + 2 <= length + 1

    def make(self, rng, size, source=None) -> Instance:
        k = self.copies
        data = rng.integers(self.FIRST, self.FIRST + self.symbols, size=k)
        span = np.full(size, self.BLANK, np.int32)
        span[np.sort(rng.choice(size, size=k, replace=False))] = data
        return instance([BOS, *span, SEP], data)
