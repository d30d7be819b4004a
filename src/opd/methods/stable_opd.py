"""StableOPD: OPD anchored by SFT on golden solutions and a KL to the initial student (METHODS §11).

    L = L_OPD + λ_gold · L_SFT(y*) + β_KL · KL(π_θ ‖ π_ref)

    L_OPD  = (1/N_roll) Σ_{rollout tokens} −ρ_t · sg(A_t)      (OPD, §1–2; ρ_t the IS ratio,
             A_t = Σ_{t'≥t} γ^{t'−t} r_{t'},  r_t = −c·(log π_sampler(y_t) − log π_T(y_t)))
    L_SFT  = (1/N_gold) Σ_{golden tokens} −log π_θ(y*_t | x, y*_<t)
    KL     = (1/N_roll) Σ_{rollout tokens} Σ_v π_θ(v|c_t) (log π_θ(v|c_t) − log π_ref(v|c_t))

π_ref is the frozen initial student; λ_gold = ``gold_coef`` (0.1), β_KL = ``ref_kl_coef``
(0.01), the third-party adaptation's coefficients. Source: third-party (a transcription
of Luo et al. 2604.08527; coefficients from a third-party adaptation).

One batch, the loop algorithm-blind: the rollout returns the ``group_size`` student
rollouts per prompt followed by one golden-solution row per prompt (``exp.extra["gold_B"]``
marks them) and the reference's full distribution on the rollout rows (its completion
hidden states ``ref_hidden_BTH`` and head ``ref_head``, zero on golden rows; the loss makes
the logits chunk by chunk). Each term is a mean over its own tokens: the signal gives rollout tokens
the weight ``N/N_roll`` and golden tokens ``N/N_gold`` (``N`` the step's kept tokens, the
loop's normalizer), so the loop's token mean of ``loss_BT`` is exactly ``L``
(:mod:`opd.signals.stable_opd`). The OPD terms are zero on golden rows, the SFT term zero
on rollout rows.

Knobs: ``gold_coef``, ``ref_kl_coef``, ``rep_threshold`` (the repetition monitor's
compression ratio), and the shared OPD knobs ``gamma``, ``kl_coef``, ``opd_loss``,
``clip_eps`` (as in :mod:`opd.methods.opd`).

Monitors (:mod:`opd.signals.monitors`, over the rollout rows only): ``monitor/truncation``
(no EOS before the cap), ``monitor/repetition`` (tail compression ratio above
``rep_threshold``; tail = the last 256 tokens), ``monitor/compression``, ``monitor/length``,
``monitor/reward``. Note: the loop's own ``rollout/length``, ``rollout/reward`` and
``rollout/truncated`` average over every row of the batch, golden rows included (one in
``group_size + 1``); read ``monitor/*`` for the student's rollouts alone.

Deviations / choices: the teacher also scores the golden rows (its scores there are
unused; they count as teacher tokens); the reference's hidden states are kept for the
step (``R·T·H`` floats).
"""

from __future__ import annotations

from typing import Annotated

import torch

from opd.batch import make_batch
from opd.losses import discounted_returns
from opd.methods.full_vocab import teacher_divergence_BT
from opd.signals.teacher_logp import full_teacher
from opd.methods.base import Experience, Method, RolloutEnv, Signal, StudentView, TeacherRequest, method_info
from opd.methods.degeneracy import Degenerate
from opd.methods.knobs import ClipEps, Gamma, KlCoef, OpdLoss, knob
from opd.methods.contexts import reference_scores
from opd.methods.opd import opd_token_loss
from opd.rollouts.student import solution_rollout, student_rollout
from opd.signals.monitors import rollout_monitors
from opd.signals.opd import floored_log_ratio_BT
from opd.signals.stable_opd import combined_loss_BT, term_weights_BT


def _pad_cols(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``x [R, T, ...]`` zero-padded to ``[rows, cols, ...]``."""
    out = x.new_zeros((rows, cols, *x.shape[2:]))
    out[: x.shape[0], : x.shape[1]] = x
    return out


def reference_entries(ref, rows: int, cols: int) -> dict:
    """The reference's full distribution on the rollout rows, padded to the batch with zero
    hidden states (a uniform distribution on golden rows, never read): its hidden states and
    head (a model: never ``[B, T, V]``), or its logits."""
    full = full_teacher(ref)
    if "teacher_hidden_BTH" in full:
        return {"ref_hidden_BTH": _pad_cols(full["teacher_hidden_BTH"], rows, cols), "ref_head": full["teacher_head"]}
    return {"ref_logits_BTV": _pad_cols(full["teacher_logits_BTV"].float(), rows, cols)}


def with_golden_rows(env: RolloutEnv, exp: Experience, gold: Experience) -> Experience:
    """The rollout's rows, then the golden rows, in one batch (columns stay aligned)."""
    R, T0 = exp.batch.completion_mask_BT.shape
    prompts = exp.batch.prompts() + gold.batch.prompts()
    batch = make_batch(prompts, exp.batch.completions() + gold.batch.completions(), env.pad_id, width=T0)
    B, T = batch.completion_mask_BT.shape
    ref = reference_scores(env, batch.select(torch.arange(R, device="cpu")), topk=1, full=True)
    gold_rewards = torch.tensor([float(env.verify(p, c)) for p, c in zip(gold.problems, gold.batch.completions())], device="cpu")
    return Experience(
        batch=batch,
        problems=exp.problems + gold.problems,
        group_B=torch.cat([exp.group_B, gold.group_B]),
        sampler_logp_BT=_pad_cols(exp.sampler_logp_BT, B, T),
        rewards_B=torch.cat([exp.rewards_B, gold_rewards]),
        truncated_B=torch.cat([exp.truncated_B, torch.zeros(B - R, dtype=torch.bool, device="cpu")]),
        sampled_B=torch.arange(B, device="cpu") < R,
        extra={"gold_B": torch.arange(B, device="cpu") >= R, **reference_entries(ref, B, T)},
    )


def stable_rollout(env: RolloutEnv, problems: list, generator: torch.Generator) -> Experience:
    exp = student_rollout(env, problems, generator)
    return with_golden_rows(env, exp, solution_rollout(env, problems, generator))


def stable_signal(exp: Experience, scores, *, gamma: float, kl_coef: float, rep_threshold: float) -> Signal:
    mask_BT = exp.batch.completion_mask_BT
    gold_B = exp.extra["gold_B"]
    roll_w_BT, gold_w_BT = term_weights_BT(mask_BT, gold_B)
    roll_BT = roll_w_BT > 0
    log_ratio_BT = floored_log_ratio_BT(exp.sampler_logp_BT, scores.token_logp_BT, roll_BT)
    adv_BT = discounted_returns(-kl_coef * log_ratio_BT, roll_BT, gamma)
    roll_rows = torch.nonzero(~gold_B).squeeze(-1)
    monitors = rollout_monitors(
        exp.batch.select(roll_rows).completions(), exp.truncated_B[roll_rows], rep_threshold=rep_threshold
    )
    return {
        "mask_BT": mask_BT,
        "adv_BT": adv_BT,
        "sampler_logp_BT": exp.sampler_logp_BT,
        "log_ratio_BT": log_ratio_BT,
        "roll_w_BT": roll_w_BT,
        "gold_w_BT": gold_w_BT,
        **{k: v for k, v in exp.extra.items() if k.startswith("ref_")},
        "monitor/reward": exp.rewards_B[roll_rows].float().mean(),
        **monitors,
    }


def stable_loss(view: StudentView, signal: Signal, *, opd_loss: str, clip_eps: float, gold_coef: float, ref_kl_coef: float):
    pg_BT, pg_metrics = opd_token_loss(view, signal, opd_loss=opd_loss, clip_eps=clip_eps)
    kl_BT = teacher_divergence_BT(view, signal, "rkl", prefix="ref", floor=None)
    nll_BT = -view.logp_BT
    roll_w, gold_w = signal["roll_w_BT"], signal["gold_w_BT"]
    loss_BT = combined_loss_BT(pg_BT, kl_BT, nll_BT, roll_w, gold_w, gold_coef=gold_coef, ref_kl_coef=ref_kl_coef)
    # metrics weighted so that the loop's token mean over all kept tokens is each term's own mean
    metrics = {k: torch.where(roll_w > 0, v.detach() * roll_w, 0.0) for k, v in pg_metrics.items()}
    metrics["loss/ref_kl"] = torch.where(roll_w > 0, kl_BT.detach() * roll_w, 0.0)
    metrics["loss/sft"] = torch.where(gold_w > 0, nll_BT.detach() * gold_w, 0.0)
    metrics["loss/total"] = loss_BT.detach()
    return loss_BT, metrics


@method_info(
    paper="Luo et al., 2604.08527",
    fixes="horizon decay (length inflation, repetition)",
    source="third-party",
)
def build(
    gold_coef: Annotated[float, knob("weight of SFT on golden solutions", ge=0)] = 0.1,
    ref_kl_coef: Annotated[float, knob("weight of KL to the initial student", ge=0)] = 0.01,
    rep_threshold: Annotated[float, knob("compression ratio above which a tail counts as repetitive", gt=0)] = 3.0,
    gamma: Gamma = 0.0,
    kl_coef: KlCoef = 1.0,
    opd_loss: OpdLoss = "is",
    clip_eps: ClipEps = 0.2,
) -> Method:
    return Method(
        "stable_opd",
        stable_rollout,
        lambda exp, scores: stable_signal(exp, scores, gamma=gamma, kl_coef=kl_coef, rep_threshold=rep_threshold),
        lambda view, signal: stable_loss(
            view, signal, opd_loss=opd_loss, clip_eps=clip_eps, gold_coef=gold_coef, ref_kl_coef=ref_kl_coef
        ),
        teacher_request=TeacherRequest(topk=8, full=False),
        needs=("teacher", "reference", "solutions"),
        degenerate=lambda facts: (
            Degenerate("gold_coef", "opd", "gold_coef=0 and ref_kl_coef=0 leave only the OPD term")
            if gold_coef == 0.0 and ref_kl_coef == 0.0 else None
        ),
    )
