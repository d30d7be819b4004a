"""Masked reductions of per-token values: how a per-token loss becomes a scalar.

Conventions shared by every function here:

- ``mask_BT`` is bool (or 0/1). Masked positions are *selected away* with
  ``torch.where``, never multiplied by 0, so garbage there (even ``nan``/``inf``)
  reaches neither the value nor the gradient of the inputs' unmasked entries.
- Half-precision (and integer/bool) inputs are summed in float32 and the result is
  float32 (see :func:`upcast`); float32/float64 inputs keep their dtype.
- Nothing to average (all masked, or a normalizer of 0) gives 0, still attached to
  the graph (its gradient is 0), never ``nan``.
"""

from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision (or integer/bool) ``x`` as float32, differentiably; float32/64 unchanged."""
    return x.float() if x.dtype in _HALF or not x.is_floating_point() else x


def _positive_or_one(n: torch.Tensor) -> torch.Tensor:
    return torch.where(n > 0, n, torch.ones_like(n))


def masked_row_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean of each row over its unmasked positions -> ``[B]``; 0 for a fully masked row.

    ``out_b = Σ_t m_bt v_bt / max(Σ_t m_bt, 1)``.
    """
    m_BT = mask_BT.bool()
    sum_B = torch.where(m_BT, upcast(values_BT), 0.0).sum(-1)
    return sum_B / m_BT.sum(-1).clamp(min=1)


def masked_token_mean(
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Token mean: ``Σ_bt m_bt v_bt / N`` -> scalar (METHODS cross-cutting rule 4).

    Source: METHODS.md rule 4 (token-mean over the generated tokens of the whole
    optimizer step, across gradient accumulation and ranks).

    ``N`` defaults to ``mask_BT.sum()`` (this batch's token mean). The trainer passes
    the count of kept tokens of the whole optimizer step (all micro-batches, all
    ranks) so that the micro-batch results *add up* to the step's token mean.
    ``N`` must be >= 0; ``N == 0`` (nothing kept) returns the masked sum, i.e. 0.
    """
    if isinstance(normalizer, (int, float)) and not normalizer >= 0:
        raise ValueError(f"normalizer must be >= 0, got {normalizer}")
    total = torch.where(mask_BT.bool(), upcast(values_BT), 0.0).sum()
    if normalizer is None:
        n = mask_BT.bool().sum().to(total.dtype)
    else:
        n = torch.as_tensor(normalizer, dtype=total.dtype, device=total.device)
    return total / _positive_or_one(n)


def masked_sequence_mean(
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    num_sequences: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequence mean of token means: ``Σ_b mean_t(v_b·) / S`` -> scalar.

    Source: an alternative normalization (per-sequence mean, then mean over
    sequences, as in the GRPO paper and OPSD's "mean over the sequence"); it weights
    every sequence equally whatever its length, unlike :func:`masked_token_mean`.

    Each row is averaged over its unmasked positions (a fully masked row gives 0
    and does not count). ``S`` defaults to the number of rows with at least one
    unmasked position; for gradient accumulation pass the step's count of such rows
    so that micro-batch results add up. ``S == 0`` returns 0.
    """
    mean_B = masked_row_mean(values_BT, mask_BT)
    if num_sequences is None:
        s = (mask_BT.bool().sum(-1) > 0).sum().to(mean_B.dtype)
    else:
        s = torch.as_tensor(num_sequences, dtype=mean_B.dtype, device=mean_B.device)
    return mean_B.sum() / _positive_or_one(s)
