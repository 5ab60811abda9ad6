"""Extrapolation evaluation: perplexity protocols and the bias profile of a trained model."""

from relpos.evaluation.profile import bias_profile, save_bias_profile
from relpos.evaluation.protocols import (
    MODES,
    check_eval_config,
    check_lengths_fit,
    check_positions_reach,
    eval_lengths,
    evaluate,
    make_nll_fn,
    quick_val_loss,
    window_plan,
)

__all__ = ["MODES", "bias_profile", "check_eval_config", "check_lengths_fit",
           "check_positions_reach", "eval_lengths", "evaluate", "make_nll_fn",
           "quick_val_loss", "save_bias_profile", "window_plan"]
