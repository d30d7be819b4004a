"""Entropy-aware OPD routing (Jin et al., 2603.07079; third-party audit of the code; METHODS §9).

    u_t = 1[H^T_t > τ_H]                                  (the teacher is uncertain)
    add    (code): ℓ_t = OPD_t + λ·u_t·FKL^K_t
    switch (blog): ℓ_t = (1 − u_t)·OPD_t + λ·u_t·FKL^K_t

``OPD_t`` is the per-token OPD loss (any surrogate) and ``FKL^K_t`` the forward KL on the
teacher's top-K. The threshold is either absolute (``τ_H`` in nats, the code's 0.8) or a
quantile of the step's own teacher entropies: ``u_t = 1[H^T_t ≥ q_ρ(H^T)]``, the top
``1 − ρ`` share of the step's tokens, ties at the threshold included (a teacher whose
entropy is the same everywhere makes every token uncertain, never none). Pure torch.
"""

from __future__ import annotations

import torch

MODES = ("add", "switch")


def uncertain_mask(teacher_entropy_BT: torch.Tensor, tau: float) -> torch.Tensor:
    """``[B, T]`` bool ``H^T_t > τ_H`` (NaN counts as certain)."""
    return teacher_entropy_BT > tau


def entropy_quantile(teacher_entropy_BT: torch.Tensor, mask_BT: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile (linear interpolation, as ``torch.quantile``) of the finite
    entropies on ``mask_BT`` -> 0-dim tensor; ``+inf`` when there are none. Sorts, so it
    has no size limit."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    h = teacher_entropy_BT[mask_BT.bool() & torch.isfinite(teacher_entropy_BT)].double().sort().values
    if h.numel() == 0:
        return torch.tensor(float("inf"), dtype=torch.float64)
    pos = q * (h.numel() - 1)
    lo, hi = int(pos), min(int(pos) + 1, h.numel() - 1)
    return h[lo] + (h[hi] - h[lo]) * (pos - lo)


def routed_mask(teacher_entropy_BT: torch.Tensor, mask_BT: torch.Tensor, *, tau: float | None, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u_BT, threshold)``: ``H > τ`` with an absolute ``tau``, else ``H ≥`` the step's
    ``quantile`` (module doc); ``u`` is False off ``mask_BT`` and where ``H`` is NaN."""
    m_BT = mask_BT.bool()
    if tau is not None:
        return uncertain_mask(teacher_entropy_BT, tau) & m_BT, torch.tensor(float(tau), dtype=torch.float64)
    threshold = entropy_quantile(teacher_entropy_BT, m_BT, quantile)
    return (teacher_entropy_BT.double() >= threshold) & m_BT, threshold


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
