"""Prefix teach, suffix fade: OPD whose loss stops where the teacher's margin collapses.

Source: reconstruction (METHODS §13; Liu et al. 2605.13643, abstract only). This is an
operational reading of the abstract, not a reproduction of the paper. Per rollout
(equations in :mod:`opd.signals.suffix_fade`):

1. ``g_t``: the teacher's margin over the student's top-``fade_k`` candidates ``C_t``
   (``fade_margin="gap"``: best minus second-best teacher log-prob in ``C_t``;
   ``"sampled"``: teacher log-prob of ``y_t`` minus the best in ``C_t``).
2. Steps: a token whose id is in ``env.boundary_ids`` ends a step (testbed: ``;``; real
   tokenizers: tokens holding a newline or ending in ``. ! ? ;``, see
   :func:`opd.run.setup.boundary_ids`); with no boundary ids, fixed windows of ``fade_window``
   tokens. ``m_s`` = mean of ``g_t`` over step ``s``.
3. A single downward mean shift in ``m_1..m_n``, accepted when the BIC-style statistic
   ``n·log(RSS_0/RSS_1) > fade_penalty · log n`` (at least 3 steps).
4. The loss mask keeps the steps before the change point (all of them when none is found);
   the rollout itself stays full length. On the kept tokens the loss is plain per-token
   OPD (:mod:`opd.methods.opd`: ``gamma``, ``kl_coef``, ``opd_loss``, ``clip_eps``); the
   normalizer is the kept-token count (METHODS rule 4).

Deliberate choices: the paper segments sentences with NLTK; here segmentation is a pure
function of a boolean boundary mask (token ids, no text). The student's top-K comes from a
no-grad forward pass right after sampling (same weights). The teacher's log-probs on the
student's candidates need full teacher logits (``needs`` "full_teacher"); a teacher that
only returns its own top-K cannot score arbitrary candidates. The teacher's sampled-token
log-prob is floored at -100 nats in the OPD reward (as in Prune-OPD).

Logged: ``signal/change_point`` (mean over rows of the token position where supervision
stops, relative to the rollout length; 1 = no change point), ``signal/change_rate`` (share
of rows with a change point), ``signal/margin`` (mean ``g_t`` over generated tokens) and,
by the loop, ``signal/kept_frac``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from opd.losses import discounted_returns
from opd.methods.full_vocab import per_position
from opd.signals.teacher_logp import full_teacher
from opd.methods.base import Experience, Method, RolloutEnv, Signal, TeacherRequest, method_info
from opd.methods.degeneracy import Degenerate, RunFacts
from opd.methods.knobs import ClipEps, Gamma, KlCoef, OpdLoss, knob
from opd.methods.opd import opd_token_loss
from opd.methods.prune_opd import with_student_topk
from opd.rollouts.student import student_rollout
from opd.signals.prune import floored_log_ratio_BT
from opd.signals.suffix_fade import (
    candidate_logp_BTK,
    change_point_B,
    fade_mask_BT,
    segment_ids_BT,
    step_means_BS,
    teacher_margin_BT,
    window_boundaries_BT,
)
from opd.tasks.base import Problem


def boundary_mask_BT(exp: Experience, boundary_ids: tuple[int, ...], window: int) -> torch.Tensor:
    """Tokens that end a step: ids in ``boundary_ids``, or every ``window``-th token."""
    mask_BT = exp.batch.completion_mask_BT
    if not boundary_ids:
        return window_boundaries_BT(mask_BT, window)
    ids = torch.tensor(boundary_ids, dtype=torch.long, device=mask_BT.device)
    return torch.isin(exp.batch.completion_ids_BT, ids) & mask_BT


def fade_signal(exp: Experience, scores, *, margin: str, penalty: float, gamma: float, kl_coef: float) -> Signal:
    mask_BT = exp.batch.completion_mask_BT
    cand_BTK = per_position(full_teacher(scores), candidate_logp_BTK, exp.extra["student_topk_ids_BTK"], floored=False)
    margin_BT = teacher_margin_BT(cand_BTK, scores.token_logp_BT, mode=margin)
    seg_BT = segment_ids_BT(exp.extra["boundary_BT"], mask_BT)
    means_BS, counts_BS = step_means_BS(margin_BT, seg_BT, mask_BT)
    keep_steps_B = change_point_B(means_BS, counts_BS > 0, penalty=penalty)
    keep_BT = fade_mask_BT(seg_BT, mask_BT, keep_steps_B)
    log_ratio_BT = floored_log_ratio_BT(exp.sampler_logp_BT, scores.token_logp_BT, mask_BT)
    gen_B, kept_B = mask_BT.sum(-1), keep_BT.sum(-1)
    n_gen = gen_B.sum().clamp(min=1)
    return {
        "mask_BT": keep_BT,
        "adv_BT": discounted_returns(-kl_coef * log_ratio_BT, keep_BT, gamma),
        "sampler_logp_BT": exp.sampler_logp_BT,
        "log_ratio_BT": log_ratio_BT,
        "signal/change_point": kept_B.float() / gen_B.clamp(min=1).float(),
        "signal/change_rate": (kept_B < gen_B).float(),
        "signal/margin": (margin_BT * mask_BT).sum() / n_gen,
    }


def fade_degenerate(facts: RunFacts) -> Degenerate | None:
    if facts.metric("signal/change_rate") == 0.0:
        return Degenerate("fade_penalty", "opd", "no rollout of the first step had a change point, so the mask kept every token")
    return None


@method_info(paper="Liu et al., 2605.13643", fixes="horizon decay", source="reconstruction", recipe={})
def build(
    fade_k: Annotated[int, knob("student top-K candidates of the teacher margin", ge=1)] = 8,
    fade_penalty: Annotated[float, knob("BIC penalty multiplier of the change point", ge=0)] = 1.0,
    fade_margin: Annotated[Literal["gap", "sampled"], knob("teacher margin: best minus 2nd-best of the student's top-K, or sampled token minus best")] = "gap",
    fade_window: Annotated[int, knob("tokens per step when the tokenizer has no sentence-boundary ids", ge=1)] = 16,
    gamma: Gamma = 0.0,
    kl_coef: KlCoef = 1.0,
    opd_loss: OpdLoss = "is",
    clip_eps: ClipEps = 0.2,
) -> Method:
    if fade_margin == "gap" and fade_k < 2:
        raise ValueError("suffix_fade with fade_margin=gap needs fade_k >= 2")

    def rollout(env: RolloutEnv, problems: list[Problem], generator: torch.Generator) -> Experience:
        exp = with_student_topk(student_rollout(env, problems, generator), env, fade_k)
        exp.extra["boundary_BT"] = boundary_mask_BT(exp, env.boundary_ids, fade_window)
        return exp

    return Method(
        "suffix_fade",
        rollout,
        lambda exp, scores: fade_signal(exp, scores, margin=fade_margin, penalty=fade_penalty, gamma=gamma, kl_coef=kl_coef),
        lambda view, sig: opd_token_loss(view, sig, opd_loss=opd_loss, clip_eps=clip_eps),
        teacher_request=TeacherRequest(topk=fade_k, full=True),
        needs=("teacher", "full_teacher", "boundaries"),
        degenerate=fade_degenerate,
    )
