"""Prune-OPD shaping: top-K compatibility, drift events, reliability, the adaptive budget.

Source: reconstruction (METHODS §12, Yang et al. 2605.07804, abstract only)::

    o_t = |TopK_theta(c_t) ∩ TopK_T(c_t)| / k           compatibility (ties as a set, below)
    d_t = 1[o_t < delta]                                  drift event (generated tokens only)
    D_t = Σ_{t' <= t} d_{t'},   w_t = eta^{D_t}            reliability (monotone non-increasing)
    keep_t = 1[w_t >= w_min]                              supervision stops once w_t < w_min
    L_eff = Σ_t keep_t                                    reliable length (a prefix of the row)
    r_t = −c · δ_t,  A_t = Σ_{t'>=t, kept} γ^{t'−t} w_t' r_t'

Ties are ties: when teacher log-probs tie at the k-th largest value, every choice of the
tied ids completes an equally valid top-k, and :func:`tied_topk_overlap_BT` takes the one
that agrees most with the student, so the overlap never depends on the order in which
``topk`` breaks ties (the noise-free testbed oracle ties every word but the intended one).

Pure torch: no models, no config.
"""

from __future__ import annotations

import math

import torch


from opd.signals.opd import TEACHER_LOGP_FLOOR, floored_log_ratio_BT  # noqa: F401  (re-exported)
from opd.signals.teacher_logp import TIE_TOL


def topk_overlap_BT(student_ids_BTK: torch.Tensor, teacher_ids_BTK: torch.Tensor) -> torch.Tensor:
    """``o_t = |S_t ∩ T_t| / k`` with ``k = student_ids_BTK.shape[-1]``; ids within a set are
    distinct (as ``topk`` gives them). The teacher set may be of another size."""
    hits_BTK = (student_ids_BTK[..., :, None] == teacher_ids_BTK[..., None, :]).any(-1)
    return hits_BTK.sum(-1).double() / student_ids_BTK.shape[-1]


def tied_topk_overlap_BT(student_ids_BTK: torch.Tensor, teacher_logp_BTV: torch.Tensor, tol: float = TIE_TOL) -> torch.Tensor:
    """``o_t = max_T |S_t ∩ T| / k`` over the teacher's top-``k`` sets ``T`` (``k`` =
    ``student_ids_BTK.shape[-1]``) -> ``[B, T]`` float64.

    ``A`` = ids strictly above the teacher's k-th largest log-prob (``> c + tol``): in every
    top-k; ``G`` = ids tied with it (within ``tol``): any ``k − |A|`` of them complete one. So
    ``o_t = (|S∩A| + min(|S∩G|, k − |A|)) / k``; without ties this is ``|S ∩ TopK_T| / k``.
    The student's ids are a model's top-k (``torch.topk``; a model's logits do not tie in
    practice), distinct. ``teacher_logp_BTV``: the teacher's full log-probs (floored, no NaN).
    """
    k = student_ids_BTK.shape[-1]
    kth_BT1 = teacher_logp_BTV.topk(k, dim=-1).values[..., -1:]
    above_BTV = teacher_logp_BTV > kth_BT1 + tol
    tied_BTV = (teacher_logp_BTV >= kth_BT1 - tol) & ~above_BTV
    in_above_BT = above_BTV.gather(-1, student_ids_BTK).sum(-1)
    in_tied_BT = tied_BTV.gather(-1, student_ids_BTK).sum(-1)
    free_BT = k - above_BTV.sum(-1)
    return (in_above_BT + torch.minimum(in_tied_BT, free_BT)).double() / k


def drift_reliability_BT(
    overlap_BT: torch.Tensor, mask_BT: torch.Tensor, *, delta: float, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(drift_BT, w_BT)``: ``d_t = m_t·1[o_t < delta]`` and ``w_t = eta^{Σ_{t'<=t} d_{t'}}``.
    Masked positions are never drift events (``w`` carries over them)."""
    drift_BT = mask_BT.bool() & (overlap_BT < delta)
    count_BT = drift_BT.long().cumsum(-1)
    return drift_BT, torch.pow(float(eta), count_BT.double())


def reliable_mask_BT(w_BT: torch.Tensor, mask_BT: torch.Tensor, *, w_min: float) -> torch.Tensor:
    """``keep_t = m_t · 1[w_t >= w_min]``: every token from the first one whose reliability
    fell below ``w_min`` on is dropped (``w`` never rises again)."""
    return mask_BT.bool() & (w_BT >= w_min)


def next_budget(
    budget: int,
    reliable_len_B: torch.Tensor,
    generated_len_B: torch.Tensor,
    *,
    grow: float,
    quantile: float,
    majority: float = 0.5,
) -> int:
    """The next step's generation budget from this step's reliable lengths.

    If more than ``majority`` of the rollouts stayed reliable through everything they
    generated (``L_eff == n``: they reached the cap or their EOS unpruned), grow:
    ``ceil(budget · grow)``. Otherwise shrink to the ``quantile`` (linear interpolation)
    of ``L_eff``, never above ``budget``. The caller clamps to ``[1, cap]``.
    """
    if reliable_len_B.numel() == 0:
        return budget
    reliable_B = reliable_len_B >= generated_len_B
    if float(reliable_B.double().mean()) > majority:
        return math.ceil(budget * grow)
    q = float(torch.quantile(reliable_len_B.double(), quantile))
    return min(budget, math.ceil(q))
