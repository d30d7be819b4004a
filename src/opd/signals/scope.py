"""SCOPE per-rollout weights and advantages (Zheng et al., 2604.10688; paper; METHODS §8).

Per prompt (group ``g``), the rollouts split by the verifier into correct ``Ω_c`` and
wrong ``Ω_w``. With ``PPL(y) = exp(−mean_t log π(y_t))``:

    correct i ∈ Ω_c:  w_i ∝ PPL_S(y_i)^{1/τ}   = exp(−mean_t log π_S(y_t) / τ)
    wrong   i ∈ Ω_w:  w_i ∝ PPL_T(y_i)^{−1/τ}  = exp(+mean_t log π_T(y_t) / τ)

normalized within the branch of the group, as METHODS §8 reads it: the weights of a branch
*sum to 1* (a softmax of the log-weights over the branch's rows), then every weight of the
group is scaled by the group's row count ``G`` to meet the loop's token mean:
``w̃_i = G · w_i / Σ_{j∈Ω} w_j``. So the two branches of a group carry the same total
weight ``G`` whatever their sizes (1 correct and 7 wrong rollouts with uniform weights: the
correct row weighs 8, each wrong row 8/7), and a group whose rows all fall in one branch,
with uniform weights, is exactly plain token-mean MLE/OPD (``w̃ = 1``). An empty branch
contributes nothing; a row without tokens is in no branch. The per-token advantage
fed to the importance-sampling surrogate ``−ρ_t·A_t`` (``ρ_t = π_θ/π_old``) is

    correct: A_t = w̃_i                                   (loss −w̃_i·ρ_t: weighted MLE)
    wrong:   A_t = −w̃_i · sg(log π_θ(y_t) − log π_T(y_t)) (loss w̃_i·ρ_t·sg(δ_t): OPD)

Teacher log-probs follow :mod:`opd.signals.teacher_logp` (NaN or ``−inf`` is a zero
probability, floored at ``LOGP_FLOOR`` = −100 nats), which keeps ``δ`` and ``PPL_T`` finite. Pure torch; detached outputs.
"""

from __future__ import annotations

import torch

from opd.losses import sequence_mean_logp
from opd.signals.teacher_logp import TEACHER_LOGP_FLOOR as LOGP_FLOOR, floor_logp  # noqa: F401  (re-exported)
_BIG = 1e300


@torch.no_grad()
def group_softmax_weights(logw_B: torch.Tensor, member_B: torch.Tensor, group_B: torch.Tensor) -> torch.Tensor:
    """``w_i = exp(x_i) / Σ_{j∈g, member} exp(x_j)`` for members, 0 otherwise -> ``[B]`` float64.

    The members of each group (``group_B``: any integer labels) sum to 1. Non-finite
    log-weights count as ``±1e300`` (NaN as ``−1e300``): finite in, finite out.
    """
    member_B = member_B.bool()
    gid_B = torch.unique(group_B, return_inverse=True)[1]
    n_groups = int(gid_B.max()) + 1 if gid_B.numel() else 0
    x_B = torch.nan_to_num(logw_B.double(), nan=-_BIG, posinf=_BIG, neginf=-_BIG)
    x_B = torch.where(member_B, x_B, -_BIG)
    max_G = torch.full((n_groups,), -_BIG, dtype=x_B.dtype, device=x_B.device)
    max_G = max_G.scatter_reduce(0, gid_B, x_B, "amax", include_self=True)
    e_B = torch.where(member_B, torch.exp(x_B - max_G[gid_B]), 0.0)
    sum_G = torch.zeros_like(max_G).index_add(0, gid_B, e_B)
    return torch.where(member_B, e_B / sum_G[gid_B].clamp_min(1e-300), 0.0)


def group_rows_B(group_B: torch.Tensor) -> torch.Tensor:
    """The number of rows of each row's group -> ``[B]`` float64."""
    gid_B = torch.unique(group_B, return_inverse=True)[1]
    return torch.bincount(gid_B).double()[gid_B]


@torch.no_grad()
def scope_log_weights(
    student_mean_logp_B: torch.Tensor, teacher_mean_logp_B: torch.Tensor, correct_B: torch.Tensor, tau: float
) -> torch.Tensor:
    """Unnormalized log-weights: ``log PPL_S^{1/τ} = −mean log π_S / τ`` on correct rows,
    ``log PPL_T^{−1/τ} = mean log π_T / τ`` on wrong rows -> ``[B]``."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return torch.where(correct_B.bool(), -student_mean_logp_B / tau, teacher_mean_logp_B / tau)


@torch.no_grad()
def scope_weights(
    student_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    correct_B: torch.Tensor,
    group_B: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """Per-row weights ``w̃_i`` (module doc): each branch of each group sums to the group's
    row count ``G`` -> ``[B]`` float64."""
    s_mean_B = sequence_mean_logp(student_logp_BT.double(), mask_BT)
    t_mean_B = sequence_mean_logp(floor_logp(teacher_logp_BT.double()), mask_BT)
    logw_B = scope_log_weights(s_mean_B, t_mean_B, correct_B, tau)
    has_tokens_B = mask_BT.bool().any(-1)
    correct_B = correct_B.bool()
    w_c = group_softmax_weights(logw_B, correct_B & has_tokens_B, group_B)
    w_w = group_softmax_weights(logw_B, ~correct_B & has_tokens_B, group_B)
    return (w_c + w_w) * group_rows_B(group_B).to(w_c.device)


@torch.no_grad()
def scope_advantages(
    weight_B: torch.Tensor,
    correct_B: torch.Tensor,
    logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
) -> torch.Tensor:
    """``A_t = w̃_i`` (correct) or ``−w̃_i·(log π_θ(y_t) − log π_T(y_t))`` (wrong), 0 off the mask.

    ``logp_BT`` is the current student's log-prob (detached here: ``sg``) -> ``[B, T]``.
    """
    delta_BT = logp_BT.detach() - floor_logp(teacher_logp_BT.to(logp_BT.dtype))
    per_token_BT = torch.where(correct_B.bool()[:, None], torch.ones_like(delta_BT), -delta_BT)
    adv_BT = weight_B.to(delta_BT.dtype)[:, None] * per_token_BT
    return torch.where(mask_BT.bool(), adv_BT, 0.0)
