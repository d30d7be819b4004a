"""GKD: generalized JSD on a mix of on-policy and off-policy sequences (METHODS §3).

    M = beta·P_T + (1-beta)·Q_theta,  JSD_beta = beta·KL(P_T‖M) + (1-beta)·KL(Q_theta‖M)
    L = (1/N) Σ_{i,t} JSD_beta(t)          (full vocabulary, per position)

Each step is on-policy (student samples) with probability ``lmbda``, else it trains on
the dataset's solutions, or on teacher samples when ``seq_kd`` is set. ``beta=0`` is
forward KL, ``beta=1`` reverse KL. No gradient flows through the sampling.
Source: paper; code (TRL ``GKDTrainer.generalized_jsd_loss``).
"""

from __future__ import annotations

from typing import Annotated

import torch

from opd.methods.full_vocab import teacher_divergence_BT
from opd.methods.base import Experience, Method, Signal, StudentView, TeacherRequest, method_info
from opd.methods.knobs import Beta, LossTemperature, knob
from opd.rollouts.student import solution_rollout, student_rollout, teacher_rollout
from opd.signals.teacher_logp import full_teacher


def gkd_rollout(env, problems, generator, *, lmbda: float, seq_kd: bool) -> Experience:
    if float(torch.rand((), generator=generator, device="cpu")) < lmbda:
        return student_rollout(env, problems, generator)
    off = teacher_rollout if seq_kd else solution_rollout
    return off(env, problems, generator)


def gkd_signal(exp: Experience, scores) -> Signal:
    return {"mask_BT": exp.batch.completion_mask_BT, **full_teacher(scores)}


def gkd_loss(view: StudentView, signal: Signal, *, beta: float, loss_temperature: float):
    jsd_BT = teacher_divergence_BT(view, signal, "jsd", beta=beta, temperature=loss_temperature)
    return jsd_BT, {"loss/jsd": jsd_BT}


def gkd_needs(lmbda: float, seq_kd: bool) -> tuple[str, ...]:
    off_policy = lmbda < 1.0
    return ("teacher", "full_teacher") + (("teacher_generate",) if off_policy and seq_kd else ()) + (
        ("solutions",) if off_policy and not seq_kd else ()
    )


@method_info(paper="Agarwal et al., 2306.13649", fixes="baseline (on/off-policy mix)", source="code", recipe={"temperature": 0.9})
def build(
    beta: Beta = 0.5,
    lmbda: Annotated[float, knob("probability of an on-policy step", ge=0, le=1)] = 0.5,
    seq_kd: Annotated[bool, knob("off-policy steps use teacher samples instead of dataset solutions")] = False,
    loss_temperature: LossTemperature = 1.0,
) -> Method:
    return Method(
        "gkd",
        lambda env, problems, gen: gkd_rollout(env, problems, gen, lmbda=lmbda, seq_kd=seq_kd),
        gkd_signal,
        lambda view, signal: gkd_loss(view, signal, beta=beta, loss_temperature=loss_temperature),
        teacher_request=TeacherRequest(topk=8, full=True),
        needs=gkd_needs(lmbda, seq_kd),
    )
