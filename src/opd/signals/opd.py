"""The per-token OPD reward, shared by every method built on it (METHODS §1-2)."""

from __future__ import annotations

import torch

from opd.signals.teacher_logp import TEACHER_LOGP_FLOOR, floor_logp  # noqa: F401  (re-exported)


def floored_log_ratio_BT(sampler_logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``δ_t = log pi_sampler(y_t) − max(log pi_T(y_t), -100)`` on the mask, 0 elsewhere. The
    floor (:mod:`opd.signals.teacher_logp`: a NaN or ``-inf`` teacher log-prob is a zero
    probability, clipped at -100 nats) only binds for a teacher that gives a sampled token
    (near) zero probability, where the unfloored OPD reward would be infinite; padding never
    leaks NaN."""
    delta_BT = sampler_logp_BT - floor_logp(teacher_logp_BT)
    return torch.where(mask_BT.bool(), delta_BT, 0.0)
