"""On-policy distillation: per-token reverse-KL advantage, importance-sampling loss.

    r_t = -c · (log pi_sampler(y_t|c_t) - log pi_T(y_t|c_t))
    A_t = Σ_{t' >= t} gamma^{t'-t} r_{t'}            (stops at EOS, ignores padding)
    L   = -(1/N) Σ_{i,t} exp(log pi_theta(y_t) - sg(log pi_sampler(y_t))) · sg(A_t)

``gamma = 0`` is the per-token surrogate (Thinking Machines' recipe, the default),
``gamma = 1`` the sequence-level return-to-go, the exact gradient of the sequence
reverse KL (METHODS §1). ``opd_loss="ppo"`` swaps in the PPO-clipped ratio.
Source: code (tinker-cookbook ``distillation/train_on_policy.py``); METHODS §1–2.
Needs only the sampled tokens' teacher log-probs, so a sparse or remote teacher works.
"""

from __future__ import annotations


from opd.losses import discounted_returns, importance_sampling_loss, ppo_clip_loss
from opd.methods.base import Experience, Method, Signal, StudentView, TeacherRequest, method_info
from opd.methods.knobs import ClipEps, Gamma, KlCoef, OpdLoss
from opd.rollouts.student import student_rollout
from opd.signals.opd import floored_log_ratio_BT


def opd_signal(exp: Experience, scores, *, gamma: float, kl_coef: float) -> Signal:
    mask_BT = exp.batch.completion_mask_BT
    log_ratio_BT = floored_log_ratio_BT(exp.sampler_logp_BT, scores.token_logp_BT, mask_BT)
    adv_BT = discounted_returns(-kl_coef * log_ratio_BT, mask_BT, gamma)
    return {
        "mask_BT": mask_BT,
        "adv_BT": adv_BT,
        "sampler_logp_BT": exp.sampler_logp_BT,
        "log_ratio_BT": log_ratio_BT,
    }


def opd_token_loss(view: StudentView, signal: Signal, *, opd_loss: str, clip_eps: float):
    logp, old, adv = view.logp_BT, signal["sampler_logp_BT"], signal["adv_BT"]
    if opd_loss == "ppo":
        loss_BT, metrics = ppo_clip_loss(logp, old, adv, clip_low=clip_eps, clip_high=clip_eps)
    else:
        loss_BT, metrics = importance_sampling_loss(logp, old, adv)
    return loss_BT, {"loss/pg": loss_BT, "loss/rkl_sampled": signal["log_ratio_BT"], **metrics}


@method_info(paper="Lu and Thinking Machines, 2025", fixes="baseline; gamma=1 is the sequence-level gradient", source="code", recipe={"group_size": 4})
def build(
    gamma: Gamma = 0.0,
    kl_coef: KlCoef = 1.0,
    opd_loss: OpdLoss = "is",
    clip_eps: ClipEps = 0.2,
) -> Method:
    return Method(
        "opd",
        student_rollout,
        lambda exp, scores: opd_signal(exp, scores, gamma=gamma, kl_coef=kl_coef),
        lambda view, signal: opd_token_loss(view, signal, opd_loss=opd_loss, clip_eps=clip_eps),
        teacher_request=TeacherRequest(topk=8, full=False),
        needs=("teacher",),
    )

