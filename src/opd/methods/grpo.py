"""GRPO: verifier reward, group-normalized advantages, PPO-clipped token loss (METHODS §19).

    A_i = (R_i - mean_G R) / (std_G R + eps)          (broadcast to every token of y_i)
    L   = (1/N) Σ_{i,t} [ max(-rho_t A_i, -clip(rho_t, 1-eps_l, 1+eps_h) A_i) + β·k3_t ],
    rho_t = exp(log pi_theta(y_t) - log pi_sampler(y_t))
    k3_t  = exp(d_t) - d_t - 1,   d_t = log pi_ref(y_t) - log pi_theta(y_t)

Source: paper (Shao et al., DeepSeekMath, 2402.03300, Eq. 3-4). ``β·k3_t`` is the KL
penalty to a frozen reference (the initial student): k3 (Schulman's estimator,
DeepSeekMath's Eq. 4) is a non-negative, unbiased per-token estimate of
``KL(pi_theta ‖ pi_ref)`` on the policy's own samples, differentiated through
``log pi_theta`` (its gradient is ``(1 - exp(d_t))·∇log pi_theta``) and, as in DeepSeekMath
and TRL, not importance-weighted. ``grpo_kl_beta`` is β, 0 (off) by default as in current
recipes; with β > 0 the run loads the frozen reference and the rollout adds its log-probs of
the sampled tokens (``exp.extra["ref_logp_BT"]``). Deviation: ``d_t`` is clamped at ±20 (the
library's log-ratio overflow guard, :mod:`opd.losses.pg`; it never binds near the reference).
Not ``ref_kl_coef``: StableOPD's knob weighs the exact full-vocabulary KL, with another
default. Logged: ``loss/ref_kl`` (mean k3 over tokens).
"""

from __future__ import annotations

from typing import Annotated

import torch

from opd.losses import clamp_log_ratio, grpo_advantages, ppo_clip_loss
from opd.losses.pg import LOG_RATIO_LIMIT
from opd.methods.base import Experience, Method, Signal, StudentView, method_info
from opd.methods.contexts import reference_scores
from opd.methods.knobs import AdvScale, ClipEps, knob
from opd.rollouts.student import student_rollout


def k3_kl_BT(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, limit: float = LOG_RATIO_LIMIT) -> torch.Tensor:
    """``k3_t = exp(d_t) − d_t − 1``, ``d_t = clamp(sg(log π_ref(y_t)) − log π_θ(y_t), ±limit)``
    -> ``[B, T]`` float32 (float64 kept), differentiable through ``logp_BT`` (module doc)."""
    dtype = torch.float64 if torch.float64 in (logp_BT.dtype, ref_logp_BT.dtype) else torch.float32
    d_BT = clamp_log_ratio(ref_logp_BT.detach().to(dtype) - logp_BT.to(dtype), limit)
    return d_BT.exp() - d_BT - 1.0


def grpo_rollout(env, problems, generator, *, with_reference: bool) -> Experience:
    """Student rollouts; with ``with_reference``, the frozen reference's log-probs of the
    sampled tokens in ``exp.extra["ref_logp_BT"]``."""
    exp = student_rollout(env, problems, generator)
    if with_reference:
        exp.extra["ref_logp_BT"] = reference_scores(env, exp.batch, topk=1).token_logp_BT.float()
    return exp


def grpo_signal(exp: Experience, scores, *, adv_scale: str) -> Signal:
    group_size = int((exp.group_B == exp.group_B[0]).sum())  # rows are grouped contiguously
    rewards_NG = exp.rewards_B.view(-1, group_size)
    adv_B = grpo_advantages(rewards_NG, scale=adv_scale).reshape(-1)
    mask_BT = exp.batch.completion_mask_BT
    signal = {
        "mask_BT": mask_BT,
        "adv_BT": adv_B[:, None].expand_as(mask_BT).float() * mask_BT,
        "sampler_logp_BT": exp.sampler_logp_BT,
    }
    if "ref_logp_BT" in exp.extra:
        signal["ref_logp_BT"] = exp.extra["ref_logp_BT"]
    return signal


def grpo_loss(view: StudentView, signal: Signal, *, clip_eps: float, kl_beta: float = 0.0):
    loss_BT, metrics = ppo_clip_loss(
        view.logp_BT, signal["sampler_logp_BT"], signal["adv_BT"], clip_low=clip_eps, clip_high=clip_eps
    )
    metrics = {"loss/pg": loss_BT, **metrics}
    if kl_beta > 0:
        kl_BT = k3_kl_BT(view.logp_BT, signal["ref_logp_BT"])
        loss_BT = loss_BT + kl_beta * kl_BT
        metrics["loss/ref_kl"] = kl_BT.detach()
    return loss_BT, metrics


@method_info(paper="Shao et al., 2402.03300", fixes="baseline (on-policy, sparse reward)", source="paper", recipe={"group_size": 4})
def build(
    clip_eps: ClipEps = 0.2,
    adv_scale: AdvScale = "std",
    grpo_kl_beta: Annotated[float, knob("beta of the k3 KL penalty to the frozen initial student (DeepSeekMath; 0 = off)", ge=0)] = 0.0,
) -> Method:
    with_reference = grpo_kl_beta > 0
    return Method(
        "grpo",
        lambda env, problems, gen: grpo_rollout(env, problems, gen, with_reference=with_reference),
        lambda exp, scores: grpo_signal(exp, scores, adv_scale=adv_scale),
        lambda view, signal: grpo_loss(view, signal, clip_eps=clip_eps, kl_beta=grpo_kl_beta),
        needs=("verifier", "reference") if with_reference else ("verifier",),
        min_group_size=2,
    )
