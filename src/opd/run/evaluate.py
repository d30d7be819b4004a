"""Held-out evaluation: greedy accuracy, sampled pass@k and mean completion length."""

from __future__ import annotations

import torch

from opd.methods.base import RolloutEnv
from opd.models.sampler import sample
from opd.tasks.base import Problem


def complete(env: RolloutEnv, problems, *, temperature: float, generator, chunk: int = 256):
    """The student's completion ids of each problem (``temperature=0``: greedy), ``chunk`` prompts a batch."""
    out = []
    for i in range(0, len(problems), chunk):
        part = problems[i : i + chunk]
        res = sample(
            env.student, [env.encode_prompt(p) for p in part], max_new_tokens=env.max_new_tokens,
            eos_id=env.eos_id, pad_id=env.pad_id, temperature=temperature, top_p=1.0, generator=generator,
        )
        out.extend(res.batch.completions())
    return out


def subset_accuracy(problems: list[Problem], correct: list[bool], subsets: dict | None) -> dict:
    """``eval/accuracy_NAME`` over the problems each predicate of ``subsets`` selects (none
    selected: not reported)."""
    out = {}
    for name, selects in (subsets or {}).items():
        picked = [c for p, c in zip(problems, correct) if selects(p)]
        if picked:
            out[f"eval/accuracy_{name}"] = sum(picked) / len(picked)
    return out


@torch.no_grad()
def evaluate(env: RolloutEnv, problems: list[Problem], *, k: int, temperature: float, seed: int, subsets: dict | None = None) -> dict:
    """``eval/accuracy`` (greedy), ``eval/pass@k`` and ``eval/length`` (sampled at ``temperature``);
    ``subsets`` (name -> predicate on a problem, e.g. a teacher's blind spot): the greedy
    accuracy on each as ``eval/accuracy_NAME``.

    Problems without an answer (a prompt-only distillation set) cannot be verified: then
    only ``eval/length`` is reported, never an accuracy of 0.
    """
    was_training = env.student.training
    env.student.eval()
    if not all(p.answer for p in problems):
        sampled = complete(env, problems, temperature=temperature, generator=torch.Generator().manual_seed(seed))
        env.student.train(was_training)
        return {"eval/length": sum(len(c) for c in sampled) / len(sampled)}
    greedy = complete(env, problems, temperature=0.0, generator=None)
    right = [env.verify(p, c) for p, c in zip(problems, greedy)]
    accuracy = sum(right) / len(problems)
    generator = torch.Generator().manual_seed(seed)
    rows = [p for p in problems for _ in range(k)]
    sampled = complete(env, rows, temperature=temperature, generator=generator)
    correct = torch.tensor([env.verify(p, c) for p, c in zip(rows, sampled)], device="cpu").view(len(problems), k)
    env.student.train(was_training)
    return {
        "eval/accuracy": accuracy,
        f"eval/pass@{k}": correct.any(1).float().mean().item(),
        "eval/sample_accuracy": correct.float().mean().item(),
        "eval/length": sum(len(c) for c in sampled) / len(sampled),
        **subset_accuracy(problems, right, subsets),
    }
