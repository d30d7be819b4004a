"""Prefix teach, suffix fade: teacher margin per step and a BIC-style downward change point.

Source: reconstruction (METHODS §13, Liu et al. 2605.13643, abstract only). Per token, with
``C_t`` the student's top-K candidate ids at ``c_t`` and ``ℓ_t(v) = log pi_T(v | c_t)``
(floored at :data:`LOGP_FLOOR` so that ``-inf`` log-probs stay finite):

    gap      (default):  g_t = ℓ_t(v_(1)) − ℓ_t(v_(2)),  v_(1), v_(2) the teacher's best two in C_t
    sampled:             g_t = ℓ_t(y_t) − max_{v ∈ C_t} ℓ_t(v)

``gap`` is how decisively the teacher separates the student's own candidates (the paper's
"local contrast"); ``sampled`` is how far the sampled token trails the teacher's favourite
candidate. Per step ``s`` (tokens up to and including a boundary token; the last step may be
open) the margins are averaged: ``m_s = mean_{t∈s} g_t``. On the ``n`` step means of a row a
single mean shift at ``τ`` (steps ``1..τ`` | ``τ+1..n``) is tested:

    RSS_0 = Σ_s (m_s − m̄)²,  RSS_1(τ) = Σ_{s<=τ} (m_s − m̄_L)² + Σ_{s>τ} (m_s − m̄_R)²
    τ* = argmin_{τ: m̄_R < m̄_L} RSS_1(τ)                     (downward shifts only)
    change  iff  n ≥ min_steps  and  n · log((RSS_0 + ε) / (RSS_1(τ*) + ε)) > penalty · log n

i.e. the Gaussian mean-shift BIC with a common variance, with ``penalty`` the number of extra
parameters charged (1: the second mean; 2 also counts the location). The loss keeps steps
``1..τ*`` and masks the rest (all steps when there is no change).

Pure torch: no models, no config.
"""

from __future__ import annotations

import math

import torch

from opd.signals.teacher_logp import TEACHER_LOGP_FLOOR as LOGP_FLOOR, floor_logp  # noqa: F401  (re-exported)
EPS = 1e-9


def candidate_logp_BTK(teacher_logits_BTV: torch.Tensor, ids_BTK: torch.Tensor) -> torch.Tensor:
    """``log softmax(teacher_logits)`` at the candidate ids, without a ``[B, T, V]`` copy."""
    logits = teacher_logits_BTV if teacher_logits_BTV.dtype == torch.float64 else teacher_logits_BTV.float()
    return logits.gather(-1, ids_BTK) - torch.logsumexp(logits, -1, keepdim=True)


def teacher_margin_BT(cand_logp_BTK: torch.Tensor, sampled_logp_BT: torch.Tensor, *, mode: str) -> torch.Tensor:
    """``gap``: best minus second-best teacher log-prob among the candidates; ``sampled``:
    the sampled token's teacher log-prob minus the best candidate's. Finite everywhere."""
    cand = floor_logp(cand_logp_BTK)
    if mode == "gap":
        if cand.shape[-1] < 2:
            raise ValueError("the 'gap' margin needs at least 2 candidates (fade_k >= 2)")
        top2 = cand.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if mode == "sampled":
        return floor_logp(sampled_logp_BT) - cand.max(-1).values
    raise ValueError(f"unknown margin mode {mode!r}; use 'gap' or 'sampled'")


def window_boundaries_BT(mask_BT: torch.Tensor, window: int) -> torch.Tensor:
    """Fixed windows when no boundary ids are known: token ``t`` ends a step iff ``(t+1) % window == 0``."""
    T = mask_BT.shape[-1]
    ends_T = (torch.arange(T, device=mask_BT.device) + 1) % window == 0
    return ends_T.expand_as(mask_BT).clone()


def segment_ids_BT(boundary_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Step index of every token: ``s_t = Σ_{t'<t} m_{t'} b_{t'}`` (a boundary token closes its
    own step). ``mask_BT`` is a prefix of each row, as a completion mask is."""
    ends_BT = (boundary_BT.bool() & mask_BT.bool()).long()
    return ends_BT.cumsum(-1) - ends_BT


def step_means_BS(values_BT: torch.Tensor, seg_BT: torch.Tensor, mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(means_BS, counts_BS)`` over ``S = T`` step slots (float64); empty slots hold 0."""
    m_BT = mask_BT.bool()
    seg = torch.where(m_BT, seg_BT, 0)
    vals = torch.where(m_BT, values_BT.double(), 0.0)
    sums_BS = torch.zeros(values_BT.shape, dtype=torch.float64, device=values_BT.device).scatter_add_(-1, seg, vals)
    counts_BS = torch.zeros_like(sums_BS).scatter_add_(-1, seg, m_BT.double())
    return sums_BS / counts_BS.clamp(min=1), counts_BS


def change_point_B(means_BS: torch.Tensor, valid_BS: torch.Tensor, *, penalty: float, min_steps: int = 3) -> torch.Tensor:
    """Steps kept per row: ``τ*`` where a downward change is accepted, else ``n`` (the row's
    step count). ``valid_BS`` marks the row's steps, a prefix of the slots."""
    v = valid_BS.bool()
    m = torch.where(v, means_BS.double(), 0.0)
    n_B = v.sum(-1)
    c1, c2 = m.cumsum(-1), (m * m).cumsum(-1)
    last = (n_B - 1).clamp(min=0)[:, None]
    tot1, tot2, n = c1.gather(-1, last), c2.gather(-1, last), n_B[:, None].double()
    tau = torch.arange(1, m.shape[-1] + 1, device=m.device, dtype=torch.float64)[None, :]
    right_n = (n - tau).clamp(min=1)
    left_mean, right_mean = c1 / tau, (tot1 - c1) / right_n
    rss1 = (c2 - c1 * left_mean).clamp(min=0) + ((tot2 - c2) - (tot1 - c1) * right_mean).clamp(min=0)
    rss0 = (tot2 - tot1 * tot1 / n.clamp(min=1)).clamp(min=0)
    allowed = (tau < n) & (right_mean < left_mean)
    rss1 = torch.where(allowed, rss1, math.inf)
    best, arg = rss1.min(-1)
    stat = n[:, 0] * torch.log((rss0[:, 0] + EPS) / (best + EPS))
    accept = (n_B >= min_steps) & allowed.any(-1) & (stat > penalty * torch.log(n[:, 0].clamp(min=1)))
    return torch.where(accept, arg + 1, n_B)


def fade_mask_BT(seg_BT: torch.Tensor, mask_BT: torch.Tensor, keep_steps_B: torch.Tensor) -> torch.Tensor:
    """``keep_t = m_t · 1[s_t < τ*]``: the loss mask with the faded suffix removed."""
    return mask_BT.bool() & (seg_BT < keep_steps_B[:, None])
