"""Position schemes: a registry of interchangeable, self-contained modules.

Contract (see README): :func:`available` lists names; :func:`build` returns an
initialised scheme; additive schemes expose ``.bias(q_pos, k_pos)`` returning a float32
array ``[num_heads, len(q_pos), len(k_pos)]``. Schemes that read the content or replace
the softmax use the score hooks of :mod:`relpos.positions.base`.
"""

from relpos.positions.base import (
    LAYER_HOOKS,
    SCORE_HOOKS,
    CumulativeBias,
    PositionScheme,
    PositionTable,
    RelposConfigError,
    ScoreBlock,
)
from relpos.positions.registry import available, build, lookup, options_of, register

# Importing the built-in families registers them.
from relpos.positions import (  # noqa: E402,F401  isort: skip
    absolute, alibi, cope, dape, fire, fox, kerple, none, offset, rotary, sandwich,
    ssmax, stickbreaking, t5,
)

__all__ = [
    "LAYER_HOOKS", "SCORE_HOOKS", "PositionTable", "PositionScheme", "RelposConfigError",
    "CumulativeBias", "ScoreBlock",
    "available", "build", "lookup", "options_of", "register",
]
