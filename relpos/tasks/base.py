"""What every task shares: the registry, the size range that fits a length, and the
batches (training, a function of (seed, step) only; test sets, a function of the length
and the example index only).

A task makes one *instance* at a time: ``make(rng, size, source) -> Instance``, a
sequence of token ids and a flag per token that marks the answer. ``size`` is the
task's own measure (symbols to copy, key-value pairs, instruction pairs, tokens); the
largest size whose sequence fits ``length + 1`` tokens is what a test set at ``length``
uses, and training draws sizes uniformly from :meth:`Task.sizes` (so training lengths
are uniform up to ``train.length``). A batch row is the instance padded at its end to
``length + 1`` tokens: the model reads tokens ``0..length-1`` and is scored on targets
``1..length``, and only answer tokens carry a loss weight (padding sits after the
answer, so under the causal mask it changes no scored prediction).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np

from relpos.errors import RelposConfigError, RelposError

# Special ids shared by the synthetic tasks (passkey uses the corpus's byte ids).
PAD, BOS, SEP = 0, 1, 2

# Stream tags for np.random.default_rng seeds: training and test draws never share one.
_TRAIN_STREAM = 0x7A5C
_TEST_STREAM = 0x7E57

_REGISTRY: dict[str, type[Task]] = {}

T = TypeVar("T", bound=type)


@dataclasses.dataclass(frozen=True)
class Instance:
    """One task sequence: ``tokens [n]`` int32 and ``answer [n]`` bool (True: scored)."""

    tokens: np.ndarray
    answer: np.ndarray

    def __post_init__(self):
        assert self.tokens.shape == self.answer.shape and not self.answer[0]


class Task:
    """A length-generalization task. Subclasses set :attr:`vocab_size` and
    :attr:`chance` in their constructor and implement :meth:`sizes` and :meth:`make`."""

    name: ClassVar[str]
    uses_corpus: ClassVar[bool] = False  # make() needs ``source`` (corpus tokens)
    pad_id: int = PAD
    blank_id: int | None = None  # set: answer positions read this id (no teacher forcing)
    vocab_size: int
    chance: float  # per answer token, guessing uniformly over the answer alphabet

    def sizes(self, length: int) -> tuple[int, int]:
        """``(smallest, largest)`` size of an instance of at most ``length + 1`` tokens;
        largest < smallest when none fits."""
        raise NotImplementedError

    def make(self, rng: np.random.Generator, size: int, source: np.ndarray | None) -> Instance:
        raise NotImplementedError

    def check_length(self, length: int, what: str = "length") -> tuple[int, int]:
        """:meth:`sizes`, or one error line if no instance fits ``length``."""
        lo, hi = self.sizes(length)
        if hi < lo:
            need = next(n for n in range(length + 1, 1 << 30) if self.sizes(n)[1] >= lo)
            raise RelposError(f"task={self.name} needs a {what} of at least {need} tokens "
                              f"(its smallest instance with these options), got {length}")
        return lo, hi

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in options_of(type(self))}


def register(name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def available() -> list[str]:
    """Names of the tasks (``lm``, the corpus LM, is not a task here)."""
    return sorted(_REGISTRY)


def lookup(name: str) -> type[Task]:
    if name not in _REGISTRY:
        raise RelposConfigError(f"unknown task {name!r}; available: lm, {', '.join(available())}")
    return _REGISTRY[name]


def options_of(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def defaults(name: str) -> dict[str, Any]:
    """A task's options with their constructor defaults (written once, there)."""
    params = inspect.signature(lookup(name).__init__).parameters
    return {k: params[k].default for k in options_of(lookup(name))}


def build(name: str, **options) -> Task:
    """The task ``name`` with ``options``; an unknown option is one line naming the valid
    ones (each constructor checks its values)."""
    cls = lookup(name)
    valid = options_of(cls)
    for key in options:
        if key not in valid:
            raise RelposConfigError(f"{key!r} is not an option of task {name!r}; valid "
                                    f"options: {', '.join(valid) or 'none'}")
    return cls(**options)


# ----------------------------------------------------------------------------- batches


def pack(instances: list[Instance], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows padded to ``length + 1`` tokens: ``tokens [B, length+1]`` int32 and loss
    ``weights [B, length]`` float32 (1 where target ``t + 1`` is an answer token)."""
    tokens = np.full((len(instances), length + 1), pad_id, np.int32)
    answer = np.zeros((len(instances), length + 1), bool)
    for i, inst in enumerate(instances):
        n = len(inst.tokens)
        if n > length + 1:
            raise ValueError(f"instance of {n} tokens does not fit length {length}")
        tokens[i, :n], answer[i, :n] = inst.tokens, inst.answer
    return tokens, answer[:, 1:].astype(np.float32)


def model_inputs(task: Task, tokens: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
    """What the model reads of a packed batch, ``[B, length]``: None (read
    ``tokens[:, :-1]``) unless the task has a :attr:`Task.blank_id`; then every answer
    token among the inputs is replaced by it, so no answer token is predicted from
    another. Input ``t`` is an answer token exactly when target ``t - 1`` is scored."""
    if task.blank_id is None:
        return None
    inputs = tokens[:, :-1].copy()
    inputs[:, 1:][weights[:, :-1] > 0] = task.blank_id
    return inputs


def train_batch(task: Task, *, seed: int, step: int, batch_size: int, length: int,
                source: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of ``step``: sizes uniform over :meth:`Task.sizes` of
    ``length``; ``(tokens [B, length+1], weights [B, length])``, from (seed, step) only
    (:func:`model_inputs` gives what the model reads of it)."""
    lo, hi = task.check_length(length, "train.length")
    rng = np.random.default_rng([seed, step, _TRAIN_STREAM])
    sizes = rng.integers(lo, hi + 1, size=batch_size)
    return pack([task.make(rng, int(s), source) for s in sizes], length, task.pad_id)


def test_instances(task: Task, *, length: int, examples: int, start: int = 0,
                   source: np.ndarray | None = None) -> list[Instance]:
    """Test instances ``start .. start+examples-1`` at ``length``: each of the largest
    size that fits, drawn from (length, index) alone, so every run (any seed, any scheme)
    is scored on the same sequences, and the first N of a larger set are the N of a
    smaller one."""
    _, hi = task.check_length(length, "test length")
    return [task.make(np.random.default_rng([_TEST_STREAM, length, i]), hi, source)
            for i in range(start, start + examples)]
