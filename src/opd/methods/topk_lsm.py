"""Top-K local support matching: reverse KL on the teacher's top-K, both sides renormalized.

    S_t    = TopK_T(c_t), ties included  (∪ {y_t} with ``lsm_add_sampled``)
    π̂(v)   = π(v) / Σ_{u∈S_t} π(u)        for v ∈ S_t, both student and teacher
    L      = (1/N) Σ_{i,t} m_t Σ_{v∈S_t} π̂_θ(v) (log π̂_θ(v) − log π̂_T(v))     (coefficient 1)

``m_t`` drops the completion positions whose token is a special id (``env.special_ids``:
pad, bos, unk, template tokens; EOS is trained), so ``N`` counts the remaining tokens.
The loss is differentiated directly (an exact divergence on S, not a policy gradient).
Source: code (hhh675597/revisiting_opd, Fu et al. 2603.25562; METHODS §6).

Ties are ties: ``TopK_T`` is every id at least as likely as the teacher's K-th
(:func:`opd.signals.teacher_logp.tied_topk_mask`), so the support never depends on the
order in which ``topk`` breaks ties. That needs the teacher's log-prob of every id: the
method asks for the teacher's full logits. A teacher that returns top-K log-probs only (a
server, ``teacher=http://...``) gives its K ids as S, ties broken by the server: then the
loss is ``sparse_divergence(student, ids, logp, "rkl", renormalize="both")`` on them.
Breaking ties by
order instead gave the noise-free testbed oracle (every word but the intended one tied) a
support of the intended word and whichever 7 tied words came first, the same ones at every
position; the reverse KL on it pushed those words down and left the 13 others free, and a
30-step run from a 0.645 student collapsed to 0.115 greedy accuracy. With ties counted, on
that oracle every K >= 2 makes S the 21 live words (the reverse KL over them: the full
vocabulary's but for the 3 dead ids), while a noisy oracle (``oracle_noise > 0``) or a
model teacher gives a real top-K.

Knobs: ``lsm_k`` (K = 8; the paper's K = 32 is for LLM vocabularies: K >= the vocabulary
size makes S the whole vocabulary and the loss the full-vocabulary reverse KL, which the
run reports as degenerate, as on the 24-token testbed); ``lsm_add_sampled`` (add ``y_t``
to S). Recipe: top-p 0.9 rollouts (top-K alone was worse than the baseline in the paper).

Logged: ``signal/retained_mass`` ``Σ_{v∈S_t} π_T(v)`` (METHODS rule 5),
``signal/support_size`` ``|S_t|`` and ``signal/special_frac``.
Deviations: the paper's code masks the *first occurrence* of template tokens ("<",
"think", "<|im_end|>"); here every position whose token is a special id is masked.
"""

from __future__ import annotations

from typing import Annotated

from functools import partial

import torch

from opd.losses import divergence
from opd.methods.full_vocab import support_divergence_BTK, teacher_support_BTK
from opd.methods.base import Experience, Method, Signal, StudentView, TeacherRequest, method_info
from opd.methods.degeneracy import Degenerate, RunFacts
from opd.methods.knobs import knob
from opd.rollouts.student import student_rollout
from opd.signals.teacher_logp import full_teacher
from opd.signals.topk_lsm import retained_mass, special_token_mask


def lsm_rollout(env, problems, generator) -> Experience:
    """Student samples, with the positions of special tokens (``exp.extra["special_BT"]``)."""
    exp = student_rollout(env, problems, generator)
    exp.extra["special_BT"] = special_token_mask(exp.batch.completion_ids_BT, env.special_ids)
    return exp


def returned_support_BTK(scores, k: int, token_ids_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """S from a top-K teacher: its ``k`` returned ids and log-probs, plus ``y_t`` (with its
    log-prob) when ``token_ids_BT`` is given; a ``y_t`` already among them is a padding
    entry (``-inf``), as are the returned ids with no mass."""
    ids_BTK, logp_BTK = scores.topk_ids_BTK[..., :k], scores.topk_logp_BTK[..., :k]
    if token_ids_BT is None:
        return ids_BTK, logp_BTK
    y_BT1 = token_ids_BT.to(ids_BTK.device).unsqueeze(-1)
    y_logp_BT1 = scores.token_logp_BT.unsqueeze(-1).masked_fill((ids_BTK == y_BT1).any(-1, keepdim=True), float("-inf"))
    return torch.cat([ids_BTK, y_BT1], -1), torch.cat([logp_BTK, y_logp_BT1.to(logp_BTK.dtype)], -1)


def lsm_signal(exp: Experience, scores, *, k: int, add_sampled: bool) -> Signal:
    ids_BT = exp.batch.completion_ids_BT
    sampled_BT = ids_BT if add_sampled else None
    if scores.has_full:
        ids_BTK, logp_BTK = teacher_support_BTK(full_teacher(scores), tuple(ids_BT.shape), k, sampled_BT)
    else:  # a top-K teacher (a server): its ids, ties as it broke them
        ids_BTK, logp_BTK = returned_support_BTK(scores, k, sampled_BT)
    valid_BTK = logp_BTK > float("-inf")
    completion_BT = exp.batch.completion_mask_BT
    special_BT = exp.extra["special_BT"] & completion_BT
    return {
        "mask_BT": completion_BT & ~special_BT,
        "support_ids_BTK": ids_BTK,
        "support_logp_BTK": logp_BTK,
        "signal/retained_mass": retained_mass(logp_BTK, valid_BTK),
        "signal/support_size": valid_BTK.sum(-1).float(),
        "signal/special_frac": special_BT.sum() / completion_BT.sum().clamp(min=1),
    }


def support_divergence(
    student_logits_BTV: torch.Tensor, teacher_logp_BTV: torch.Tensor, support_BTV: torch.Tensor, kind: str = "rkl"
) -> torch.Tensor:
    """The divergence ``kind`` on S, both sides renormalized on it -> ``[B, T]``; rkl:
    ``Σ_{v∈S} π̂_θ(v)(log π̂_θ(v) − log π̂_T(v))``.

    The naive reference of :func:`opd.methods.full_vocab.support_divergence_BTK`, which the
    methods use (the support as ids, never ``[B, T, V]``). S is ``support_BTV``; outside it both sides are ``-inf`` (no mass, no gradient), and the
    softmax inside ``divergence`` renormalizes both sides on S. With S the teacher's top-K
    (no ties) it equals ``sparse_divergence(..., kind, renormalize="both")``. Also EOPD's
    forward KL on the teacher's top-K.
    """
    s_BTV = student_logits_BTV.masked_fill(~support_BTV, float("-inf"))
    t_BTV = teacher_logp_BTV.masked_fill(~support_BTV, float("-inf"))
    return divergence(s_BTV, t_BTV, kind)


def lsm_loss(view: StudentView, signal: Signal):
    rkl_BT = support_divergence_BTK(view, signal["support_ids_BTK"], signal["support_logp_BTK"], "rkl")
    return rkl_BT, {"loss/rkl_topk": rkl_BT}


def lsm_degenerate(facts: RunFacts, *, k: int, add_sampled: bool) -> Degenerate | None:
    """The whole vocabulary as support (full-vocabulary reverse KL: K >= V, or ties that
    filled it at every token of the first step), or a one-token support (the renormalized KL
    is 0: no loss at all)."""
    becomes = "the full-vocabulary reverse KL (gkd with lmbda=1, beta=1)"
    if facts.vocab_size is not None and k >= facts.vocab_size:
        return Degenerate("lsm_k", becomes, f"lsm_k={k} >= the vocabulary size {facts.vocab_size}, so the support is every token")
    if k == 1 and not add_sampled:
        why = "the support is the teacher's most likely token alone (unless tied), on which the renormalized KL is 0"
        return Degenerate("lsm_k", "a zero loss", why)
    size = facts.metric("signal/support_size")
    if size is not None and facts.vocab_size is not None and size >= facts.vocab_size:
        return Degenerate("lsm_k", becomes, "the teacher's ties filled the whole vocabulary at every token of the first step")
    return None


@method_info(paper="Fu et al., 2603.25562", fixes="local noise", source="code", recipe={"top_p": 0.9})
def build(
    lsm_k: Annotated[int, knob("teacher top-K support size (the paper's 32 is for LLM vocabularies)", ge=1)] = 8,
    lsm_add_sampled: Annotated[bool, knob("add the sampled token to the support")] = False,
) -> Method:
    return Method(
        "topk_lsm",
        lsm_rollout,
        partial(lsm_signal, k=lsm_k, add_sampled=lsm_add_sampled),
        lsm_loss,
        teacher_request=TeacherRequest(topk=lsm_k, full=True),
        needs=("teacher",),  # full logits when the teacher has them (ties counted), else its top-K
        degenerate=partial(lsm_degenerate, k=lsm_k, add_sampled=lsm_add_sampled),
    )
