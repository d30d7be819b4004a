"""SKD, speculative knowledge distillation (Xu et al., 2410.11325; METHODS §15).

Rollout (:mod:`opd.rollouts.speculative`): the student proposes blocks of
``skd_block`` (γ) tokens; the teacher keeps the longest prefix whose tokens are all in its
top-``skd_topk`` (K) and replaces the first rejected token by a sample from its own
next-token distribution (temperature ``skd_temperature``, top-p ``skd_top_p``); repeat
until EOS or ``max_new_tokens``. ``group_size`` such sequences per prompt.

Loss on every token of the resulting sequence y (student- and teacher-written), student
context x, teacher context x, full vocabulary, at ``loss_temperature`` τ:

    L = (1/N) Σ_{i,t} D(π_T(·|x, y_<t) ‖ π_θ(·|x, y_<t))
    D = FKL (``skd_loss="fkl"``, default) | RKL ("rkl") | JSD_β ("jsd", mixture weight ``beta``)

K small: the teacher writes most tokens (off-policy, close to supervised KD); K >= the
vocabulary: nothing is rejected and this is on-policy full-vocabulary KD on the student's
own samples (same random stream as plain sampling), i.e. ``gkd`` with ``lmbda=1``; the run
reports it (K >= V, or a first step in which the teacher wrote no token). The source's
K = 25 is meant for LLM vocabularies; the testbed's has 24 words, and its noise-free oracle
ties every word but the intended one, so with ties counted every K >= 2 accepts every live
word there. The default is K = 1 (accept the teacher's most likely token only, ties
included); set ``skd_topk=25`` for an LLM vocabulary.

``exp.on_policy`` is True only when the teacher wrote no token in the step (then every
token is the student's own sample); any teacher token makes the step off-policy, which
matters to nothing in this loss (no importance ratio) and is logged as
``rollout/on_policy``. Teacher-written tokens are flagged in
``exp.extra["teacher_written_BT"]`` and counted as ``exp.teacher_tokens`` (the vetting
passes are not counted). ``rollout/accept_rate`` = accepted / vetted student proposals
(a proposal after the first rejection in its block is not vetted).

Source: code (google-research ``speculative_kd``). Deviations: "top-K" includes ties at
the K-th log-prob (defined in :func:`opd.rollouts.speculative.in_teacher_topk`); the
prefix is re-encoded every round (no KV cache across rounds), which changes cost, not the
samples; the teacher re-scores the final sequences for the loss (one extra pass).
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from opd.methods.full_vocab import teacher_divergence_BT
from opd.methods.base import Experience, Method, Signal, StudentView, TeacherRequest, method_info
from opd.methods.degeneracy import Degenerate, RunFacts
from opd.methods.knobs import Beta, LossTemperature, knob
from opd.rollouts.speculative import speculative_sample
from opd.rollouts.student import group_rows, verify_rows, truncated_rows
from opd.signals.teacher_logp import full_teacher


def skd_rollout(env, problems, generator, *, block: int, topk: int, temperature: float, top_p: float) -> Experience:
    rows, group_B = group_rows(problems, env.group_size)
    was_training = env.student.training
    env.student.eval()
    out = speculative_sample(
        env.student, env.teacher, [env.encode_prompt(p) for p in rows],
        max_new_tokens=env.max_new_tokens, eos_id=env.eos_id, pad_id=env.pad_id, block=block, topk=topk,
        temperature=env.temperature, top_p=env.top_p, teacher_temperature=temperature, teacher_top_p=top_p,
        generator=generator,
    )
    env.student.train(was_training)
    completions = out.batch.completions()
    written_BT = out.teacher_written_BT
    return Experience(
        batch=out.batch, problems=rows, group_B=group_B, rewards_B=verify_rows(env, rows, completions),
        on_policy=not bool(written_BT.any()), teacher_tokens=int(written_BT.sum()),
        truncated_B=truncated_rows(completions, env.eos_id),
        extra={"teacher_written_BT": written_BT, "proposed_B": out.proposed_B, "accepted_B": out.accepted_B},
    )


def skd_signal(exp: Experience, scores) -> Signal:
    mask_BT = exp.batch.completion_mask_BT
    accepted, proposed = exp.extra["accepted_B"].sum(), exp.extra["proposed_B"].sum()
    return {
        "mask_BT": mask_BT,
        **full_teacher(scores),
        "rollout/accept_rate": accepted.float() / proposed.clamp(min=1).float(),
        "rollout/teacher_written": exp.extra["teacher_written_BT"].float(),
    }


def skd_divergence_loss(view: StudentView, signal: Signal, *, kind: str, beta: float, loss_temperature: float):
    d_BT = teacher_divergence_BT(view, signal, kind, beta=beta, temperature=loss_temperature)
    return d_BT, {f"loss/{kind}": d_BT}


def skd_degenerate(facts: RunFacts, *, topk: int) -> Degenerate | None:
    """Nothing rejected: on-policy full-vocabulary KD on the student's own samples."""
    becomes = "on-policy full-vocabulary KD on the student's samples (gkd with lmbda=1)"
    if facts.vocab_size is not None and topk >= facts.vocab_size:
        return Degenerate("skd_topk", becomes, f"skd_topk={topk} >= the vocabulary size {facts.vocab_size} accepts every proposal")
    if facts.metric("rollout/on_policy") == 1.0:
        return Degenerate("skd_topk", becomes, "the teacher rejected no proposal in the first step")
    return None


@method_info(paper="Xu et al., 2410.11325", fixes="myopic supervision (the teacher replaces rejected student tokens in the rollout)", source="code")
def build(
    skd_block: Annotated[int, knob("student tokens proposed per block (the paper's gamma)", ge=1)] = 5,
    skd_topk: Annotated[int, knob("a proposed token is accepted if in the teacher's top-K, ties included (the source's 25 is for LLM vocabularies)", ge=1)] = 1,
    skd_temperature: Annotated[float, knob("teacher sampling temperature of replacements", ge=0)] = 0.2,
    skd_top_p: Annotated[float, knob("teacher nucleus of replacements", gt=0, le=1)] = 0.5,
    skd_loss: Annotated[Literal["fkl", "rkl", "jsd"], knob("divergence on the resulting sequence (jsd uses beta)")] = "fkl",
    beta: Beta = 0.5,
    loss_temperature: LossTemperature = 1.0,
) -> Method:
    return Method(
        "skd",
        lambda env, problems, gen: skd_rollout(
            env, problems, gen, block=skd_block, topk=skd_topk, temperature=skd_temperature, top_p=skd_top_p
        ),
        skd_signal,
        lambda view, signal: skd_divergence_loss(view, signal, kind=skd_loss, beta=beta, loss_temperature=loss_temperature),
        teacher_request=TeacherRequest(topk=8, full=True),
        needs=("teacher", "full_teacher"),
        degenerate=partial(skd_degenerate, topk=skd_topk),
    )
