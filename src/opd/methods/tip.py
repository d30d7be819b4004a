"""TIP: distill only the most informative tokens, chosen by student entropy and divergence.

    h_t = H(π_θ(·|c_t)),   d_t = RKL_t = Σ_v π_θ(v)(log π_θ(v) − log π_T(v))
    s_t = ĥ_t + d̂_t − ĥ_t·d̂_t           (min-max normalized over the step's completion tokens)
    K   = the ⌈ρ·N⌉ tokens with the largest s_t
    L   = (1/|K|) Σ_{t∈K} RKL_t           (full vocabulary, differentiated directly)

Source: third-party audit of Xu et al., 2604.14084 (METHODS §7). Low-entropy,
high-divergence tokens ("overconfident and wrong") score high through ``d̂``; uncertain
tokens through ``ĥ``.

Readings chosen: ``h`` and ``d`` are known before the loss (the selection is a mask) from a
no-grad forward of the student at the rollout's weights, run right after sampling (its
logits travel in ``exp.extra["student_logits_BTV"]``, ``[B, T, V]`` float32); ``d`` is the
exact full-vocabulary reverse KL (the loss's own quantity), not a sampled-token estimate.
Min-max spans the whole step's completion tokens (no spread → every score 0, ties broken by
position); selection is ``⌈ρ·N⌉`` tokens over the whole step, not per sequence. The
dropped tokens leave ``mask_BT``, so the loop normalizes by the kept count (METHODS rule 4).
Knob: ``tip_rho`` (ρ = 0.5). Needs full teacher logits.
"""

from __future__ import annotations

from typing import Annotated

from functools import partial

import torch

from opd.losses import divergence, entropy, masked_token_mean
from opd.methods.base import Experience, Method, Signal, StudentView, TeacherRequest, method_info
from opd.methods.degeneracy import Degenerate, RunFacts
from opd.methods.knobs import knob
from opd.models.hf import completion_logits
from opd.rollouts.student import student_rollout
from opd.signals.teacher_logp import floored_logp_V
from opd.signals.tip import keep_top_fraction, tip_score


@torch.no_grad()
def frozen_logits(model, batch) -> torch.Tensor:
    """The student's completion logits ``[B, T, V]`` without gradient, in eval mode (as sampled)."""
    was_training = model.training
    model.eval()
    logits_BTV = completion_logits(model, batch)
    model.train(was_training)
    return logits_BTV


def tip_rollout(env, problems, generator) -> Experience:
    exp = student_rollout(env, problems, generator)
    exp.extra["student_logits_BTV"] = frozen_logits(env.student, exp.batch)
    return exp


def tip_signal(exp: Experience, scores, *, rho: float) -> Signal:
    student_BTV, teacher_BTV = exp.extra["student_logits_BTV"], scores.full_logits_BTV()
    completion_BT = exp.batch.completion_mask_BT
    h_BT = entropy(student_BTV)
    d_BT = divergence(student_BTV, floored_logp_V(teacher_BTV.to(student_BTV.device)), "rkl")
    score_BT = tip_score(h_BT, d_BT, completion_BT)
    keep_BT = keep_top_fraction(score_BT, completion_BT, rho)
    return {
        "mask_BT": keep_BT,
        "teacher_logits_BTV": teacher_BTV,
        "signal/student_entropy": h_BT,  # means over the kept tokens
        "signal/rkl": d_BT,
        "signal/tip_score": score_BT,
        "signal/student_entropy_all": masked_token_mean(h_BT, completion_BT),
        "signal/rkl_all": masked_token_mean(d_BT, completion_BT),
    }


def tip_loss(view: StudentView, signal: Signal):
    rkl_BT = divergence(view.logits_BTV, floored_logp_V(signal["teacher_logits_BTV"]), "rkl")
    return rkl_BT, {"loss/rkl": rkl_BT}


def tip_degenerate(facts: RunFacts, *, rho: float) -> Degenerate | None:
    if rho >= 1.0:
        return Degenerate("tip_rho", "the full-vocabulary reverse KL on every token (gkd with lmbda=1, beta=1)", "tip_rho=1 keeps every token")
    return None


@method_info(paper="Xu et al., 2604.14084", fixes="local noise", source="third-party")
def build(tip_rho: Annotated[float, knob("fraction of tokens kept", gt=0, le=1)] = 0.5) -> Method:
    return Method(
        "tip",
        tip_rollout,
        partial(tip_signal, rho=tip_rho),
        tip_loss,
        teacher_request=TeacherRequest(topk=8, full=True),
        needs=("teacher", "full_teacher"),
        degenerate=partial(tip_degenerate, rho=tip_rho),
    )
