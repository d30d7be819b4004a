"""SFT: token cross-entropy on reference or teacher solutions (off-policy; METHODS §19).

    L = -(1/N) Σ_{i,t} log pi_theta(y*_{i,t} | x_i, y*_{i,<t})

``sft_source="dataset"`` trains on the problems' reference solutions; ``"teacher"`` on
one teacher sample per prompt (the teacher's tokens count as teacher tokens used).
Source: paper (the standard baseline).
"""

from __future__ import annotations

from typing import Annotated, Literal

from opd.methods.base import Experience, Method, Signal, StudentView, method_info
from opd.methods.knobs import knob
from opd.rollouts.student import solution_rollout, teacher_rollout


def sft_signal(exp: Experience, scores) -> Signal:
    return {"mask_BT": exp.batch.completion_mask_BT}


def sft_loss(view: StudentView, signal: Signal):
    nll_BT = -view.logp_BT
    return nll_BT, {"loss/nll": nll_BT}


@method_info(paper="standard baseline", fixes="baseline (off-policy, dense)", source="paper")
def build(sft_source: Annotated[Literal["dataset", "teacher"], knob("reference solutions or teacher samples")] = "dataset") -> Method:
    if sft_source == "teacher":
        return Method("sft", teacher_rollout, sft_signal, sft_loss, needs=("teacher", "teacher_generate"))
    return Method("sft", solution_rollout, sft_signal, sft_loss, needs=("solutions",))
