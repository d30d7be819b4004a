"""Teacher contexts a method can choose (``Method.context``) and the frozen reference.

Each context returns ``(teacher, batch)``: the batch holds the rollout's own completion
tokens behind another prompt, so the teacher's scores stay column-aligned with the
rollout (completion column ``t`` is the same token in both batches).
"""

from __future__ import annotations

from opd.batch import SeqBatch, make_batch
from opd.errors import UserError
from opd.methods.base import Experience, RolloutEnv
from opd.models.base import Scores, Teacher
from opd.models.hf import HFTeacher


def reference_teacher(env: RolloutEnv) -> Teacher:
    """The frozen initial student as a scorer (OPSD's self-teacher, G-OPD's pi_ref)."""
    if env.reference is None:
        raise UserError("this method needs the frozen initial student; add 'reference' to its needs.")
    return HFTeacher(env.reference, eos_id=env.eos_id, pad_id=env.pad_id)


def with_prompts(exp: Experience, prompts: list[list[int]], pad_id: int) -> SeqBatch:
    """The rollout's completions behind new prompts (one per row)."""
    width = exp.batch.completion_mask_BT.shape[1]
    return make_batch(prompts, exp.batch.completions(), pad_id, width=width)


def privileged_context(env: RolloutEnv, exp: Experience) -> tuple[Teacher, SeqBatch]:
    """OPSD/DASD: the frozen initial student, with the reference solution in its context."""
    prompts = [env.encode_privileged(p) for p in exp.problems]
    return reference_teacher(env), with_prompts(exp, prompts, env.pad_id)


def reference_scores(env: RolloutEnv, batch: SeqBatch, *, topk: int = 8, full: bool = False) -> Scores:
    """Scores of ``batch`` under the frozen initial student, plain context."""
    return reference_teacher(env).score(batch, topk=topk, full=full, temperature=1.0)
