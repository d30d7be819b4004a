"""Top-K local support matching: reverse KL on the teacher's top-K, both sides renormalized.

    S_t    = TopK_T(c_t)  (∪ {y_t} with ``lsm_add_sampled``)
    π̂(v)   = π(v) / Σ_{u∈S_t} π(u)        for v ∈ S_t, both student and teacher
    L      = (1/N) Σ_{i,t} m_t Σ_{v∈S_t} π̂_θ(v) (log π̂_θ(v) − log π̂_T(v))     (coefficient 1)

``m_t`` drops the completion positions whose token is a special id (``env.special_ids``:
pad, bos, unk, template tokens; EOS is trained), so ``N`` counts the remaining tokens.
The loss is differentiated directly (an exact divergence on S, not a policy gradient).
Source: code (hhh675597/revisiting_opd, Fu et al. 2603.25562; METHODS §6).

Knobs: ``lsm_k`` (K = 8; the paper's K = 32 is for LLM vocabularies: the teacher clamps K
to the vocabulary size, so on the 24-token testbed K = 32 makes S the whole vocabulary and
the loss the full-vocabulary reverse KL, which the run reports as degenerate);
``lsm_add_sampled``
(add ``y_t`` as a K+1-th element with the teacher's ``log π_T(y_t)``; nothing is added
where ``y_t`` is already in the top K). Recipe: top-p 0.9 rollouts (top-K alone was worse
than the baseline in the paper).

The teacher may be sparse: only its top-K ids/log-probs and the sampled token's log-prob
are read; the student's logits are gathered on those ids. Logged: ``signal/retained_mass``
``Σ_{v∈S_t} π_T(v)`` (METHODS rule 5) and ``signal/special_frac``.
Deviations: the paper's code masks the *first occurrence* of template tokens ("<",
"think", "<|im_end|>"); here every position whose token is a special id is masked.
"""

from __future__ import annotations

from typing import Annotated

from functools import partial

import torch

from opd.losses import divergence
from opd.methods.base import Experience, Method, Signal, StudentView, TeacherRequest, method_info
from opd.methods.degeneracy import Degenerate, RunFacts
from opd.methods.knobs import knob
from opd.rollouts.student import student_rollout
from opd.signals.teacher_logp import floor_logp
from opd.signals.topk_lsm import retained_mass, special_token_mask, teacher_support


def lsm_rollout(env, problems, generator) -> Experience:
    """Student samples, with the positions of special tokens (``exp.extra["special_BT"]``)."""
    exp = student_rollout(env, problems, generator)
    exp.extra["special_BT"] = special_token_mask(exp.batch.completion_ids_BT, env.special_ids)
    return exp


def lsm_signal(exp: Experience, scores, *, add_sampled: bool) -> Signal:
    sampled = (exp.batch.completion_ids_BT, floor_logp(scores.token_logp_BT)) if add_sampled else (None, None)
    ids_BTS, logp_BTS, keep_BTS = teacher_support(scores.topk_ids_BTK, floor_logp(scores.topk_logp_BTK), *sampled)
    completion_BT = exp.batch.completion_mask_BT
    special_BT = exp.extra["special_BT"] & completion_BT
    return {
        "mask_BT": completion_BT & ~special_BT,
        "support_ids_BTS": ids_BTS,
        "teacher_logp_BTS": logp_BTS,
        "keep_BTS": keep_BTS,
        "signal/retained_mass": retained_mass(logp_BTS, keep_BTS),
        "signal/special_frac": special_BT.sum() / completion_BT.sum().clamp(min=1),
    }


def support_rkl(
    student_logits_BTV: torch.Tensor, ids_BTS: torch.Tensor, teacher_logp_BTS: torch.Tensor, keep_BTS: torch.Tensor
) -> torch.Tensor:
    """``Σ_{v∈S} π̂_θ(v)(log π̂_θ(v) − log π̂_T(v))`` -> ``[B, T]``, both renormalized on S.

    S is the kept entries of ``ids_BTS``. The student's logits gathered on S and the
    teacher's log-probs there are full-support inputs to ``divergence`` over the S axis, whose
    softmax renormalizes both sides on S; dropped entries are ``-inf`` on both sides (no
    mass, no gradient). Equal to ``sparse_divergence(..., "rkl", renormalize="both")``
    when every entry is kept.
    """
    s_BTS = student_logits_BTV.gather(-1, ids_BTS).masked_fill(~keep_BTS, float("-inf"))
    t_BTS = teacher_logp_BTS.masked_fill(~keep_BTS, float("-inf"))
    return divergence(s_BTS, t_BTS, "rkl")


def lsm_loss(view: StudentView, signal: Signal):
    rkl_BT = support_rkl(view.logits_BTV, signal["support_ids_BTS"], signal["teacher_logp_BTS"], signal["keep_BTS"])
    return rkl_BT, {"loss/rkl_topk": rkl_BT}


def lsm_degenerate(facts: RunFacts, *, k: int, add_sampled: bool) -> Degenerate | None:
    """The whole vocabulary as support (full-vocabulary reverse KL), or a one-token support
    (the renormalized KL is 0: no loss at all)."""
    if facts.vocab_size is not None and k >= facts.vocab_size:
        why = f"lsm_k={k} >= the vocabulary size {facts.vocab_size}, so the support is every token"
        return Degenerate("lsm_k", "the full-vocabulary reverse KL (gkd with lmbda=1, beta=1)", why)
    if k == 1 and not add_sampled:
        return Degenerate("lsm_k", "a zero loss", "a one-token support renormalizes to probability 1 on both sides")
    return None


@method_info(paper="Fu et al., 2603.25562", fixes="local noise", source="code", recipe={"top_p": 0.9})
def build(
    lsm_k: Annotated[int, knob("teacher top-K support size (the paper's 32 is for LLM vocabularies)", ge=1)] = 8,
    lsm_add_sampled: Annotated[bool, knob("add the sampled token to the support")] = False,
) -> Method:
    return Method(
        "topk_lsm",
        lsm_rollout,
        partial(lsm_signal, add_sampled=lsm_add_sampled),
        lsm_loss,
        teacher_request=TeacherRequest(topk=lsm_k, full=False),
        needs=("teacher",),
        degenerate=partial(lsm_degenerate, k=lsm_k, add_sampled=lsm_add_sampled),
    )
