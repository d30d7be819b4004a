"""Pure tensor math: divergences and policy-gradient surrogates (imports torch only)."""

from opd.losses.chunked import chunked_divergence, chunked_divergence_loss
from opd.losses.divergence import divergence, divergence_from_logp, entropy, log_softmax_t
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
from opd.losses.sparse import chunked_sparse_divergence, sparse_divergence

__all__ = [
    "chunked_divergence",
    "chunked_divergence_loss",
    "divergence_from_logp",
    "entropy",
    "log_softmax_t",
    "clamp_log_ratio",
    "discounted_returns",
    "divergence",
    "grpo_advantages",
    "importance_sampling_loss",
    "masked_row_mean",
    "masked_sequence_mean",
    "masked_token_mean",
    "perplexity",
    "ppo_clip_loss",
    "sequence_mean_logp",
    "sparse_divergence",
    "chunked_sparse_divergence",
]
