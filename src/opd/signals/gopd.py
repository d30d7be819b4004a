"""G-OPD / ExOPD's extrapolated per-token advantage (METHODS §18). Pure torch.

    A_t = λ·(log π_T(y_t) − log π_ref(y_t)) − (log π_θ(y_t) − log π_ref(y_t))

computed in the algebraically equal form

    A_t = (log π_T(y_t) − log π_θ(y_t)) + (λ − 1)·(log π_T(y_t) − log π_ref(y_t))

so that ``λ = 1`` is bit-for-bit standard OPD's advantage ``−(log π_θ − log π_T)`` (the
reference cancels exactly instead of up to rounding). ``λ > 1`` extrapolates the reward
past the teacher (≈1.25 in the paper; unstable near 1.5), ``λ < 1`` interpolates toward
the reference. ``log π_θ`` is the sampler's log-prob (detached). Source: paper abstract
and a summary equation (Yang et al. 2602.12125).
"""

from __future__ import annotations

import torch

from opd.signals.teacher_logp import floor_logp


@torch.no_grad()
def gopd_advantages_BT(
    sampler_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    ref_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """``A_t`` (module doc) on kept tokens, 0 elsewhere (masked garbage, even ``-inf``,
    does not leak); detached."""
    mask_BT = mask_BT.bool()
    teacher_logp_BT = floor_logp(teacher_logp_BT)  # a -inf (or NaN) token stays finite
    ref_logp_BT = floor_logp(ref_logp_BT)
    opd_BT = torch.where(mask_BT, teacher_logp_BT - sampler_logp_BT, 0.0)
    gap_BT = torch.where(mask_BT, teacher_logp_BT - ref_logp_BT, 0.0)
    return opd_BT + (lam - 1.0) * gap_BT
