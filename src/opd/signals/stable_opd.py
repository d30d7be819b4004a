"""StableOPD's per-term normalization on one mixed batch (METHODS §11). Pure torch.

The batch holds ``R`` rollout rows and ``G`` golden-solution rows; ``gold_B`` marks the
golden ones. The loop reduces ``loss_BT`` by the token mean over *all* kept tokens of the
step, ``N = N_roll + N_gold``. Each term is meant as a mean over its own tokens:

    L = (1/N_roll) Σ_{roll} ℓ^OPD_t + λ_gold (1/N_gold) Σ_{gold} ℓ^SFT_t
        + β_KL (1/N_roll) Σ_{roll} KL_t

so the per-token loss handed to the loop is

    loss_t = w^roll_t (ℓ^OPD_t + β_KL KL_t) + λ_gold w^gold_t ℓ^SFT_t,
    w^roll_t = [t ∈ roll] · N / N_roll,   w^gold_t = [t ∈ gold] · N / N_gold,

and ``(1/N) Σ_t loss_t`` is exactly ``L``. ``N``, ``N_roll``, ``N_gold`` are counts of the
whole step (the signal is built before micro-batching), so the micro-batch results add up.
A side with no tokens gets weight 0 (its term is absent, not ``nan``).
"""

from __future__ import annotations

import torch


def term_weights_BT(mask_BT: torch.Tensor, gold_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w^roll_BT, w^gold_BT)``: ``N/N_roll`` on rollout tokens and ``N/N_gold`` on golden
    tokens (0 elsewhere), float32 (module doc)."""
    mask_BT = mask_BT.bool()
    gold_BT = mask_BT & gold_B.bool()[:, None]
    roll_BT = mask_BT & ~gold_BT
    n = mask_BT.sum().float()
    n_roll, n_gold = roll_BT.sum().float(), gold_BT.sum().float()
    w_roll = torch.where(n_roll > 0, n / n_roll.clamp(min=1), 0.0)
    w_gold = torch.where(n_gold > 0, n / n_gold.clamp(min=1), 0.0)
    return roll_BT.float() * w_roll, gold_BT.float() * w_gold


def combined_loss_BT(
    opd_BT: torch.Tensor,
    kl_BT: torch.Tensor,
    nll_BT: torch.Tensor,
    roll_w_BT: torch.Tensor,
    gold_w_BT: torch.Tensor,
    *,
    gold_coef: float,
    ref_kl_coef: float,
) -> torch.Tensor:
    """``w^roll (ℓ^OPD + β_KL KL) + λ_gold w^gold ℓ^SFT`` per token; each term is selected
    (``torch.where``) only where its weight is non-zero, so garbage on the other rows
    reaches neither the value nor the gradient."""
    roll = torch.where(roll_w_BT > 0, roll_w_BT * (opd_BT + ref_kl_coef * kl_BT), 0.0)
    gold = torch.where(gold_w_BT > 0, gold_coef * gold_w_BT * nll_BT, 0.0)
    return roll + gold
