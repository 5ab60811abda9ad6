"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark attention"), on the corpus's
bytes: filler text drawn from a corpus split, with the key sentence inserted at a random
depth and the question at the end::

    <filler a> The pass key is 12345. Remember it. 12345 is the pass key. <filler b>
     What is the pass key? The pass key is | 12345

The key is ``digits`` uniform decimal digits (the paper draws an integer up to 50,000);
only the key's digits after the question are scored. The paper's filler is a repeated
sentence ("The grass is green. The sky is blue. ...") after an opening instruction; here
the filler is a window of real corpus text (train split for training, validation split
for test sets), drawn at a uniform start, and the key sentence goes after a uniform
number of its tokens (0 .. all), without the opening instruction: relpos's models are
small LMs, not instruction-tuned ones. The same sequences serve as a task
(``task=passkey``) and as an evaluation of a model trained on the corpus alone
(``eval.passkey=true``), which can only retrieve the key by copying from far back.
Size: the sequence's total length in tokens. Needs the ``bytes`` tokenizer (its ids
are the text's UTF-8 bytes, so the sentences need no tokenizer here).
"""

from __future__ import annotations

import numpy as np

from relpos.data import EOS_BYTES, BytesTokenizer
from relpos.errors import RelposError, check_positive_int
from relpos.tasks.base import Instance, Task, register

KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is "


def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), np.uint8).astype(np.int32)


@register("passkey")
class Passkey(Task):
    uses_corpus = True
    tokenizer = "bytes"

    def __init__(self, digits: int = 5):
        self.digits = check_positive_int("task.digits", digits)
        self.vocab_size = BytesTokenizer.vocab_size
        self.pad_id = EOS_BYTES
        self.chance = 0.1
        self.fixed = len(KEY_SENTENCE.format(key="0" * digits)) + len(QUESTION) + digits

    def sizes(self, length: int) -> tuple[int, int]:
        return self.fixed, length + 1

    def make(self, rng, size, source=None) -> Instance:
        if source is None:
            raise RelposError("task=passkey draws its filler from a corpus split; none given")
        n_fill = size - self.fixed
        if n_fill > len(source):
            raise RelposError(f"task=passkey: a {size}-token sequence needs {n_fill} filler "
                              f"tokens, more than the corpus split's {len(source)}")
        key = rng.integers(0, 10, size=self.digits)
        start = int(rng.integers(0, len(source) - n_fill + 1))
        depth = int(rng.integers(0, n_fill + 1))
        filler = np.asarray(source[start:start + n_fill], np.int32)
        key_text = "".join(str(d) for d in key)
        answer = _bytes(key_text)
        tokens = np.concatenate([filler[:depth], _bytes(KEY_SENTENCE.format(key=key_text)),
                                 filler[depth:], _bytes(QUESTION), answer])
        flags = np.zeros(len(tokens), bool)
        flags[-self.digits:] = True
        return Instance(tokens, flags)


def check_tokenizer(task: Task, tokenizer: str) -> None:
    """A task that writes text as bytes refuses a corpus with another tokenizer."""
    need = getattr(task, "tokenizer", None)
    if need and tokenizer != need:
        raise RelposError(f"task={task.name} writes its sentences as bytes and needs "
                          f"data.tokenizer={need}; got {tokenizer}")
