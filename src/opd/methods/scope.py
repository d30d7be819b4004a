"""SCOPE: weighted MLE on correct rollouts, perplexity-weighted OPD on wrong ones.

Per prompt, N rollouts split by the verifier into correct Ω_c and wrong Ω_w;
``ρ_t = π_θ(y_t)/π_old(y_t)`` (π_old: the sampler's log-probs), ``PPL = exp(−mean_t log π(y_t))``:

    correct: L_i = −w_i Σ_t ρ_t,                                w_i ∝ PPL_S(y_i)^{1/τ}  within Ω_c
    wrong:   L_i =  w_i Σ_t ρ_t · sg(log π_θ(y_t) − log π_T(y_t)), w_i ∝ PPL_T(y_i)^{−1/τ} within Ω_w

Source: paper (Zheng et al., 2604.10688, full text; METHODS §8).

How the weights meet the loop's token mean: the weights are normalized within each branch
of each group to *sum to 1* (METHODS §8, "normalized within Ω_c / Ω_w"), then scaled by the
group's row count ``G``, ``w̃_i = G·w_i/Σ_{j∈Ω} w_j`` (the scale, the same for every group,
only fixes the loss's magnitude); every token of row i is multiplied by ``w̃_i`` and the loop
divides the step's sum by the number of completion tokens. So the two branches of a group
weigh the same whatever their sizes: with 1 correct and 7 wrong rollouts and uniform
weights, the correct row weighs 8 and each wrong row 8/7, not 1 each (which would give the
wrong branch 7× the weight). A group whose rows all fall in one branch, with uniform weights
(τ → ∞, or equal perplexities), is exactly the plain token-mean MLE/OPD loss; a group with
an empty branch contributes only the other.

``PPL_S`` uses the sampler's log-probs (π_old, temperature 1 as recorded by the sampler),
``PPL_T`` the teacher's log-probs of the sampled tokens. Both losses are the
importance-sampling surrogate ``−ρ_t·sg(A_t)`` (``A = w̃`` or ``−w̃·δ``; no clip, as the
paper writes ρ_t plainly); ``sg(log π_θ)`` inside δ is the learner's current log-prob.
Knob: ``scope_tau`` (τ = 1.0). Recipe: 8 rollouts per prompt, temperature 0.6.
"""

from __future__ import annotations

from typing import Annotated

from functools import partial

from opd.losses import importance_sampling_loss, perplexity
from opd.methods.base import Experience, Method, Signal, StudentView, TeacherRequest, method_info
from opd.methods.knobs import knob
from opd.rollouts.student import student_rollout
from opd.signals.scope import scope_advantages, scope_weights
from opd.signals.teacher_logp import floor_logp


def scope_signal(exp: Experience, scores, *, tau: float) -> Signal:
    mask_BT = exp.batch.completion_mask_BT
    correct_B = exp.rewards_B > 0.5
    teacher_BT = scores.token_logp_BT
    weight_B = scope_weights(exp.sampler_logp_BT, teacher_BT, mask_BT, correct_B, exp.group_B, tau)
    return {
        "mask_BT": mask_BT,
        "weight_B": weight_B.float(),
        "correct_B": correct_B,
        "teacher_logp_BT": teacher_BT,
        "sampler_logp_BT": exp.sampler_logp_BT,
        "signal/correct_frac": correct_B.float(),
        "signal/row_weight": weight_B[:, None].float().expand_as(mask_BT),  # token mean: 1 if uniform
        "signal/ppl_student": perplexity(exp.sampler_logp_BT.double(), mask_BT),
        "signal/ppl_teacher": perplexity(floor_logp(teacher_BT.double()), mask_BT),
    }


def scope_loss(view: StudentView, signal: Signal):
    correct_B = signal["correct_B"]
    adv_BT = scope_advantages(
        signal["weight_B"], correct_B, view.logp_BT, signal["teacher_logp_BT"], signal["mask_BT"]
    )
    loss_BT, metrics = importance_sampling_loss(view.logp_BT, signal["sampler_logp_BT"], adv_BT)
    correct_BT = correct_B[:, None].expand_as(loss_BT)
    detached_BT = loss_BT.detach()
    return loss_BT, {
        "loss/pg": loss_BT,
        "loss/mle": detached_BT.where(correct_BT, 0.0),  # the two parts add up to loss/pg
        "loss/opd": detached_BT.where(~correct_BT, 0.0),
        **metrics,
    }


@method_info(
    paper="Zheng et al., 2604.10688", fixes="local noise", source="paper",
    recipe={"group_size": 8, "temperature": 0.6},
)
def build(scope_tau: Annotated[float, knob("perplexity weight temperature", gt=0)] = 1.0) -> Method:
    return Method(
        "scope",
        student_rollout,
        partial(scope_signal, tau=scope_tau),
        scope_loss,
        teacher_request=TeacherRequest(topk=8, full=False),
        needs=("teacher", "verifier"),
        min_group_size=2,
    )
