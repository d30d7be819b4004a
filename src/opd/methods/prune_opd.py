"""Prune-OPD: reliability-weighted OPD on the reliable prefix, with an adaptive budget.

Source: reconstruction (METHODS §12; Yang et al. 2605.07804, abstract only). This is an
operational reading of the abstract, not a reproduction of the paper. Per rollout
(equations in :mod:`opd.signals.prune`)::

    o_t = |TopK_theta(c_t) ∩ TopK_T(c_t)| / k,   D_t = #{t' <= t : o_t' < delta},   w_t = eta^{D_t}
    keep_t = 1[w_t >= w_min],   L_eff = Σ_t keep_t
    r_t = -c · (log pi_sampler(y_t) - log pi_T(y_t)),   A_t = Σ_{t'>=t, kept} gamma^{t'-t} w_t' r_t'
    L   = OPD's importance-sampling (or PPO) loss with sg(A_t), token mean over kept tokens

and after every step the generation budget ``N`` of the next one is updated
(:func:`opd.signals.prune.next_budget`): ``N <- ceil(N · grow)`` when most rollouts stayed
reliable through all they generated, else ``N <- quantile_q(L_eff)``; clamped to
``[1, max_new_tokens]``, starting at ``max_new_tokens``. The budget is ``Method.state`` and
is saved with checkpoints.

Ties are ties: the overlap counts the teacher's ids tied with its k-th log-prob as a set
(:func:`opd.signals.prune.tied_topk_overlap_BT`), so it needs the teacher's log-probs at the
student's ids: Prune-OPD asks for the teacher's full logits (``needs`` "full_teacher", as
suffix_fade). On the noise-free testbed oracle (every word but the intended one tied) a
student's top-k of live words always shares at least ``k − 1`` ids with one of the oracle's
equally valid top-k sets, so at ``prune_delta = 0.5`` any ``k >= 2`` never drifts and the
method is ``opd``; the default ``prune_k = 1`` (drift = the student's most likely token is
not the teacher's) is the setting that means something there. The run reports a first step
without any drift event as degenerate.

Knobs: ``prune_k`` (top-K size on both sides, 1), ``prune_delta``, ``prune_eta``,
``prune_w_min``, ``prune_quantile``, ``prune_grow``, ``max_new_tokens`` (the cap), and the
OPD knobs ``gamma``, ``kl_coef``, ``opd_loss``, ``clip_eps``.

Deliberate choices (the abstract leaves them open):
- The student's top-K is computed right after sampling by one no-grad forward pass of the
  same weights over the sampled batch (the sampler only records the sampled token's
  log-prob), and travels in ``exp.extra["student_topk_ids_BTK"]``.
- "Stop generating once w_t < w_min" needs online teacher scoring during sampling; with one
  teacher pass after the rollout we stop *supervising* there and let the adaptive budget cut
  generation at later steps.
- With ``gamma > 0`` the weighted rewards are summed over the kept prefix only.
- The teacher's sampled-token log-prob is floored at -100 nats (a ``-inf`` would make the
  reward infinite); the floor never binds for a teacher with full support.

Logged: ``signal/drift_rate`` (drift events per generated token), ``signal/overlap`` (mean
``o_t`` over generated tokens), ``signal/reliable_len`` (mean ``L_eff``), ``signal/reliability``
(mean ``w_t`` over kept tokens), ``rollout/budget`` (tokens allowed this step).
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

import torch

from opd.batch import SeqBatch
from opd.losses import discounted_returns
from opd.methods.base import Experience, Method, RolloutEnv, Signal, TeacherRequest, method_info
from opd.methods.degeneracy import Degenerate, RunFacts
from opd.methods.knobs import ClipEps, Gamma, KlCoef, OpdLoss, knob
from opd.methods.opd import opd_token_loss
from opd.methods.truncation import budget_metric, budget_rollout
from opd.rollouts.budget import LengthBudget, adaptive_budget
from opd.signals.prune import (
    drift_reliability_BT,
    floored_log_ratio_BT,
    next_budget,
    reliable_mask_BT,
    tied_topk_overlap_BT,
)
from opd.methods.full_vocab import frozen_student_stats, per_position
from opd.signals.teacher_logp import full_teacher
from opd.tasks.base import Problem

def student_topk_ids_BTK(model: torch.nn.Module, batch: SeqBatch, k: int) -> torch.Tensor:
    """The student's ``k`` most likely next-token ids at every completion column (eval mode,
    chunk by chunk from the hidden states: never ``[B, T, V]``)."""
    _, ids_BTK = frozen_student_stats(model, batch, topk=k)
    return ids_BTK.to(batch.input_ids_BL.device)


def with_student_topk(exp: Experience, env: RolloutEnv, k: int) -> Experience:
    exp.extra["student_topk_ids_BTK"] = student_topk_ids_BTK(env.student, exp.batch, k)
    return exp


def prune_signal(
    exp: Experience, scores, budget: LengthBudget, *, delta: float, eta: float, w_min: float,
    quantile: float, grow: float, gamma: float, kl_coef: float,
) -> Signal:
    """Reliability-weighted OPD advantages on the reliable prefix; updates ``budget``."""
    mask_BT = exp.batch.completion_mask_BT
    overlap_BT = per_position(full_teacher(scores), lambda t_CV, ids_CK: tied_topk_overlap_BT(ids_CK, t_CV),
                              exp.extra["student_topk_ids_BTK"])
    drift_BT, w_BT = drift_reliability_BT(overlap_BT, mask_BT, delta=delta, eta=eta)
    keep_BT = reliable_mask_BT(w_BT, mask_BT, w_min=w_min)
    log_ratio_BT = floored_log_ratio_BT(exp.sampler_logp_BT, scores.token_logp_BT, mask_BT)
    reward_BT = -kl_coef * log_ratio_BT * w_BT.to(log_ratio_BT.dtype)
    reliable_len_B, generated_len_B = keep_BT.sum(-1), mask_BT.sum(-1)
    used = int(exp.extra["budget_B"][0])
    budget.set_next(next_budget(used, reliable_len_B, generated_len_B, grow=grow, quantile=quantile))
    n_gen = mask_BT.sum().clamp(min=1)
    return {
        "mask_BT": keep_BT,
        "adv_BT": discounted_returns(reward_BT, keep_BT, gamma),
        "sampler_logp_BT": exp.sampler_logp_BT,
        "log_ratio_BT": log_ratio_BT,
        "signal/drift_rate": drift_BT.sum() / n_gen,
        "signal/overlap": (overlap_BT * mask_BT).sum() / n_gen,
        "signal/reliable_len": reliable_len_B.float(),
        "signal/reliability": w_BT.float(),
        **budget_metric(exp),
    }


def prune_degenerate(facts: RunFacts, *, k: int, delta: float, eta: float) -> Degenerate | None:
    """No drift event can happen (or none did in the first step): every token is supervised
    with reliability 1 and the budget stays at the cap, as ``opd``."""
    if eta == 1.0:
        return Degenerate("prune_eta", "opd", "prune_eta=1: a drift event never lowers the reliability")
    if delta == 0.0:
        return Degenerate("prune_delta", "opd", "prune_delta=0: an overlap is never below it, so nothing drifts")
    if facts.vocab_size is not None and k >= facts.vocab_size:
        return Degenerate("prune_k", "opd", f"prune_k={k} >= the vocabulary size {facts.vocab_size}: the top-k sets always agree")
    if facts.metric("signal/drift_rate") == 0.0:
        return Degenerate("prune_k", "opd", f"no drift event in the first step (top-{k} overlaps never fell below prune_delta={delta:g})")
    return None


@method_info(paper="Yang et al., 2605.07804", fixes="horizon decay", source="reconstruction", recipe={})
def build(
    prune_k: Annotated[int, knob("top-K size of the compatibility overlap (ties at the K-th count as a set)", ge=1)] = 1,
    prune_delta: Annotated[float, knob("overlap below this is a drift event", ge=0, le=1)] = 0.5,
    prune_eta: Annotated[float, knob("reliability decay per drift event", gt=0, le=1)] = 0.9,
    prune_w_min: Annotated[float, knob("stop supervising once reliability falls below this", ge=0, le=1)] = 0.3,
    prune_quantile: Annotated[float, knob("quantile of reliable lengths the budget shrinks toward", ge=0, le=1)] = 0.5,
    prune_grow: Annotated[float, knob("budget growth factor when rollouts stay reliable", ge=1)] = 1.25,
    max_new_tokens: int = 96,
    gamma: Gamma = 0.0,
    kl_coef: KlCoef = 1.0,
    opd_loss: OpdLoss = "is",
    clip_eps: ClipEps = 0.2,
) -> Method:
    budget = adaptive_budget(max_new_tokens)

    def rollout(env: RolloutEnv, problems: list[Problem], generator: torch.Generator) -> Experience:
        return with_student_topk(budget_rollout(env, problems, generator, budget), env, prune_k)

    def signal(exp: Experience, scores) -> Signal:
        return prune_signal(
            exp, scores, budget, delta=prune_delta, eta=prune_eta, w_min=prune_w_min,
            quantile=prune_quantile, grow=prune_grow, gamma=gamma, kl_coef=kl_coef,
        )

    return Method(
        "prune_opd",
        rollout,
        signal,
        lambda view, sig: opd_token_loss(view, sig, opd_loss=opd_loss, clip_eps=clip_eps),
        teacher_request=TeacherRequest(topk=prune_k, full=True),
        needs=("teacher", "full_teacher"),
        state=budget,
        degenerate=partial(prune_degenerate, k=prune_k, delta=prune_delta, eta=prune_eta),
    )
