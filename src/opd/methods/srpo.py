"""SRPO: GRPO on a group's correct rollouts, teacher distillation on its failed ones (METHODS §17).

Source: abstract (Li et al. 2604.02288); the weighting is a **reconstruction** (it does
not claim to reproduce the paper). Per group of ``G`` rollouts of one prompt:

    correct (R_i = 1):  ℓ_t = max(−ρ_t A_i, −clip(ρ_t, 1−ε, 1+ε) A_i),
                        A_i = (R_i − mean_g R)/(std_g R + ε')          (GRPO, §19)
    failed  (R_i = 0):  ℓ_t = ŵ_t · ℓ^OPD_t,  ℓ^OPD_t = −ρ_t · sg(A^D_t)   (or PPO-clipped),
                        A^D_t = −c·(log π_sampler(y_t) − log π_T(y_t))    (per-token OPD)
    ρ_t = exp(log π_θ(y_t) − log π_sampler(y_t))

    srpo_weight="confidence": ŵ_t = w_t / mean_{failed tokens}(w),  w_t = 1 − H^T_t / log V
    srpo_weight="none":       ŵ_t = 1

How the two terms combine: each rollout row gets exactly one of the two losses and the
loop takes the token mean over all kept tokens of the step,
``L = (1/N) [Σ_{correct tokens} ℓ^GRPO_t + Σ_{failed tokens} ŵ_t ℓ^OPD_t]``. So each term
weighs in proportion to its token count (no per-term renormalization), and the confidence
weights, mean-normalized over the failed tokens (``Σ ŵ = N_failed``), only redistribute
the distillation's mass among those tokens. A group whose rollouts are all correct has
GRPO advantage 0 (no gradient); one whose rollouts all fail is distilled entirely. A step
with no correct rollout and uniform weights (``srpo_weight="none"``, or a teacher with the
same entropy everywhere, as the noise-free testbed oracle) is exactly ``opd``: the run
reports it when the first step is such a step.
``V`` is the teacher's vocabulary size (``env.teacher.vocab_size``), stored per row by the
rollout.

Knobs: ``srpo_weight`` ("confidence" | "none"), ``kl_coef`` (c), ``opd_loss`` ("is" |
"ppo", the distillation surrogate), ``clip_eps`` (PPO clip, GRPO and PPO distillation),
``adv_scale`` ("std" | "none", GRPO's group normalization). Metrics: ``loss/grpo`` and
``loss/distill`` are the two terms' contributions (they add up to the step loss),
``signal/correct_frac`` the share of correct rows, ``signal/teacher_conf`` the mean raw
confidence ``w`` on the failed tokens.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Annotated, Literal

import torch

from opd.losses import importance_sampling_loss, ppo_clip_loss
from opd.methods.base import Experience, Method, RolloutEnv, Signal, StudentView, TeacherRequest, method_info
from opd.methods.degeneracy import Degenerate, RunFacts
from opd.methods.knobs import AdvScale, ClipEps, KlCoef, OpdLoss, knob
from opd.rollouts.student import student_rollout
from opd.signals.srpo import confidence_BT, mean_normalize_BT, route_BT, srpo_advantages_BT


def srpo_rollout(env: RolloutEnv, problems: list, generator: torch.Generator) -> Experience:
    """Student rollouts, with ``log V`` of the teacher's vocabulary on every row."""
    exp = student_rollout(env, problems, generator)
    vocab = getattr(env.teacher, "vocab_size", 0) or env.vocab_size
    exp.extra["log_vocab_B"] = torch.full((len(exp.problems),), math.log(max(vocab, 2)), device=exp.batch.device)
    return exp


def srpo_signal(exp: Experience, scores, *, weight: str, kl_coef: float, adv_scale: str) -> Signal:
    mask_BT = exp.batch.completion_mask_BT
    group_size = int((exp.group_B == exp.group_B[0]).sum())  # rows are grouped contiguously
    grpo_adv_BT, distill_adv_BT = srpo_advantages_BT(
        exp.rewards_B, group_size, exp.sampler_logp_BT, scores.token_logp_BT, mask_BT,
        kl_coef=kl_coef, adv_scale=adv_scale,
    )
    correct_BT, failed_BT = route_BT(exp.rewards_B, mask_BT)
    conf_BT = confidence_BT(scores.entropy_BT, exp.extra["log_vocab_B"], failed_BT)
    w_BT = mean_normalize_BT(conf_BT, failed_BT) if weight == "confidence" else failed_BT.float()
    n_failed = failed_BT.sum().clamp(min=1)
    return {
        "mask_BT": mask_BT,
        "grpo_adv_BT": grpo_adv_BT,
        "distill_adv_BT": distill_adv_BT,
        "distill_w_BT": w_BT,
        "correct_BT": correct_BT,
        "sampler_logp_BT": exp.sampler_logp_BT,
        "signal/correct_frac": (exp.rewards_B > 0).float().mean(),
        "signal/teacher_conf": conf_BT.sum() / n_failed,
    }


def srpo_loss(view: StudentView, signal: Signal, *, opd_loss: str, clip_eps: float):
    logp, old = view.logp_BT, signal["sampler_logp_BT"]
    grpo_BT, metrics = ppo_clip_loss(logp, old, signal["grpo_adv_BT"], clip_low=clip_eps, clip_high=clip_eps)
    if opd_loss == "ppo":
        distill_BT, _ = ppo_clip_loss(logp, old, signal["distill_adv_BT"], clip_low=clip_eps, clip_high=clip_eps)
    else:
        distill_BT, _ = importance_sampling_loss(logp, old, signal["distill_adv_BT"])
    correct_BT, w_BT = signal["correct_BT"], signal["distill_w_BT"]
    grpo_BT = torch.where(correct_BT, grpo_BT, 0.0)
    distill_BT = torch.where(w_BT > 0, w_BT * distill_BT, 0.0)
    loss_BT = grpo_BT + distill_BT
    return loss_BT, {"loss/grpo": grpo_BT.detach(), "loss/distill": distill_BT.detach(), "pg/ratio": metrics["pg/ratio"]}


def srpo_degenerate(facts: RunFacts, *, weight: str) -> Degenerate | None:
    """Exactly ``opd`` when the first step had no correct rollout (no GRPO term) and the
    distillation weights were uniform (``srpo_weight="none"``, or a teacher whose entropy is
    the same at every token, as the noise-free testbed oracle's)."""
    if facts.metric("signal/correct_frac") != 0.0:
        return None
    H_N = facts.teacher_entropy_N
    uniform = weight == "none" or (H_N is not None and H_N.numel() > 0 and float(H_N.max() - H_N.min()) <= 1e-6)
    if not uniform:
        return None
    why = "no rollout of the first step was correct (no GRPO term) and the distillation weights were uniform"
    return Degenerate("group_size", "opd", why)


@method_info(paper="Li et al., 2604.02288", fixes="beyond the teacher (RLVR + distillation)", source="reconstruction")
def build(
    srpo_weight: Annotated[Literal["confidence", "none"], knob("per-token weight of the distillation on failed rollouts")] = "confidence",
    kl_coef: KlCoef = 1.0,
    opd_loss: OpdLoss = "is",
    clip_eps: ClipEps = 0.2,
    adv_scale: AdvScale = "std",
) -> Method:
    return Method(
        "srpo",
        srpo_rollout,
        lambda exp, scores: srpo_signal(exp, scores, weight=srpo_weight, kl_coef=kl_coef, adv_scale=adv_scale),
        lambda view, signal: srpo_loss(view, signal, opd_loss=opd_loss, clip_eps=clip_eps),
        teacher_request=TeacherRequest(topk=8, full=False),
        needs=("teacher", "verifier"),
        min_group_size=2,
        degenerate=partial(srpo_degenerate, weight=srpo_weight),
    )
