"""Entropy-aware OPD: add (or switch to) forward KL where the teacher is uncertain.

    u_t      = 1[H^T_t > τ_H]        (eopd_tau set)  |  1[H^T_t ≥ q_ρ(H^T)]  (default: a quantile)
    FKL^K_t  = Σ_{v∈S_t} π̂_T(v)(log π̂_T(v) − log π̂_θ(v)),  S_t = teacher top-K, both renormalized on S_t
    add    (code): L = (1/N) Σ_{i,t} [ OPD_t + λ·u_t·FKL^K_t ]  = L_RKL-OPD + λ·mean_t(u_t·FKL^K_t)
    switch (blog): L = (1/N) Σ_{i,t} [ (1 − u_t)·OPD_t + λ·u_t·FKL^K_t ]

Source: third-party audit of the official code (Jin et al., 2603.07079; METHODS §9); the
``switch`` reading is the blog's ("reverse KL where the teacher is confident, forward KL
where it is uncertain").

The OPD term is the per-token OPD policy-gradient surrogate of ``methods/opd.py``
(``OPD_t = −ρ_t·sg(A_t)``, ``A_t = −(log π_sampler(y_t) − log π_T(y_t))``, γ = 0, c = 1;
``opd_loss="ppo"`` clips ρ), not the exact full-vocabulary reverse KL. ``FKL^K``
renormalizes both sides on the teacher's top-K (the audit does not say), ties included
(every id at least as likely as the K-th, as in ``topk_lsm``), so the method asks for the
teacher's full logits (``needs`` "full_teacher"). ``H^T_t`` is the teacher's
full-vocabulary entropy as its ``Scores`` report it. In ``switch`` λ still scales the
forward-KL term.

The threshold. The code's ``τ_H = 0.8`` nats is a property of its teachers: the testbed's
oracle has entropy ~0.06 nats everywhere, so with 0.8 no token is ever uncertain and the
method is exactly ``opd``. By default (``eopd_tau`` unset) the threshold is the
``eopd_quantile`` (0.8) quantile of the step's own teacher entropies over its completion
tokens: the top 20% most uncertain tokens get the forward-KL term, ties at the threshold
included (:func:`opd.signals.eopd.routed_mask`). A teacher whose entropy is the same at
every token, such as the noise-free oracle, then makes every token uncertain: ``add`` is
OPD plus top-K forward KL everywhere (entropy-blind, but not ``opd``), and ``switch`` is
top-K forward KL alone, which the run reports as degenerate. ``eopd_tau=0.8`` reproduces
the code.

Knobs: ``eopd_k`` (K = 16, clamped to the vocabulary by the teacher), ``eopd_tau`` (unset;
nats), ``eopd_quantile`` (0.8), ``eopd_lambda`` (λ = 1.0), ``eopd_mode`` ("add"), and the
OPD term's ``opd_loss`` / ``clip_eps``. Logged: ``signal/uncertain_frac`` (share of
completion tokens with ``u_t = 1``), ``signal/tau`` (the threshold used, nats),
``signal/retained_mass`` ``Σ_{v∈S_t} π_T(v)``.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

import torch

from opd.methods.base import Experience, Method, Signal, StudentView, TeacherRequest, method_info
from opd.methods.degeneracy import Degenerate, RunFacts
from opd.methods.knobs import ClipEps, OpdLoss, knob
from opd.methods.opd import opd_signal, opd_token_loss
from opd.rollouts.student import student_rollout
from opd.signals.eopd import eopd_combine, routed_mask
from opd.methods.full_vocab import support_divergence_BTK, teacher_support_BTK
from opd.signals.teacher_logp import full_teacher
from opd.signals.topk_lsm import retained_mass


def eopd_signal(exp: Experience, scores, *, k: int, tau: float | None, quantile: float = 0.8) -> Signal:
    signal = opd_signal(exp, scores, gamma=0.0, kl_coef=1.0)
    uncertain_BT, threshold = routed_mask(scores.entropy_BT, signal["mask_BT"], tau=tau, quantile=quantile)
    ids_BTK, logp_BTK = teacher_support_BTK(full_teacher(scores), tuple(uncertain_BT.shape), k)
    signal.update({
        "uncertain_BT": uncertain_BT,
        "signal/tau": threshold.float(),
        "support_ids_BTK": ids_BTK,
        "support_logp_BTK": logp_BTK,
        "signal/uncertain_frac": uncertain_BT.float(),
        "signal/retained_mass": retained_mass(logp_BTK, logp_BTK > float("-inf")),
    })
    return signal


def eopd_loss(view: StudentView, signal: Signal, *, lam: float, mode: str, opd_loss: str, clip_eps: float):
    opd_BT, metrics = opd_token_loss(view, signal, opd_loss=opd_loss, clip_eps=clip_eps)
    fkl_BT = support_divergence_BTK(view, signal["support_ids_BTK"], signal["support_logp_BTK"], "fkl")
    loss_BT = eopd_combine(opd_BT, fkl_BT, signal["uncertain_BT"], lam=lam, mode=mode)
    return loss_BT, {**metrics, "loss/eopd": loss_BT, "loss/fkl_topk": fkl_BT}


def eopd_degenerate(facts: RunFacts, *, tau: float | None, quantile: float, lam: float, mode: str) -> Degenerate | None:
    """``opd`` when no token can be uncertain (λ = 0 in add mode, or a threshold above every
    teacher entropy of the first step); top-K forward KL alone when ``switch`` routes every
    token to it."""
    if lam == 0.0 and mode == "add":
        return Degenerate("eopd_lambda", "opd", "eopd_lambda=0 removes the forward-KL term")
    H_N = facts.teacher_entropy_N
    if H_N is None or H_N.numel() == 0:
        return None
    u_N, threshold = routed_mask(H_N, torch.ones_like(H_N, dtype=torch.bool), tau=tau, quantile=quantile)
    knob_name = "eopd_tau" if tau is not None else "eopd_quantile"
    if not bool(u_N.any()):
        why = f"the first step's teacher entropy never exceeds the threshold {float(threshold):.3g} nats (max {float(H_N.max()):.3g})"
        return Degenerate(knob_name, "opd", why)
    if bool(u_N.all()) and mode == "switch":
        why = f"every token of the first step is at or above the threshold {float(threshold):.3g} nats, so no token keeps the OPD term"
        constant = float(H_N.max() - H_N.min()) <= 1e-6  # no threshold splits a constant entropy: add the FKL term instead
        return Degenerate("eopd_mode" if constant else knob_name, "top-K forward KL alone (no OPD term)", why)
    return None


@method_info(paper="Jin et al., 2603.07079", fixes="local noise", source="third-party")
def build(
    eopd_k: Annotated[int, knob("teacher top-K of the forward-KL term", ge=1)] = 16,
    eopd_tau: Annotated[float | None, knob("teacher entropy threshold in nats (the code's 0.8); unset: eopd_quantile")] = None,
    eopd_quantile: Annotated[float, knob("with eopd_tau unset: tokens at or above this quantile of the step's teacher entropies are uncertain", ge=0, le=1)] = 0.8,
    eopd_lambda: Annotated[float, knob("weight of the forward-KL term", ge=0)] = 1.0,
    eopd_mode: Annotated[Literal["add", "switch"], knob("add forward KL where uncertain (code) or switch to it (blog)")] = "add",
    opd_loss: OpdLoss = "is",
    clip_eps: ClipEps = 0.2,
) -> Method:
    return Method(
        "eopd",
        student_rollout,
        partial(eopd_signal, k=eopd_k, tau=eopd_tau, quantile=eopd_quantile),
        partial(eopd_loss, lam=eopd_lambda, mode=eopd_mode, opd_loss=opd_loss, clip_eps=clip_eps),
        teacher_request=TeacherRequest(topk=eopd_k, full=True),
        needs=("teacher", "full_teacher"),
        degenerate=partial(eopd_degenerate, tau=eopd_tau, quantile=eopd_quantile, lam=eopd_lambda, mode=eopd_mode),
    )
