"""GRPO: verifier reward, group-normalized advantages, PPO-clipped token loss (METHODS §19).

    A_i = (R_i - mean_G R) / (std_G R + eps)          (broadcast to every token of y_i)
    L   = (1/N) Σ_{i,t} max(-rho_t A_i, -clip(rho_t, 1-eps_l, 1+eps_h) A_i),
    rho_t = exp(log pi_theta(y_t) - log pi_sampler(y_t))

Source: paper (Shao et al., DeepSeekMath); the KL-to-reference term is left out (its
coefficient is 0 in current recipes).
"""

from __future__ import annotations


from opd.losses import grpo_advantages, ppo_clip_loss
from opd.methods.base import Experience, Method, Signal, StudentView, method_info
from opd.methods.knobs import AdvScale, ClipEps
from opd.rollouts.student import student_rollout


def grpo_signal(exp: Experience, scores, *, adv_scale: str) -> Signal:
    group_size = int((exp.group_B == exp.group_B[0]).sum())  # rows are grouped contiguously
    rewards_NG = exp.rewards_B.view(-1, group_size)
    adv_B = grpo_advantages(rewards_NG, scale=adv_scale).reshape(-1)
    mask_BT = exp.batch.completion_mask_BT
    return {
        "mask_BT": mask_BT,
        "adv_BT": adv_B[:, None].expand_as(mask_BT).float() * mask_BT,
        "sampler_logp_BT": exp.sampler_logp_BT,
    }


def grpo_loss(view: StudentView, signal: Signal, *, clip_eps: float):
    loss_BT, metrics = ppo_clip_loss(
        view.logp_BT, signal["sampler_logp_BT"], signal["adv_BT"], clip_low=clip_eps, clip_high=clip_eps
    )
    return loss_BT, {"loss/pg": loss_BT, **metrics}


@method_info(paper="Shao et al., 2402.03300", fixes="baseline (on-policy, sparse reward)", source="paper", recipe={"group_size": 4})
def build(clip_eps: ClipEps = 0.2, adv_scale: AdvScale = "std") -> Method:
    return Method(
        "grpo",
        student_rollout,
        lambda exp, scores: grpo_signal(exp, scores, adv_scale=adv_scale),
        lambda view, signal: grpo_loss(view, signal, clip_eps=clip_eps),
        needs=("verifier",),
        min_group_size=2,
    )
