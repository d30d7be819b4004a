"""TRD, trajectory-refined distillation (Jiang et al., 2606.08432; METHODS §16).

Rollout (:mod:`opd.rollouts.refine`): the student samples a raw rollout ``y_o ~ π_θ(·|x)``
(``group_size`` per prompt); the teacher rewrites it into ``y_r``:

- ``trd_refine="prompt"`` (official): ``y_r ~ π_T(·| r(x, y_o))`` with ``r`` the refine
  prompt (``env.encode_refine``: show x and y_o, keep the structure and correct steps,
  fix the errors, output only the rewrite).
- ``trd_refine="prefix"`` (reconstruction, for teachers that cannot follow the
  instruction): ``y_r = y_o[:k] + continuation ~ π_T(·| x, y_o[:k])`` with ``k`` the
  longest prefix of ``y_o`` (its EOS excluded) whose tokens are in the teacher's
  top-``trd_topk`` (ties included).

The teacher samples at ``refine_temperature`` (0 = greedy). Distillation along ``y_r``,
student context x, full vocabulary, at ``loss_temperature`` τ:

    L = (1/N) Σ_{i,t} D(π_T(·| c_T, y_r,<t) ‖ π_θ(·| x, y_r,<t)),  D = FKL (default) | RKL
    c_T = r(x, y_o)  (``trd_context="refine"``, official)  |  x  (``"plain"``, online port)

Logged: ``rollout/raw_reward`` (y_o correct), ``rollout/reward`` (y_r correct) and, in
prefix mode, ``rollout/refine_kept`` (share of y_o's tokens before EOS kept).
``exp.teacher_tokens`` counts the tokens the teacher wrote into ``y_r`` (prefix mode: the
continuation only; the vetting pass is not counted). The experience is off-policy
(``on_policy=False``): the loss runs along the teacher's rewrite.

Source: code (louieworth/trd; louieworth/opd-baselines for the online port, whose top-64
reverse KL with PPO is not reproduced here: ``trd_context="plain"`` with
``trd_loss="rkl"`` is its full-vocabulary counterpart). Fails when the recovery exceeds
the teacher's own ability. On the testbed, the oracle does not read the draft in prompt
mode (it writes its own solution, and scores behind the refine prompt exactly as behind
x); prefix mode keeps the draft's agreeing prefix. The learned testbed teacher was trained
on ``x`` alone: use it with ``trd_refine="prefix"`` and ``trd_context="plain"``.
``trd_topk`` (prefix mode only) has no source value; with the noise-free oracle (all
non-intended words tied) any K >= 2 keeps every live word of the draft.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from opd.methods.full_vocab import teacher_divergence_BT
from opd.methods.base import Experience, Method, Signal, StudentView, TeacherRequest, method_info, plain_context
from opd.methods.degeneracy import Degenerate, RunFacts
from opd.methods.knobs import LossTemperature, knob
from opd.methods.contexts import with_prompts
from opd.rollouts.refine import drafts_of, refine_prompts, refine_rollout
from opd.signals.teacher_logp import full_teacher


def refine_context(env, exp: Experience):
    """Official scoring context: ``y_r`` behind the refine prompt built from ``y_o``
    (completion columns equal the rollout's)."""
    return env.teacher, with_prompts(exp, refine_prompts(env, exp.problems, drafts_of(exp)), env.pad_id)


def trd_signal(exp: Experience, scores) -> Signal:
    signal = {
        "mask_BT": exp.batch.completion_mask_BT,
        **full_teacher(scores),
        "rollout/raw_reward": exp.extra["raw_reward_B"],
    }
    if "refine_kept_B" in exp.extra:
        signal["rollout/refine_kept"] = exp.extra["refine_kept_B"]
    return signal


def trd_divergence_loss(view: StudentView, signal: Signal, *, kind: str, loss_temperature: float):
    d_BT = teacher_divergence_BT(view, signal, kind, temperature=loss_temperature)
    return d_BT, {f"loss/{kind}": d_BT}


def trd_degenerate(facts: RunFacts, *, refine: str, topk: int) -> Degenerate | None:
    """Prefix mode keeping every draft token: distillation along the student's own rollout."""
    if refine != "prefix":
        return None
    becomes = "full-vocabulary KD along the student's own rollouts (gkd with lmbda=1)"
    if facts.vocab_size is not None and topk >= facts.vocab_size:
        return Degenerate("trd_topk", becomes, f"trd_topk={topk} >= the vocabulary size {facts.vocab_size} keeps every draft token")
    if facts.metric("rollout/refine_kept") == 1.0:
        return Degenerate("trd_topk", becomes, "the teacher kept every draft token in the first step")
    return None


@method_info(paper="Jiang et al., 2606.08432", fixes="myopic supervision (the teacher rewrites the whole rollout)", source="code")
def build(
    trd_refine: Annotated[Literal["prompt", "prefix"], knob("teacher refines from the refine prompt, or continues the draft's teacher-accepted prefix")] = "prompt",
    trd_context: Annotated[Literal["refine", "plain"], knob("teacher scores y_r behind the refine prompt (official) or plain x")] = "refine",
    trd_loss: Annotated[Literal["fkl", "rkl"], knob("divergence along the refined rollout")] = "fkl",
    refine_temperature: Annotated[float, knob("teacher sampling temperature when refining (0 = greedy)", ge=0)] = 0.0,
    trd_topk: Annotated[int, knob("(prefix mode) draft tokens are kept while in the teacher's top-K (ties included)", ge=1)] = 5,
    loss_temperature: LossTemperature = 1.0,
) -> Method:
    return Method(
        "trd",
        lambda env, problems, gen: refine_rollout(
            env, problems, gen, mode=trd_refine, topk=trd_topk, temperature=refine_temperature
        ),
        trd_signal,
        lambda view, signal: trd_divergence_loss(view, signal, kind=trd_loss, loss_temperature=loss_temperature),
        teacher_request=TeacherRequest(topk=8, full=True),
        needs=("teacher", "full_teacher", "teacher_generate"),
        context=refine_context if trd_context == "refine" else plain_context,
        degenerate=partial(trd_degenerate, refine=trd_refine, topk=trd_topk),
    )
