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
completion hidden states travel in ``exp.extra["student_hidden_BTH"]`` with its head; ``h``
and ``d`` are made from them chunk by chunk, never ``[B, T, V]``); ``d`` is the
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

from opd.losses import masked_token_mean
from opd.losses.chunked import chunked_divergence
from opd.losses.selective import token_logp_and_stats
from opd.methods.base import Experience, Method, Signal, StudentView, TeacherRequest, method_info
from opd.methods.degeneracy import Degenerate, RunFacts
from opd.methods.knobs import knob
from opd.methods.full_vocab import teacher_divergence_BT, teacher_of
from opd.models.head import head_params
from opd.models.hf import completion_hidden
from opd.rollouts.student import student_rollout
from opd.signals.teacher_logp import TEACHER_LOGP_FLOOR, Head, full_teacher
from opd.signals.tip import keep_top_fraction, tip_score


@torch.no_grad()
def frozen_hidden(model, batch) -> torch.Tensor:
    """The student's completion hidden states ``[B, T, H]`` without gradient, in eval mode (as sampled)."""
    was_training = model.training
    model.eval()
    hidden_BTH = completion_hidden(model, batch)
    model.train(was_training)
    return hidden_BTH


def tip_rollout(env, problems, generator) -> Experience:
    exp = student_rollout(env, problems, generator)
    exp.extra["student_hidden_BTH"] = frozen_hidden(env.student, exp.batch)
    exp.extra["student_head"] = Head(*(None if t is None else t.detach() for t in head_params(env.student.get_output_embeddings())))
    return exp


@torch.no_grad()
def student_entropy_rkl(exp: Experience, teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h_BT, d_BT)``: the frozen student's entropy and its reverse KL to the teacher
    (floored as in the loss), chunk by chunk from its hidden states and head."""
    hidden_BTH, head = exp.extra["student_hidden_BTH"], exp.extra["student_head"]
    ids_BT = exp.batch.completion_ids_BT.to(hidden_BTH.device)
    _, h_BT, _ = token_logp_and_stats(hidden_BTH, head.weight_VH, ids_BT, topk=0, bias_V=head.bias_V)
    d_BT = chunked_divergence(hidden_BTH, head.weight_VH, teacher, "rkl", bias_V=head.bias_V, teacher_floor=TEACHER_LOGP_FLOOR)
    return h_BT.float(), d_BT.float()


def tip_signal(exp: Experience, scores, *, rho: float) -> Signal:
    completion_BT = exp.batch.completion_mask_BT
    full = full_teacher(scores)
    h_BT, d_BT = student_entropy_rkl(exp, teacher_of(full))
    score_BT = tip_score(h_BT, d_BT, completion_BT)
    keep_BT = keep_top_fraction(score_BT, completion_BT, rho)
    return {
        "mask_BT": keep_BT,
        **full,
        "signal/student_entropy": h_BT,  # means over the kept tokens
        "signal/rkl": d_BT,
        "signal/tip_score": score_BT,
        "signal/student_entropy_all": masked_token_mean(h_BT, completion_BT),
        "signal/rkl_all": masked_token_mean(d_BT, completion_BT),
    }


def tip_loss(view: StudentView, signal: Signal):
    rkl_BT = teacher_divergence_BT(view, signal, "rkl")
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
