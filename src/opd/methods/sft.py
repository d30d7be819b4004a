"""SFT: token cross-entropy on reference or teacher solutions (off-policy; METHODS §19).

    L = -(1/N) Σ_{i,t} k_i log pi_theta(y*_{i,t} | x_i, y*_{i,<t}),   N = Σ_{i,t} k_i m_{i,t}

``sft_source="dataset"`` trains on the problems' reference solutions; ``"teacher"`` on
one teacher sample per prompt (the teacher's tokens count as teacher tokens used); both keep
every row (k_i = 1). ``"teacher_correct"`` is rejection sampling (rejection-sampling
fine-tuning): one teacher sample per prompt, kept only when the verifier accepts its answer,
k_i = 1[r_i = 1]; a rejected sample's tokens still count as teacher tokens and its sequence
counts in the budget (the teacher generated it); ``signal/accepted_frac`` logs the share of
samples kept (``signal/kept_frac``, as for every method, the share of tokens).
Source: paper (the standard baseline).
"""

from __future__ import annotations

from typing import Annotated, Literal

from opd.methods.base import Experience, Method, Signal, StudentView, method_info
from opd.methods.knobs import knob
from opd.rollouts.student import solution_rollout, teacher_rollout


def sft_signal(exp: Experience, scores) -> Signal:
    return {"mask_BT": exp.batch.completion_mask_BT}


def accepted_signal(exp: Experience, scores) -> Signal:
    """mask_{i,t} = m_{i,t} · 1[r_i = 1]: only the samples the verifier accepts are imitated."""
    keep_B = exp.rewards_B >= 1.0
    return {"mask_BT": exp.batch.completion_mask_BT & keep_B[:, None], "signal/accepted_frac": keep_B.float().mean()}


def sft_loss(view: StudentView, signal: Signal):
    nll_BT = -view.logp_BT
    return nll_BT, {"loss/nll": nll_BT}


SOURCES = "reference solutions, teacher samples, or the teacher samples the verifier accepts"


@method_info(paper="standard baseline", fixes="baseline (off-policy, dense)", source="paper")
def build(sft_source: Annotated[Literal["dataset", "teacher", "teacher_correct"], knob(SOURCES)] = "dataset") -> Method:
    if sft_source == "teacher":
        return Method("sft", teacher_rollout, sft_signal, sft_loss, needs=("teacher", "teacher_generate"))
    if sft_source == "teacher_correct":
        return Method("sft", teacher_rollout, accepted_signal, sft_loss, needs=("teacher", "teacher_generate", "verifier"))
    return Method("sft", solution_rollout, sft_signal, sft_loss, needs=("solutions",))
