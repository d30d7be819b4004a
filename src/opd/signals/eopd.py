"""Entropy-aware OPD routing (Jin et al., 2603.07079; third-party audit of the code; METHODS §9).

    u_t = 1[H^T_t > τ_H]                                  (the teacher is uncertain)
    add    (code): ℓ_t = OPD_t + λ·u_t·FKL^K_t
    switch (blog): ℓ_t = (1 − u_t)·OPD_t + λ·u_t·FKL^K_t

``OPD_t`` is the per-token OPD loss (any surrogate) and ``FKL^K_t`` the forward KL on the
teacher's top-K. Pure torch.
"""

from __future__ import annotations

import torch

MODES = ("add", "switch")


def uncertain_mask(teacher_entropy_BT: torch.Tensor, tau: float) -> torch.Tensor:
    """``[B, T]`` bool ``H^T_t > τ_H`` (NaN counts as certain)."""
    return teacher_entropy_BT > tau


def eopd_combine(
    opd_BT: torch.Tensor, fkl_BT: torch.Tensor, uncertain_BT: torch.Tensor, *, lam: float, mode: str
) -> torch.Tensor:
    """Per-token loss of ``mode`` (module doc) -> ``[B, T]``.

    Terms are selected with ``torch.where`` (not multiplied by 0), so a non-finite value in
    a term that is switched off does not reach the value.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    u_BT = uncertain_BT.bool()
    extra_BT = torch.where(u_BT, lam * fkl_BT, torch.zeros_like(fkl_BT))
    base_BT = opd_BT if mode == "add" else torch.where(u_BT, torch.zeros_like(opd_BT), opd_BT)
    return base_BT + extra_BT
