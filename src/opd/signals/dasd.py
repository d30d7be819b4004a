"""DASD's entropy router and routed advantage (Zhang et al. 2605.22263; METHODS §10).

Source: third-party equation summary; the quantile side (how ``τ_ρ`` and ``σ_H`` are taken
per trajectory) is a *reconstruction*. Pure torch; every statistic is per row (one
trajectory) over its kept tokens ``m``.

With ``H_t`` the student's entropy at ``c_t`` and the teacher-minus-student log-ratio of the
sampled token ``d_t = log π_T(y_t|x, y*, c_t) − log π_θ(y_t|c_t)`` (= ``−δ_t`` in METHODS'
notation; the sign is chosen so that a positive routed term *raises* ``log π_θ(y_t)`` where
the teacher likes ``y_t`` more than the student, i.e. attracts toward the teacher)::

    τ_ρ   = quantile_{1−ρ}(H_t : m_t)               (linear interpolation, numpy's default)
    σ_H   = mean_t |H_t − mean_t H_t|                (mean absolute deviation)
    d̄_t   = d_t / mean_t |d_t|
    ω_t   = tanh((τ_ρ − H_t) / σ_H) · sigmoid(|d̄_t| − 1)
    Â_t   = A_G + β · ω_t · d̄_t

``ω_t > 0`` below the entropy threshold (confident tokens, the lower ``1−ρ`` share):
``Â`` moves toward the teacher; ``ω_t < 0`` at high-entropy forks: away from it. The
sigmoid gates by how large the normalized disagreement is. ``σ_H`` and ``mean|d|`` are
floored at ``eps`` (a constant row gives ``ω = 0`` / ``d̄ = 0``); ``d_t`` is clamped to
``±log_ratio_limit`` (an overflow guard, METHODS rule 6) after the teacher's log-prob is
floored (:mod:`opd.signals.teacher_logp`: NaN or ``−inf`` is a zero probability), and an
undefined student ``inf − inf`` is 0.
Everything returned is detached and 0 where masked.
"""

from __future__ import annotations

import torch

from opd.losses import clamp_log_ratio
from opd.losses.reduce import upcast
from opd.signals.teacher_logp import floor_logp

EPS = 1e-6
LOG_RATIO_LIMIT = 20.0


@torch.no_grad()
def teacher_log_ratio(
    teacher_logp_BT: torch.Tensor, student_logp_BT: torch.Tensor, mask_BT: torch.Tensor, limit: float = LOG_RATIO_LIMIT
) -> torch.Tensor:
    """``d_t = clamp(log π_T − log π_θ, ±limit)``, 0 where masked or undefined -> ``[B, T]``."""
    d_BT = floor_logp(upcast(teacher_logp_BT)) - upcast(student_logp_BT)
    d_BT = clamp_log_ratio(torch.where(torch.isnan(d_BT), 0.0, d_BT), limit)
    return torch.where(mask_BT.bool(), d_BT, 0.0)


def _row_mean(values_BT: torch.Tensor, m_BT: torch.Tensor) -> torch.Tensor:
    return torch.where(m_BT, values_BT, 0.0).sum(-1) / m_BT.sum(-1).clamp(min=1)


@torch.no_grad()
def normalized_log_ratio(log_ratio_BT: torch.Tensor, mask_BT: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``d̄_t = d_t / max(mean_t |d_t|, eps)`` per row -> ``[B, T]``, 0 where masked."""
    m_BT = mask_BT.bool()
    scale_B = _row_mean(log_ratio_BT.abs(), m_BT).clamp(min=eps)
    return torch.where(m_BT, log_ratio_BT / scale_B[:, None], 0.0)


@torch.no_grad()
def entropy_threshold(entropy_BT: torch.Tensor, mask_BT: torch.Tensor, rho: float) -> torch.Tensor:
    """``τ_ρ``: the ``(1−ρ)`` quantile of each row's kept entropies -> ``[B]`` (0 for an empty row)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    x_BT = torch.where(mask_BT.bool(), entropy_BT.double(), float("nan"))
    tau_B = torch.nanquantile(x_BT, 1.0 - rho, dim=-1)
    return torch.nan_to_num(tau_B, nan=0.0).to(entropy_BT.dtype)


@torch.no_grad()
def mean_abs_deviation(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``σ = mean_t |v_t − mean_t v_t|`` per row over kept positions -> ``[B]`` (0 for an empty row)."""
    m_BT = mask_BT.bool()
    mean_B = _row_mean(values_BT, m_BT)
    return _row_mean((values_BT - mean_B[:, None]).abs(), m_BT)


@torch.no_grad()
def dasd_router(
    entropy_BT: torch.Tensor, norm_ratio_BT: torch.Tensor, mask_BT: torch.Tensor, *, rho: float, eps: float = EPS
) -> torch.Tensor:
    """``ω_t = tanh((τ_ρ − H_t)/σ_H) · sigmoid(|d̄_t| − 1)`` -> ``[B, T]`` in (−1, 1), 0 where masked."""
    m_BT = mask_BT.bool()
    H_BT = torch.where(m_BT, entropy_BT, 0.0)
    tau_B = entropy_threshold(H_BT, m_BT, rho)
    sigma_B = mean_abs_deviation(H_BT, m_BT).clamp(min=eps)
    side_BT = torch.tanh((tau_B[:, None] - H_BT) / sigma_B[:, None])
    gate_BT = torch.sigmoid(norm_ratio_BT.abs() - 1.0)
    return torch.where(m_BT, side_BT * gate_BT, 0.0)


@torch.no_grad()
def dasd_advantages(
    group_adv_B: torch.Tensor, router_BT: torch.Tensor, norm_ratio_BT: torch.Tensor, mask_BT: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """``Â_t = A_G + β·ω_t·d̄_t`` -> ``[B, T]``, 0 where masked."""
    adv_BT = group_adv_B[:, None].to(router_BT.dtype) + beta * router_BT * norm_ratio_BT
    return torch.where(mask_BT.bool(), adv_BT, 0.0)
