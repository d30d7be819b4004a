"""OPSD, on-policy self-distillation with a privileged self-teacher (METHODS §5).

Source: paper (Zhao et al. 2601.18734, v1/v2); code (siyan-zhao/OPSD); the v3 details
(forward KL, the ablation FKL > JSD > RKL) are third-party.

Teacher = the frozen initial student (``env.reference``) that sees the reference solution:
``privileged_context`` puts the problem with "Here is a reference solution: {y*}" (on the
testbed: ``y*`` in front of ``x``) in front of the student's own completion. The teacher
only scores the student's rollout, it never generates; ``teacher=...`` in the config is
not used (a run works with ``teacher=None``).

Full-vocabulary loss (default), per position, per-vocabulary-entry clipped from above::

    L_t = Σ_v min(ℓ_{t,v}, τ),   ℓ_{t,v} of kind opsd_divergence at the loss temperature:
      fkl: π_T(v)(log π_T(v) − log π_θ(v))           (v3, default)
      jsd: β·π_T(v)(log π_T(v) − log M(v)) + (1−β)·π_θ(v)(log π_θ(v) − log M(v)),  M = βπ_T + (1−β)π_θ  (v1, β=0.5)
      rkl: π_θ(v)(log π_θ(v) − log π_T(v))

with π_T(·) = π_ref(·|x, y*, c_t) and π_θ(·) = π_θ(·|c_t); ``τ = opsd_clip`` (0.05; 0 = no
clip). This is ``divergence(..., entry_clip=τ)``, which clamps each entry's contribution
before the sum, as OPSD's ``generalized_jsd_loss(token_clip=τ)`` does (a clipped entry gets
no gradient). The loop takes the token mean (OPSD's ``batchmean`` over kept tokens).

Sampled-token variant (``opsd_sampled=True``, about 2 points worse in the paper)::

    A_t = log π_T(y_t|x, y*, c_t) − log π_θ(y_t|c_t),   L_t = −exp(log π_θ − sg(log π_sampler))·sg(A_t)

(``log π_θ`` in ``A_t`` is the student's at sampling time.)

Knobs: ``opsd_divergence`` (fkl), ``beta`` (jsd weight, 0.5), ``opsd_clip`` (0.05),
``opsd_sampled`` (False), ``loss_temperature`` (1.0). Deviation: OPSD's code scores both
sides at the *sampling* temperature (1.1); here the loss temperature is its own knob
(METHODS rule 3): set ``loss_temperature=1.1`` to match the code.
"""

from __future__ import annotations

from typing import Annotated, Literal

from opd.losses import importance_sampling_loss
from opd.methods.full_vocab import teacher_divergence_BT
from opd.methods.base import Experience, Method, Signal, StudentView, TeacherRequest, method_info
from opd.methods.knobs import Beta, LossTemperature, knob
from opd.methods.contexts import privileged_context
from opd.rollouts.student import student_rollout
from opd.signals.opd import floored_log_ratio_BT
from opd.signals.teacher_logp import full_teacher


def opsd_signal(exp: Experience, scores, *, sampled: bool) -> Signal:
    mask_BT = exp.batch.completion_mask_BT
    if not sampled:
        return {"mask_BT": mask_BT, **full_teacher(scores)}
    adv_BT = -floored_log_ratio_BT(exp.sampler_logp_BT, scores.token_logp_BT, mask_BT)  # teacher floored at -100
    return {"mask_BT": mask_BT, "adv_BT": adv_BT, "sampler_logp_BT": exp.sampler_logp_BT, "signal/adv": adv_BT}


def opsd_full_loss(view: StudentView, signal: Signal, *, kind: str, beta: float, clip: float, loss_temperature: float):
    div_BT = teacher_divergence_BT(view, signal, kind, beta=beta, temperature=loss_temperature,
                                   entry_clip=clip if clip > 0 else None)
    return div_BT, {f"loss/{kind}": div_BT}


def opsd_sampled_loss(view: StudentView, signal: Signal):
    loss_BT, metrics = importance_sampling_loss(view.logp_BT, signal["sampler_logp_BT"], signal["adv_BT"])
    return loss_BT, {"loss/pg": loss_BT, **metrics}


@method_info(
    paper="Zhao et al., 2601.18734",
    fixes="no external teacher (privileged self-teacher)",
    source="paper; code (v3 details third-party)",
    recipe={"group_size": 1, "temperature": 1.1},
)
def build(
    opsd_divergence: Annotated[Literal["fkl", "jsd", "rkl"], knob("full-vocabulary divergence (v3 fkl; v1 jsd with beta)")] = "fkl",
    beta: Beta = 0.5,
    opsd_clip: Annotated[float, knob("per-vocabulary-entry clip tau (0 = off)", ge=0)] = 0.05,
    opsd_sampled: Annotated[bool, knob("sampled-token advantage instead of the full-vocabulary divergence")] = False,
    loss_temperature: LossTemperature = 1.0,
) -> Method:
    if opsd_sampled:
        loss = opsd_sampled_loss
    else:
        def loss(view, signal):
            return opsd_full_loss(view, signal, kind=opsd_divergence, beta=beta, clip=opsd_clip, loss_temperature=loss_temperature)
    return Method(
        "opsd",
        student_rollout,
        lambda exp, scores: opsd_signal(exp, scores, sampled=opsd_sampled),
        loss,
        teacher_request=TeacherRequest(topk=8, full=not opsd_sampled),
        needs=("reference", "solutions"),
        context=privileged_context,
    )
