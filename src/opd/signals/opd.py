"""The per-token OPD reward, shared by every method built on it (METHODS §1-2)."""

from __future__ import annotations

import torch

TEACHER_LOGP_FLOOR = -100.0


def floored_log_ratio_BT(sampler_logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``δ_t = log pi_sampler(y_t) − max(log pi_T(y_t), -100)`` on the mask, 0 elsewhere. The
    floor only binds for a teacher that gives a sampled token (near) zero probability
    (``-inf``), where the unfloored OPD reward would be infinite; padding never leaks NaN."""
    delta_BT = sampler_logp_BT - teacher_logp_BT.clamp(min=TEACHER_LOGP_FLOOR)
    return torch.where(mask_BT.bool(), delta_BT, 0.0)
