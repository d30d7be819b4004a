"""DASD, direction-adaptive self-distillation on top of GRPO (METHODS §10).

Source: third-party equation summary of Zhang et al. 2605.22263; the quantile side of the
router is a *reconstruction* (see :mod:`opd.signals.dasd`). This does not claim to
reproduce the paper.

``G`` student rollouts per prompt, verifier rewards, the GRPO group advantage
``A_G = (R − mean_G R)/(std_G R + eps)`` (``adv_scale="none"``: centered only), and OPSD's
privileged self-teacher (the frozen initial student with the reference solution in its
context, ``privileged_context``) scoring the sampled tokens::

    d_t  = log π_T(y_t|x, y*, c_t) − log π_θ(y_t|c_t)          (teacher − student)
    Â_t  = A_G + β·ω_t·d̄_t,   ω_t = tanh((τ_ρ − H^S_t)/σ_H)·sigmoid(|d̄_t| − 1)
    L_t  = max(−ρ_t·Â_t, −clip(ρ_t, 1−ε, 1+ε)·Â_t),  ρ_t = exp(log π_θ − sg(log π_sampler))

Sign convention: METHODS defines ``δ_t = log π_θ − log π_T``; the routed term uses
``d_t = −δ_t`` so that ``ω_t > 0`` (confident tokens, entropy below the trajectory's
``(1−ρ)`` quantile) pushes ``log π_θ(y_t)`` up where the teacher prefers ``y_t`` and down
where it does not (attraction toward the teacher), and ``ω_t < 0`` (high-entropy forks)
does the opposite (repulsion).

The student's entropies ``H^S_t`` and log-probs are those at sampling time: the rollout
adds one no-grad forward of the student over its own samples and stores the entropies in
``exp.extra["student_entropy_BT"]`` (the log-probs are the sampler's).

Knobs: ``dasd_rho`` (ρ, 0.2), ``dasd_beta`` (β, 0.1), ``clip_eps`` (ε, 0.2), ``adv_scale``
(GRPO's std scaling, "std").
"""

from __future__ import annotations

from typing import Annotated

import torch

from opd.losses import grpo_advantages
from opd.methods.grpo import grpo_loss
from opd.methods.base import Experience, Method, Signal, TeacherRequest, method_info
from opd.methods.degeneracy import Degenerate
from opd.methods.knobs import AdvScale, ClipEps, knob
from opd.methods.contexts import privileged_context
from opd.methods.full_vocab import frozen_student_stats
from opd.rollouts.student import student_rollout
from opd.signals.dasd import dasd_advantages, dasd_router, normalized_log_ratio, teacher_log_ratio

def student_entropy(model, batch) -> torch.Tensor:
    """``H(π_θ(·|c_t))`` of every completion column at temperature 1 -> ``[B, T]``, 0 on
    padding (chunk by chunk from the hidden states: never ``[B, T, V]``)."""
    entropy_BT, _ = frozen_student_stats(model, batch)
    return entropy_BT.masked_fill(~batch.completion_mask_BT.to(entropy_BT.device), 0.0)


def dasd_rollout(env, problems, generator) -> Experience:
    exp = student_rollout(env, problems, generator)
    exp.extra["student_entropy_BT"] = student_entropy(env.student, exp.batch)
    return exp


def group_advantages(exp: Experience, adv_scale: str) -> torch.Tensor:
    """GRPO's ``A_G`` per row -> ``[B]`` (rows are grouped contiguously)."""
    group_size = int((exp.group_B == exp.group_B[0]).sum())
    return grpo_advantages(exp.rewards_B.view(-1, group_size), scale=adv_scale).reshape(-1)


def dasd_signal(exp: Experience, scores, *, rho: float, beta: float, adv_scale: str) -> Signal:
    mask_BT = exp.batch.completion_mask_BT
    d_BT = teacher_log_ratio(scores.token_logp_BT, exp.sampler_logp_BT, mask_BT)
    d_bar_BT = normalized_log_ratio(d_BT, mask_BT)
    omega_BT = dasd_router(exp.extra["student_entropy_BT"], d_bar_BT, mask_BT, rho=rho)
    adv_BT = dasd_advantages(group_advantages(exp, adv_scale), omega_BT, d_bar_BT, mask_BT, beta=beta)
    return {
        "mask_BT": mask_BT,
        "adv_BT": adv_BT.float(),
        "sampler_logp_BT": exp.sampler_logp_BT,
        "signal/router": omega_BT,
        "signal/attract_frac": (omega_BT > 0).float(),
        "signal/teacher_log_ratio": d_BT,
    }


@method_info(
    paper="Zhang et al., 2605.22263",
    fixes="self-distillation collapsing exploration (entropy-routed direction)",
    source="third-party; quantile side reconstruction",
)
def build(
    dasd_rho: Annotated[float, knob("entropy quantile of the router's threshold", ge=0, le=1)] = 0.2,
    dasd_beta: Annotated[float, knob("weight of the routed self-teacher term on the GRPO advantage")] = 0.1,
    clip_eps: ClipEps = 0.2,
    adv_scale: AdvScale = "std",
) -> Method:
    return Method(
        "dasd",
        dasd_rollout,
        lambda exp, scores: dasd_signal(exp, scores, rho=dasd_rho, beta=dasd_beta, adv_scale=adv_scale),
        lambda view, signal: grpo_loss(view, signal, clip_eps=clip_eps),
        teacher_request=TeacherRequest(topk=1, full=False),
        needs=("verifier", "reference", "solutions"),
        min_group_size=2,
        context=privileged_context,
        degenerate=lambda facts: Degenerate("dasd_beta", "grpo", "dasd_beta=0 removes the routed self-teacher term") if dasd_beta == 0.0 else None,
    )
