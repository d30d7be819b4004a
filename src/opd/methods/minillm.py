"""MiniLLM: sequence-level reverse KL by policy gradient, with three devices (METHODS §4).

Source: paper (Gu et al. 2306.08543) and code (microsoft/LMOps ``minillm``). Sequences come
from teacher-mixed sampling, ``p̃ = α·π_T + (1−α)·π_θ`` (:mod:`opd.rollouts.mixed`), and the
per-token loss is

    L_t = RKL_t + max(−ρ_t·A_t, −clip(ρ_t, 1−ε, 1+ε)·A_t),    ρ_t = π_θ(y_t) / sg(p̃(y_t))

- single-step term ``RKL_t = Σ_v π_θ(v)(log π_θ(v) − log π_T(v))``, exact over the
  vocabulary and differentiated directly (LMOps ``_reg_loss``: cross-entropy minus entropy);
- long-term term: PPO-clipped policy gradient with ``A_t`` the length-normalized discounted
  return of the clipped, scaled rewards ``r_t' = log π_T(y_t') − log π_θ(y_t')``
  (:mod:`opd.signals.minillm`: "length-normalized" = divided by the number of tokens the
  return sums over, from ``t`` to the end of the sequence), optionally whitened;
- teacher-mixed sampling with the importance weight ``w_t = π_θ(y_t)/p̃(y_t)``: LMOps'
  ratio is ``exp(log π_θ − log π_θ_old) · w_t`` with ``w_t`` from sampling time, which is
  ``π_θ/p̃``; here it is that same ratio, ``exp(log π_θ − sg(log p̃))``, clipped as a whole
  as in LMOps (so a token with ``w_t`` outside ``[1−ε, 1+ε]`` is already clipped at the
  first epoch, as there).

Knobs: ``mix_alpha`` (α, 0.2), ``minillm_gamma`` (γ, 0.95), ``reward_scale`` (0.5: rewards
are *divided* by it, as LMOps' ``reward_scaling``), ``reward_clip`` (±100; 0 = off),
``clip_eps`` (ε, 0.2), ``minillm_whiten`` (whiten A over the step's tokens, True as in
LMOps), ``minillm_future`` (``"from_t"``: the code's return including ``r_t``;
``"after_t"``: the paper's ``R^Norm_{t+1}``, future rewards only).

Deliberate deviations: the single-step term is not weighted by ``w_t`` (as in LMOps; the
paper's estimator weights it); the optional pretraining LM loss (LMOps ``pt_loss``) is left
out; LMOps' 4 PPO epochs are the loop's ``ppo_epochs`` (in the recipe); the teacher is
rescored on the growing prefix at each sampling step (O(T²), see the rollout's doc).
"""

from __future__ import annotations

from typing import Annotated, Literal

from opd.losses import ppo_clip_loss
from opd.methods.full_vocab import teacher_divergence_BT
from opd.methods.base import Experience, Method, Signal, StudentView, TeacherRequest, method_info
from opd.methods.knobs import ClipEps, knob
from opd.rollouts.mixed import mixed_rollout
from opd.signals.teacher_logp import full_teacher
from opd.signals.minillm import importance_weights, length_normalized_returns, minillm_rewards, whiten


def minillm_signal(
    exp: Experience, scores, *, gamma: float, reward_scale: float, reward_clip: float, whiten_adv: bool, future: str
) -> Signal:
    mask_BT = exp.batch.completion_mask_BT
    student_BT, mix_BT = exp.sampler_logp_BT, exp.extra["mix_logp_BT"]
    r_BT = minillm_rewards(scores.token_logp_BT, student_BT, mask_BT, reward_scale=reward_scale, reward_clip=reward_clip)
    adv_BT = length_normalized_returns(r_BT, mask_BT, gamma, future=future)
    if whiten_adv:
        adv_BT = whiten(adv_BT, mask_BT)
    return {
        "mask_BT": mask_BT,
        "adv_BT": adv_BT,
        "mix_logp_BT": mix_BT,
        **full_teacher(scores),
        "signal/reward": r_BT,
        "signal/w": importance_weights(student_BT, mix_BT, mask_BT),
    }


def minillm_loss(view: StudentView, signal: Signal, *, clip_eps: float):
    pg_BT, metrics = ppo_clip_loss(
        view.logp_BT, signal["mix_logp_BT"], signal["adv_BT"], clip_low=clip_eps, clip_high=clip_eps
    )
    rkl_BT = teacher_divergence_BT(view, signal, "rkl")
    return pg_BT + rkl_BT, {"loss/pg": pg_BT, "loss/rkl": rkl_BT, **metrics}


@method_info(
    paper="Gu et al., 2306.08543",
    fixes="myopic supervision (long-term return)",
    source="paper; code",
    recipe={"group_size": 1, "ppo_epochs": 4},
)
def build(
    mix_alpha: Annotated[float, knob("teacher share of the mixed sampling distribution", ge=0, le=1)] = 0.2,
    minillm_gamma: Annotated[float, knob("discount of the long-term reward", ge=0, le=1)] = 0.95,
    reward_scale: Annotated[float, knob("reward scaling", gt=0)] = 0.5,
    reward_clip: Annotated[float, knob("reward clip (absolute; 0 = off)", ge=0)] = 100.0,
    clip_eps: ClipEps = 0.2,
    minillm_whiten: Annotated[bool, knob("whiten the long-term advantages over the step's tokens (LMOps)")] = True,
    minillm_future: Annotated[Literal["from_t", "after_t"], knob("return from t incl. r_t (code) or after t (paper R_{t+1})")] = "from_t",
) -> Method:
    return Method(
        "minillm",
        lambda env, problems, gen: mixed_rollout(env, problems, gen, alpha=mix_alpha),
        lambda exp, scores: minillm_signal(
            exp, scores, gamma=minillm_gamma, reward_scale=reward_scale, reward_clip=reward_clip,
            whiten_adv=minillm_whiten, future=minillm_future,
        ),
        lambda view, signal: minillm_loss(view, signal, clip_eps=clip_eps),
        teacher_request=TeacherRequest(topk=8, full=True),
        needs=("teacher", "full_teacher"),
    )
