"""Pure tensor math: divergences and policy-gradient surrogates (imports torch only)."""

from opd.losses.pg import (
    clamp_log_ratio,
    discounted_returns,
    grpo_advantages,
    importance_sampling_loss,
    perplexity,
    ppo_clip_loss,
    sequence_mean_logp,
)
from opd.losses.reduce import masked_row_mean, masked_sequence_mean, masked_token_mean

__all__ = [
    "clamp_log_ratio",
    "discounted_returns",
    "grpo_advantages",
    "importance_sampling_loss",
    "masked_row_mean",
    "masked_sequence_mean",
    "masked_token_mean",
    "perplexity",
    "ppo_clip_loss",
    "sequence_mean_logp",
]
