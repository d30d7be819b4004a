"""Rollouts: the student's own samples, dataset solutions, or the teacher's samples."""

from __future__ import annotations

import torch

from opd.errors import UserError

from opd.batch import make_batch
from opd.rollouts.base import Experience, RolloutEnv
from opd.models.sampler import sample
from opd.tasks.base import Problem


def group_rows(problems: list[Problem], group_size: int) -> tuple[list[Problem], torch.Tensor]:
    rows = [p for p in problems for _ in range(group_size)]
    group_B = torch.arange(len(problems), device="cpu").repeat_interleave(group_size)
    return rows, group_B


def verify_rows(env: RolloutEnv, rows: list[Problem], completions: list[list[int]]) -> torch.Tensor:
    return torch.tensor([float(env.verify(p, c)) for p, c in zip(rows, completions)], device="cpu")


def truncated_rows(completions: list[list[int]], eos_id: int) -> torch.Tensor:
    return torch.tensor([not c or c[-1] != eos_id for c in completions], device="cpu")


def student_rollout(
    env: RolloutEnv, problems: list[Problem], generator: torch.Generator, *, max_new_tokens: int | None = None
) -> Experience:
    """``group_size`` samples per prompt from the current student (on-policy)."""
    rows, group_B = group_rows(problems, env.group_size)
    was_training = env.student.training
    env.student.eval()
    out = sample(
        env.student,
        [env.encode_prompt(p) for p in rows],
        max_new_tokens=max_new_tokens or env.max_new_tokens,
        eos_id=env.eos_id,
        pad_id=env.pad_id,
        temperature=env.temperature,
        top_p=env.top_p,
        generator=generator,
    )
    env.student.train(was_training)
    completions = out.batch.completions()
    return Experience(
        batch=out.batch,
        problems=rows,
        group_B=group_B,
        sampler_logp_BT=out.sampler_logp_BT,
        rewards_B=verify_rows(env, rows, completions),
        truncated_B=truncated_rows(completions, env.eos_id),
    )


def solution_rollout(env: RolloutEnv, problems: list[Problem], generator: torch.Generator) -> Experience:
    """The problems' reference solutions (off-policy, one per prompt)."""
    missing = [p.prompt for p in problems if not p.solution]
    if missing:
        raise UserError(
            f"{len(missing)} problem(s) have no reference solution (first prompt: {missing[0]!r}); "
            "add a 'solution' field to the dataset or use sft_source=teacher."
        )
    prompts = [env.encode_prompt(p) for p in problems]
    completions = [env.encode_solution(p) for p in problems]
    batch = make_batch(prompts, completions, env.pad_id)
    return Experience(batch, list(problems), torch.arange(len(problems), device="cpu"), on_policy=False)


def teacher_rollout(env: RolloutEnv, problems: list[Problem], generator: torch.Generator) -> Experience:
    """One sample per prompt from the teacher (sequence-level KD data, ``seq_kd``)."""
    if env.teacher is None or not hasattr(env.teacher, "generate"):
        raise UserError("this rollout needs a teacher that can generate; set teacher=... in the config.")
    prompts = [env.encode_prompt(p) for p in problems]
    completions = env.teacher.generate(
        prompts,
        max_new_tokens=env.max_new_tokens,
        temperature=env.temperature,
        top_p=env.top_p,
        generator=generator,
    )
    batch = make_batch(prompts, completions, env.pad_id)
    tokens = sum(len(c) for c in completions)
    return Experience(
        batch, list(problems), torch.arange(len(problems), device="cpu"), on_policy=False, teacher_tokens=tokens,
        rewards_B=verify_rows(env, list(problems), completions),
    )
