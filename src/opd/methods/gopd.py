"""G-OPD / ExOPD: on-policy distillation with an extrapolated reward (METHODS §18).

    A_t = λ·(log π_T(y_t) − log π_ref(y_t)) − (log π_sampler(y_t) − log π_ref(y_t))
    L   = −(1/N) Σ_{i,t} exp(log π_θ(y_t) − sg(log π_sampler(y_t))) · sg(A_t)

π_ref is the frozen initial student; its log-probs of the sampled tokens are computed in
the rollout (``exp.extra["ref_logp_BT"]``). ``log π_θ`` inside the advantage is the
sampler's log-prob (detached, METHODS rule 1). ``λ = gopd_lambda``: 1 is standard OPD
(exactly :mod:`opd.methods.opd` with ``gamma=0, kl_coef=1``), >1 extrapolates the reward
beyond the teacher (the paper's ExOPD uses ≈1.25; unstable near 1.5).
``opd_loss="ppo"`` swaps in the PPO-clipped ratio (``clip_eps``).

Source: paper abstract and a summary equation (Yang et al. 2602.12125); per-token
advantage without discounting, as in OPD's default. Needs only sampled-token log-probs of
the teacher (a sparse or remote teacher works) and the reference model.
Metrics: ``loss/rkl_sampled`` (``log π_sampler − log π_T``), ``signal/ref_gap`` (mean
``log π_T − log π_ref``, the reward that λ scales).
"""

from __future__ import annotations

from typing import Annotated

import torch

from opd.methods.base import Experience, Method, RolloutEnv, Signal, TeacherRequest, method_info
from opd.methods.degeneracy import Degenerate
from opd.methods.knobs import ClipEps, OpdLoss, knob
from opd.methods.contexts import reference_scores
from opd.methods.opd import opd_token_loss
from opd.rollouts.student import student_rollout
from opd.signals.gopd import gopd_advantages_BT
from opd.signals.opd import floored_log_ratio_BT
from opd.signals.teacher_logp import floor_logp


def gopd_rollout(env: RolloutEnv, problems: list, generator: torch.Generator) -> Experience:
    """Student rollouts, with the frozen reference's log-probs of the sampled tokens."""
    exp = student_rollout(env, problems, generator)
    ref = reference_scores(env, exp.batch, topk=1, full=False)
    exp.extra["ref_logp_BT"] = ref.token_logp_BT.float()
    return exp


def gopd_signal(exp: Experience, scores, *, lam: float) -> Signal:
    mask_BT = exp.batch.completion_mask_BT
    sampler, teacher, ref = exp.sampler_logp_BT, scores.token_logp_BT, exp.extra["ref_logp_BT"]
    adv_BT = gopd_advantages_BT(sampler, teacher, ref, mask_BT, lam)
    return {
        "mask_BT": mask_BT,
        "adv_BT": adv_BT,
        "sampler_logp_BT": sampler,
        "log_ratio_BT": floored_log_ratio_BT(sampler, teacher, mask_BT),
        "signal/ref_gap": torch.where(mask_BT, floor_logp(teacher) - floor_logp(ref), 0.0),
    }


@method_info(paper="Yang et al., 2602.12125", fixes="beyond the teacher (reward extrapolation)", source="paper")
def build(
    gopd_lambda: Annotated[float, knob("reward extrapolation (1 = standard OPD)", ge=0)] = 1.25,
    opd_loss: OpdLoss = "is",
    clip_eps: ClipEps = 0.2,
) -> Method:
    return Method(
        "gopd",
        gopd_rollout,
        lambda exp, scores: gopd_signal(exp, scores, lam=gopd_lambda),
        lambda view, signal: opd_token_loss(view, signal, opd_loss=opd_loss, clip_eps=clip_eps),
        teacher_request=TeacherRequest(topk=8, full=False),
        needs=("teacher", "reference"),
        degenerate=lambda facts: Degenerate("gopd_lambda", "opd", "gopd_lambda=1 is standard OPD") if gopd_lambda == 1.0 else None,
    )
