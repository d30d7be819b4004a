"""MiniLLM's long-term signal: clipped per-token rewards, length-normalized returns, whitening.

Source: paper (Gu et al. 2306.08543, §2.2) and code (microsoft/LMOps ``minillm``:
``sampler.py`` builds the rewards, ``losses.py`` the returns); METHODS §4. Pure torch.

Per-token reward of the sampled token (``log π_θ`` from sampling time, detached)::

    r_t = clip((log π_T(y_t|c_t) − log π_θ(y_t|c_t)) / reward_scale, −reward_clip, +reward_clip)

(LMOps divides by ``reward_scaling`` and clips at ``cliprange_reward``; a clip of 0 is off.)

Length-normalized discounted return, ``m`` the mask (right padding):

- ``"from_t"`` (code, default)::

      R_t = Σ_{t'≥t} γ^{t'−t} m_{t'} r_{t'}  /  N_t,     N_t = Σ_{t'≥t} m_{t'}

  i.e. the discounted return *including* the current reward, divided by the number of
  tokens from ``t`` to the end of the sequence (LMOps ``lens = mask − cumsum + total``).
- ``"after_t"`` (paper's ``R^Norm_{t+1}``)::

      R_t = Σ_{t'>t} γ^{t'−t−1} m_{t'} r_{t'}  /  N'_t,  N'_t = Σ_{t'>t} m_{t'}

  only the *future* rewards, divided by the number of future tokens; 0 at the last token
  (``N'_t = 0``). The current token's reward is left to the single-step term.

Whitening (code default): ``(R − mean) / sqrt(var + 1e-8)`` over the kept tokens of the
whole step, sample variance (``torch.var_mean``'s default, as in LMOps ``whiten``).
Deviations: LMOps whitens each PPO mini-batch inside the loss and takes the statistics over
every entry of the padded tensor; here it is done once per step, over kept tokens only.
Everything returned is detached (METHODS rule 1) and 0 where masked.
"""

from __future__ import annotations

import torch

from opd.losses import discounted_returns
from opd.signals.teacher_logp import floor_logp

WHITEN_EPS = 1e-8
FUTURE = ("from_t", "after_t")


@torch.no_grad()
def minillm_rewards(
    teacher_logp_BT: torch.Tensor,
    student_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    reward_scale: float,
    reward_clip: float,
) -> torch.Tensor:
    """``r_t = clip((log π_T − log π_θ)/reward_scale, ±reward_clip)``, 0 where masked -> ``[B, T]``.

    ``reward_clip <= 0`` is no clip. The teacher's log-prob is floored first
    (:mod:`opd.signals.teacher_logp`: a NaN or ``-inf`` one is a zero probability, −100
    nats), so the reward stays finite; an undefined student ``inf − inf`` gives 0.
    """
    if reward_scale <= 0:
        raise ValueError(f"reward_scale must be > 0, got {reward_scale}")
    t, s = floor_logp(teacher_logp_BT.double()), student_logp_BT.double()
    r_BT = (t - s) / reward_scale
    r_BT = torch.where(torch.isnan(r_BT), 0.0, r_BT)
    if reward_clip > 0:
        r_BT = r_BT.clamp(-reward_clip, reward_clip)
    r_BT = torch.where(mask_BT.bool(), r_BT, 0.0)
    return r_BT.to(torch.promote_types(teacher_logp_BT.dtype, torch.float32))


def tokens_to_end(mask_BT: torch.Tensor) -> torch.Tensor:
    """``N_t = Σ_{t'≥t} m_{t'}`` per row -> ``[B, T]`` (float)."""
    m = mask_BT.float()
    return m.flip(-1).cumsum(-1).flip(-1)


@torch.no_grad()
def length_normalized_returns(
    rewards_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float, *, future: str = "from_t"
) -> torch.Tensor:
    """MiniLLM's length-normalized discounted return (module doc) -> ``[B, T]``, 0 where masked."""
    if future not in FUTURE:
        raise ValueError(f"future must be one of {FUTURE}, got {future!r}")
    m_BT = mask_BT.bool()
    G_BT = discounted_returns(rewards_BT, m_BT, gamma)
    n_BT = tokens_to_end(m_BT).to(G_BT.dtype)
    if future == "after_t":
        G_BT = torch.cat([G_BT[:, 1:], torch.zeros_like(G_BT[:, :1])], dim=1)
        n_BT = n_BT - m_BT.to(G_BT.dtype)
    R_BT = G_BT / n_BT.clamp(min=1)
    return torch.where(m_BT & (n_BT > 0), R_BT, 0.0)


@torch.no_grad()
def whiten(values_BT: torch.Tensor, mask_BT: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """``(v − mean) / sqrt(var + eps)`` over the kept tokens (sample variance) -> ``[B, T]``.

    Fewer than two kept tokens: centered only (``var`` undefined); 0 where masked.
    """
    m_BT = mask_BT.bool()
    kept = values_BT[m_BT]
    if kept.numel() == 0:
        return torch.zeros_like(values_BT)
    mean = kept.mean()
    out_BT = values_BT - mean
    if kept.numel() > 1:
        out_BT = out_BT * torch.rsqrt(kept.var() + eps)
    return torch.where(m_BT, out_BT, 0.0)


@torch.no_grad()
def importance_weights(student_logp_BT: torch.Tensor, mix_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``w_t = π_θ(y_t)/p̃(y_t) = exp(log π_θ − log p̃)``, 0 where masked -> ``[B, T]``."""
    return torch.where(mask_BT.bool(), (student_logp_BT - mix_logp_BT).exp(), 0.0)
