"""Extrapolation evaluation: perplexity protocols, the attention mass beyond the training
length, and the bias profile of a trained model."""

from relpos.evaluation.attention import attention_far_mass
from relpos.evaluation.profile import bias_profile, save_bias_profile, table_coverage
from relpos.evaluation.protocols import (
    MODES,
    check_eval_config,
    check_lengths_fit,
    check_positions_reach,
    eval_lengths,
    evaluate,
    make_nll_fn,
    quick_val_loss,
    ratio_ci,
    target_blocks,
    window_plan,
    with_key_window,
)
from relpos.evaluation.tasks import (
    check_task_eval,
    evaluate_passkey,
    evaluate_task,
    passkey_lengths,
    score_task_length,
    task_lengths,
    wilson_interval,
)

__all__ = ["MODES", "attention_far_mass", "bias_profile", "check_eval_config", "check_lengths_fit",
           "check_positions_reach", "eval_lengths", "evaluate", "make_nll_fn",
           "quick_val_loss", "ratio_ci", "save_bias_profile", "table_coverage", "target_blocks",
           "window_plan", "check_task_eval", "evaluate_passkey", "evaluate_task", "passkey_lengths",
           "score_task_length", "task_lengths",
           "wilson_interval", "with_key_window"]
