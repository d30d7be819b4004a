"""Policy-gradient pieces: returns, group advantages, surrogate losses. Pure torch.

Conventions:

- Shapes: ``[B, T]`` tensors aligned to completion tokens (``logp_BT``: the learner's
  log-prob of each sampled token; ``sampler_logp_BT``: the log-prob under the policy
  that sampled it; ``adv_BT``; ``mask_BT`` bool).
- Surrogate losses (:func:`importance_sampling_loss`, :func:`ppo_clip_loss`) return
  ``(loss_BT, metrics)``: the per-token loss (to be reduced with
  :func:`opd.losses.reduce.masked_token_mean`) and a dict of detached per-token
  float ``[B, T]`` tensors whose masked token mean is the scalar to log (so
  ``pg/clip_frac`` reduces to the clip fraction). Masking happens in the reduction.
- Advantages are always detached (METHODS rule 1): the losses apply ``sg`` to
  ``adv_BT`` and ``sampler_logp_BT``; the advantage builders return detached tensors.
- The importance ratio is ``exp(clamp(logp - sg(sampler_logp), ±log_ratio_limit))``
  (a clamp on the log-ratio, METHODS rule 6). The default limit 20 is only an
  overflow guard (it never binds for a sane rollout); pass ``None`` for the raw ratio.
  Where it binds the token gets no gradient. A position where both log-probs are the
  same infinity (e.g. padding filled with ``-inf``) gets log-ratio 0 and no gradient.
  ``adv_BT`` should be finite (0 on padding, as the builders here give). A position with a
  NaN in any input gets loss NaN and zero gradient (the NaN is selected away with
  ``torch.where`` before any arithmetic): masked by the reduction it costs nothing; kept,
  it makes the loss NaN (the step is not applied), never a silent 0.
- Half-precision inputs are computed in float32 and the outputs are float32.
"""

from __future__ import annotations

import torch

from opd.losses.reduce import masked_row_mean, upcast

_RETURNS_CHUNK = 64
LOG_RATIO_LIMIT = 20.0

Metrics = dict[str, torch.Tensor]


def clamp_log_ratio(log_ratio: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Symmetric clamp ``clamp(log_ratio, -limit, +limit)``; ``None`` is the identity.

    Source: code (METHODS rule 6: a clamp on the log-ratio, ±5 / ±10 in public code;
    verl clamps the PPO log-ratio at ±20). This is the *log-ratio* granularity, not a
    per-vocabulary-entry or per-position clip. Outside the range the gradient is 0
    (``torch.clamp`` semantics).
    """
    if limit is None:
        return log_ratio
    if not limit > 0:
        raise ValueError(f"limit must be > 0, got {limit}")
    return log_ratio.clamp(-limit, limit)


def _without_nan(*tensors_BT: torch.Tensor):
    """``(nan_BT, *inputs)``: where any input holds a NaN, every input is 0 (upcast)."""
    xs = [upcast(x) for x in tensors_BT]
    nan_BT = torch.stack(torch.broadcast_tensors(*[x.detach().isnan() for x in xs])).any(0)
    return (nan_BT, *(torch.where(nan_BT, 0.0, x) for x in xs))


def _ratio(logp_BT, sampler_logp_BT, limit):
    """``exp(clamp(logp - sg(sampler_logp)))``, finite and gradient-safe (see module doc)."""
    logp_BT, sampler_BT = upcast(logp_BT), upcast(sampler_logp_BT).detach()
    same_inf = torch.isinf(sampler_BT) & (logp_BT == sampler_BT)
    log_ratio_BT = torch.where(same_inf, 0.0, logp_BT - sampler_BT)
    return clamp_log_ratio(log_ratio_BT, limit).exp()


def importance_sampling_loss(
    logp_BT: torch.Tensor,
    sampler_logp_BT: torch.Tensor,
    adv_BT: torch.Tensor,
    *,
    log_ratio_limit: float | None = LOG_RATIO_LIMIT,
) -> tuple[torch.Tensor, Metrics]:
    """Importance-sampled policy gradient, no clip -> ``(loss_BT, metrics)``.

    ``loss_t = −exp(logp_t − sg(sampler_logp_t)) · sg(A_t)``, so
    ``∇loss_t = −ratio_t · A_t · ∇logp_t`` (``−A_t ∇logp_t`` on-policy).

    Source: code (tinker-cookbook ``distillation/train_on_policy.py``; METHODS §2).
    Deviation: the log-ratio clamp (an overflow guard; ``log_ratio_limit=None``
    reproduces the code exactly). Metrics: ``pg/ratio``.
    """
    nan_BT, logp_BT, sampler_logp_BT, adv_BT = _without_nan(logp_BT, sampler_logp_BT, adv_BT)
    ratio_BT = _ratio(logp_BT, sampler_logp_BT, log_ratio_limit).masked_fill(nan_BT, float("nan"))
    loss_BT = -ratio_BT * adv_BT.detach()
    return loss_BT, {"pg/ratio": ratio_BT.detach()}


def ppo_clip_loss(
    logp_BT: torch.Tensor,
    sampler_logp_BT: torch.Tensor,
    adv_BT: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_limit: float | None = LOG_RATIO_LIMIT,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate, optionally dual-clipped -> ``(loss_BT, metrics)``.

    ``r = exp(logp − sg(sampler_logp))``, ``A = sg(adv)``:
    ``loss = max(−r·A, −clip(r, 1−ε_low, 1+ε_high)·A)``; with ``dual_clip = c > 1``,
    for ``A < 0`` the loss is further capped: ``loss = min(loss, −c·A)``.
    The gradient is 0 where a clip binds (``A>0, r>1+ε_high``; ``A<0, r<1−ε_low``;
    dual: ``A<0, r>c``).

    Source: paper (Schulman et al. 2017; asymmetric ε as in DAPO, Yu et al. 2025;
    dual clip, Ye et al. 2020); METHODS §2 and §19. Deviation: the log-ratio clamp
    (see module doc). Metrics (per-token indicators, masked mean = fraction):
    ``pg/ratio``, ``pg/clip_frac``, ``pg/clip_frac_low``, ``pg/clip_frac_high``,
    ``pg/dual_clip_frac``.
    """
    if not (clip_low >= 0 and clip_high >= 0):
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low} and {clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    nan_BT, logp_BT, sampler_logp_BT, adv_BT = _without_nan(logp_BT, sampler_logp_BT, adv_BT)
    ratio_BT = _ratio(logp_BT, sampler_logp_BT, log_ratio_limit)
    adv_BT = adv_BT.detach()
    clipped_ratio_BT = ratio_BT.clamp(1 - clip_low, 1 + clip_high)
    # inside the clip range the two branches tie; torch.maximum then splits the gradient
    # evenly between them, which adds back up to the unclipped −A·∇r
    loss_BT = torch.maximum(-ratio_BT * adv_BT, -clipped_ratio_BT * adv_BT)
    r = ratio_BT.detach()
    low_BT, high_BT = (adv_BT < 0) & (r < 1 - clip_low), (adv_BT > 0) & (r > 1 + clip_high)
    dual_BT = torch.zeros_like(low_BT)
    if dual_clip is not None:
        dual_BT = (adv_BT < 0) & (loss_BT.detach() > -dual_clip * adv_BT)
        loss_BT = torch.where(dual_BT, -dual_clip * adv_BT, loss_BT)
    loss_BT, r = loss_BT.masked_fill(nan_BT, float("nan")), r.masked_fill(nan_BT, float("nan"))
    metrics = {
        "pg/ratio": r,
        "pg/clip_frac": (low_BT | high_BT).to(r.dtype),
        "pg/clip_frac_low": low_BT.to(r.dtype),
        "pg/clip_frac_high": high_BT.to(r.dtype),
        "pg/dual_clip_frac": dual_BT.to(r.dtype),
    }
    return loss_BT, metrics


@torch.no_grad()
def discounted_returns(
    rewards_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Reward-to-go ``A_t = Σ_{t'≥t} γ^{t'−t} m_{t'} r_{t'}``, 0 where masked -> ``adv_BT``.

    Source: paper (blog Eq. 2/3, METHODS §1); code (tinker-cookbook
    ``kl_discount_factor``). ``γ=0``: per-token (``A = r`` on the mask); ``γ=1``:
    sequence-level return-to-go. Rewards at masked positions count as 0 (whatever
    they hold), so with right padding the sum stops at the end of each sequence; a
    hole in the mask contributes nothing but still counts as a step of discount
    (``t'−t`` is the column distance). Detached (rule 1).

    Computed exactly as a blocked reverse scan: within blocks of 64 columns a
    matrix of ``γ^{j−i}`` (``j ≥ i``, no negative powers, so no overflow for small
    γ), across blocks a carried return — O(T·64) work, T/64 steps.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    r_BT = torch.where(mask_BT.bool(), upcast(rewards_BT), 0.0)
    T = r_BT.shape[-1]
    C = max(1, min(T, _RETURNS_CHUNK))
    idx_C = torch.arange(C, device=r_BT.device)
    lag_CC = (idx_C[None, :] - idx_C[:, None]).to(r_BT.dtype)  # j - i
    W_CC = torch.where(lag_CC >= 0, gamma ** lag_CC.clamp(min=0), 0.0)
    out_BT = torch.zeros_like(r_BT)
    carry_B = r_BT.new_zeros(r_BT.shape[:-1])  # return at the first column after the block
    for end in range(T, 0, -C):
        start = max(0, end - C)
        n = end - start
        decay_n = gamma ** (n - idx_C[:n]).to(r_BT.dtype)  # γ^{end - t}
        block = r_BT[..., start:end] @ W_CC[:n, :n].T + carry_B[..., None] * decay_n
        out_BT[..., start:end] = block
        carry_B = block[..., 0]
    return torch.where(mask_BT.bool(), out_BT, 0.0)


@torch.no_grad()
def grpo_advantages(
    rewards_NG: torch.Tensor, *, scale: str = "std", eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages ``(R_i − mean_g) / (std_g + ε)`` -> ``[N, G]``.

    Source: paper (Shao et al. 2024, DeepSeekMath; METHODS §19). Groups are the last
    dimension (a 1-D input is one group). ``scale="std"`` divides by the *sample*
    (unbiased, ``G−1``) standard deviation, as TRL and verl do (``torch.std``);
    ``scale="none"`` only centers (Dr. GRPO). A group whose rewards are all equal
    (including ``G = 1``) gets exactly 0, never ``nan``. Detached (rule 1).
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    if not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    r_NG = upcast(rewards_NG)
    flat_N1 = r_NG.amax(-1, keepdim=True) == r_NG.amin(-1, keepdim=True)
    adv_NG = torch.where(flat_N1, 0.0, r_NG - r_NG.mean(-1, keepdim=True))
    if scale == "std" and r_NG.shape[-1] > 1:
        adv_NG = adv_NG / (r_NG.std(-1, keepdim=True) + eps)
    return adv_NG


def sequence_mean_logp(logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean log-prob of each sequence over its unmasked tokens -> ``[B]``.

    ``mean_b = Σ_t m_bt logp_bt / Σ_t m_bt``; a fully masked row gives 0.
    Differentiable. Source: paper (SCOPE, METHODS §8: ``PPL = exp(−mean_t log π)``).
    """
    return masked_row_mean(logp_BT, mask_BT)


def perplexity(logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Per-sequence perplexity ``exp(−mean_t logp_t)`` -> ``[B]``; 1 for a fully masked row.

    Source: paper (SCOPE, METHODS §8). Overflows to ``inf`` once the mean log-prob
    is below about −88 (float32); weights like ``PPL^{1/τ}`` are safer built in log
    space from ``−sequence_mean_logp``.
    """
    return torch.exp(-sequence_mean_logp(logp_BT, mask_BT))
