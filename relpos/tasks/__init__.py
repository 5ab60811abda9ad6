"""Length-generalization tasks: sequences generated on the fly from (seed, step), with
the answer tokens marked for the loss and for scoring. Formats and vocabularies:
:mod:`relpos.tasks.synthetic` (copy, reverse, assoc_recall, flipflop, selective_copy)
and :mod:`relpos.tasks.passkey`; batches and the registry: :mod:`relpos.tasks.base`."""

from relpos.tasks import passkey, synthetic  # noqa: F401  (registers the tasks)
from relpos.tasks.base import (
    BOS,
    PAD,
    SEP,
    Instance,
    Task,
    available,
    build,
    defaults,
    lookup,
    model_inputs,
    pack,
    register,
    test_instances,
    train_batch,
)
from relpos.tasks.passkey import check_tokenizer

__all__ = ["BOS", "PAD", "SEP", "Instance", "Task", "available", "build", "check_tokenizer",
           "defaults", "lookup", "model_inputs", "pack", "register", "test_instances", "train_batch"]
