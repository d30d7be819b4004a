"""SRPO's routing of a group's rollouts between GRPO and distillation (METHODS §17). Pure torch.

Source: abstract (Li et al. 2604.02288); the weighting is a reconstruction.

- Route: rollout ``i`` is *correct* when ``R_i > 0`` (verifier outcome in {0, 1}); correct
  rows take the GRPO advantage, failed rows the per-token distillation advantage.
- Teacher confidence: ``w_t = 1 − H^T_t / log V`` (clamped to [0, 1]), mean-normalized
  over the failed rows' kept tokens: ``ŵ_t = w_t / mean_{failed}(w)``, so the weights
  redistribute the distillation mass among the failed tokens without changing its total
  (``Σ_failed ŵ_t = N_failed``). If every failed token has ``w = 0`` (a uniform teacher) the
  weights are all 0.
"""

from __future__ import annotations

import torch

from opd.losses import grpo_advantages
from opd.signals.opd import floored_log_ratio_BT


def route_BT(rewards_B: torch.Tensor, mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(correct_BT, failed_BT)``: kept tokens of rows with ``R > 0`` / ``R <= 0`` (bool)."""
    correct_B = rewards_B > 0
    mask_BT = mask_BT.bool()
    return mask_BT & correct_B[:, None], mask_BT & ~correct_B[:, None]


def confidence_BT(entropy_BT: torch.Tensor, log_vocab: float | torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``w_t = clamp(1 − H^T_t / log V, 0, 1)`` on kept tokens, 0 elsewhere.

    ``log_vocab`` is ``log V`` (a scalar, or ``[B]`` per row); ``V > 1``."""
    log_v = torch.as_tensor(log_vocab, dtype=entropy_BT.dtype, device=entropy_BT.device)
    if log_v.dim() == 1:
        log_v = log_v[:, None]
    w_BT = (1.0 - entropy_BT / log_v).clamp(0.0, 1.0).nan_to_num(nan=0.0)  # undefined entropy: no confidence
    return torch.where(mask_BT.bool(), w_BT, 0.0)


def mean_normalize_BT(w_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``w_t / mean_{mask}(w)`` on kept tokens, 0 elsewhere; all 0 when the mean is 0 or
    nothing is kept."""
    mask_BT = mask_BT.bool()
    w_BT = torch.where(mask_BT, w_BT, 0.0)
    mean = w_BT.sum() / mask_BT.sum().clamp(min=1)
    return w_BT / mean.clamp(min=torch.finfo(w_BT.dtype).tiny)


def group_advantages_B(rewards_B: torch.Tensor, group_size: int, *, scale: str) -> torch.Tensor:
    """GRPO advantages ``(R_i − mean_g R) / (std_g R + ε)`` for rows grouped contiguously
    in groups of ``group_size`` -> ``[B]`` (see :func:`opd.losses.grpo_advantages`)."""
    return grpo_advantages(rewards_B.view(-1, group_size), scale=scale).reshape(-1)


def srpo_advantages_BT(
    rewards_B: torch.Tensor,
    group_size: int,
    sampler_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    kl_coef: float,
    adv_scale: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grpo_adv_BT, distill_adv_BT)``, each 0 off its own rows' kept tokens:

    ``A^GRPO_{i,t} = (R_i − mean_g R)/(std_g R + ε)`` on correct rows;
    ``A^D_t = −c·(log π_sampler(y_t) − log π_T(y_t))`` on failed rows (per-token OPD; the
    teacher's log-prob under :mod:`opd.signals.teacher_logp`'s floor)."""
    correct_BT, failed_BT = route_BT(rewards_B, mask_BT)
    adv_B = group_advantages_B(rewards_B, group_size, scale=adv_scale).to(sampler_logp_BT.dtype)
    grpo_BT = torch.where(correct_BT, adv_B[:, None].expand_as(correct_BT), 0.0)
    distill_BT = torch.where(failed_BT, -kl_coef * floored_log_ratio_BT(sampler_logp_BT, teacher_logp_BT, failed_BT), 0.0)
    return grpo_BT, distill_BT
