"""TIP token selection (Xu et al., 2604.14084; third-party audit; METHODS §7). Pure torch.

    ĥ_t = (h_t − min h) / (max h − min h),  d̂_t likewise    (over the batch's kept tokens)
    s_t = ĥ_t + d̂_t − ĥ_t·d̂_t                                (soft OR)
    keep the ⌈ρ·N⌉ tokens with the largest s_t               (N = kept tokens before selection)

``h`` is the student's entropy and ``d`` the teacher-student divergence per token.
"""

from __future__ import annotations

import math

import torch

_BIG = 1e300  # non-finite inputs are clamped to ±this (float64) before normalizing


def minmax_normalize(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``(v − min) / (max − min)`` over the masked-in entries -> ``[B, T]`` in [0, 1].

    0 outside the mask, and everywhere when ``max == min`` (no spread: nothing stands out)
    or nothing is masked in. ``±inf`` count as ``±1e300`` and NaN as 0; computed in float64.
    """
    m_BT = mask_BT.bool()
    v_BT = torch.nan_to_num(values_BT.detach().double(), nan=0.0, posinf=_BIG, neginf=-_BIG)
    if not bool(m_BT.any()):
        return torch.zeros_like(v_BT)
    lo, hi = v_BT[m_BT].min(), v_BT[m_BT].max()
    if not bool(hi > lo):
        return torch.zeros_like(v_BT)
    return torch.where(m_BT, (v_BT - lo) / (hi - lo), 0.0)


def tip_score(entropy_BT: torch.Tensor, divergence_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``s = ĥ + d̂ − ĥ·d̂`` (both min-max normalized over the mask) -> ``[B, T]`` float64, 0 off the mask."""
    h_BT = minmax_normalize(entropy_BT, mask_BT)
    d_BT = minmax_normalize(divergence_BT, mask_BT)
    return h_BT + d_BT - h_BT * d_BT


def keep_count(rho: float, n: int) -> int:
    """``⌈ρ·n⌉`` (rounded to 9 digits first, so that 0.3·10 keeps 3, not 4)."""
    return min(n, math.ceil(round(rho * n, 9)))


def keep_top_fraction(score_BT: torch.Tensor, mask_BT: torch.Tensor, rho: float) -> torch.Tensor:
    """``[B, T]`` bool: the ``⌈ρ·N⌉`` masked-in tokens with the largest score.

    Ties are broken by position (row-major order, earlier first), so the choice is
    deterministic. Tokens outside ``mask_BT`` are never kept.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    m_BT = mask_BT.bool()
    flat_idx = m_BT.flatten().nonzero().squeeze(-1)
    n_keep = keep_count(rho, flat_idx.numel())
    order = torch.sort(score_BT.flatten()[flat_idx], descending=True, stable=True).indices
    keep = torch.zeros(m_BT.numel(), dtype=torch.bool, device=m_BT.device)
    keep[flat_idx[order[:n_keep]]] = True
    return keep.view_as(m_BT)
