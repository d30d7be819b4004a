"""TRD's refined trajectory: the student drafts ``y_o``, the teacher rewrites it to ``y_r``.

Two ways for the teacher to refine (METHODS §16):

- ``"prompt"`` (official, louieworth/trd): the teacher generates ``y_r`` from the refine
  prompt ``env.encode_refine(x, y_o)``, which shows the problem and the draft and asks for
  a corrected rewrite (datasets: a text instruction; testbed: ``y_o-words x-words``, from
  which the oracle reads the problem off its last task keyword and writes its own
  solution: it does not read the draft).
- ``"prefix"`` (reconstruction, for teachers that cannot follow a refine instruction, e.g.
  the testbed's learned teacher): keep the longest prefix of ``y_o`` whose tokens are in
  the teacher's top-K (ties included, :func:`opd.rollouts.speculative.in_teacher_topk`),
  never the draft's final EOS (the teacher decides where ``y_r`` ends), and let the
  teacher continue from ``x + prefix``: ``y_r = prefix + continuation``, at most
  ``max_new_tokens`` tokens in all.

The teacher samples at ``temperature`` (0 = greedy) with no nucleus cut. Both teachers
take ``generate(prompts, max_new_tokens=, temperature=, top_p=, generator=,
prefix_ids_list=)``: the oracle walks the prefix, a model teacher reads ``x + prefix``
as its prompt; only the new tokens come back.
"""

from __future__ import annotations

import torch

from opd.batch import SeqBatch, make_batch
from opd.errors import UserError
from opd.rollouts.base import Experience, RolloutEnv
from opd.rollouts.speculative import accepted_prefix_len, in_teacher_topk
from opd.rollouts.student import verify_rows, truncated_rows, student_rollout
from opd.tasks.base import Problem

REFINE_MODES = ("prompt", "prefix")


def kept_prefix_len(teacher, drafts: SeqBatch, *, topk: int, eos_id: int) -> torch.Tensor:
    """long ``[B]``: leading draft tokens in the teacher's top-K, the draft's EOS excluded."""
    scores = teacher.score(drafts, topk=topk, full=False)
    accept_BT = in_teacher_topk(scores.token_logp_BT.cpu(), scores.topk_logp_BTK.cpu())
    valid_BT = drafts.completion_mask_BT & (drafts.completion_ids_BT != eos_id)
    return accepted_prefix_len(accept_BT, valid_BT)


def refine_by_prompt(env: RolloutEnv, rows: list[Problem], drafts: list[list[int]], *, temperature: float,
                     generator: torch.Generator) -> list[list[int]]:
    """The teacher's rewrite of each draft, generated behind the refine prompt."""
    prompts = refine_prompts(env, rows, drafts)
    return env.teacher.generate(prompts, max_new_tokens=env.max_new_tokens, temperature=temperature,
                                top_p=1.0, generator=generator)


def refine_by_prefix(env: RolloutEnv, drafts: SeqBatch, *, topk: int, temperature: float,
                     generator: torch.Generator) -> tuple[list[list[int]], list[list[int]]]:
    """(kept prefixes, the teacher's continuations) of each draft."""
    kept_B = kept_prefix_len(env.teacher, drafts, topk=topk, eos_id=env.eos_id).tolist()
    prefixes = [c[:k] for c, k in zip(drafts.completions(), kept_B)]
    budgets = [env.max_new_tokens - len(p) for p in prefixes]
    if max(budgets) <= 0:
        return prefixes, [[] for _ in prefixes]
    more = env.teacher.generate(drafts.prompts(), max_new_tokens=max(budgets), temperature=temperature,
                                top_p=1.0, generator=generator, prefix_ids_list=prefixes)
    return prefixes, [list(m[: max(b, 0)]) for m, b in zip(more, budgets)]


def refine_prompts(env: RolloutEnv, rows: list[Problem], drafts: list[list[int]]) -> list[list[int]]:
    if env.encode_refine is None:
        raise UserError("this method needs a refine prompt (env.encode_refine); build the env with opd.run.setup.")
    return [env.encode_refine(p, d) for p, d in zip(rows, drafts)]


def refine_rollout(env: RolloutEnv, problems: list[Problem], generator: torch.Generator, *, mode: str = "prompt",
                   topk: int = 5, temperature: float = 0.0) -> Experience:
    """``y_o`` from the student (``group_size`` per prompt), ``y_r`` from the teacher; the
    experience is ``(x, y_r)``. ``extra``: the drafts (``draft_ids_BT``, ``draft_mask_BT``),
    ``raw_reward_B`` (``y_o`` correct) and, in prefix mode, ``refine_kept_B`` (share of
    the draft's tokens before its EOS that were kept)."""
    if mode not in REFINE_MODES:
        raise ValueError(f"refine mode must be one of {REFINE_MODES}, got {mode!r}")
    if env.teacher is None or not hasattr(env.teacher, "generate"):
        raise UserError("trajectory refinement needs a teacher that can generate; set teacher=... in the config.")
    raw = student_rollout(env, problems, generator)
    drafts = raw.batch.completions()
    extra = {"raw_reward_B": raw.rewards_B}
    if mode == "prompt":
        refined = refine_by_prompt(env, raw.problems, drafts, temperature=temperature, generator=generator)
        teacher_tokens = sum(len(r) for r in refined)
    else:
        prefixes, more = refine_by_prefix(env, raw.batch, topk=topk, temperature=temperature, generator=generator)
        refined = [p + m for p, m in zip(prefixes, more)]
        teacher_tokens = sum(len(m) for m in more)
        n_body = torch.tensor([max(1, len(d) - int(bool(d) and d[-1] == env.eos_id)) for d in drafts], device="cpu")
        extra["refine_kept_B"] = torch.tensor([len(p) for p in prefixes], device="cpu") / n_body
    extra["draft_ids_BT"], extra["draft_mask_BT"] = raw.batch.completion_ids_BT, raw.batch.completion_mask_BT
    batch = make_batch(raw.batch.prompts(), refined, env.pad_id)
    return Experience(
        batch=batch, problems=raw.problems, group_B=raw.group_B, rewards_B=verify_rows(env, raw.problems, refined),
        on_policy=False, teacher_tokens=teacher_tokens, truncated_B=truncated_rows(refined, env.eos_id), extra=extra,
    )


def drafts_of(exp: Experience) -> list[list[int]]:
    """The student drafts ``y_o`` a refine rollout kept in ``exp.extra``."""
    ids_BT, mask_BT = exp.extra["draft_ids_BT"], exp.extra["draft_mask_BT"]
    return [row[m].tolist() for row, m in zip(ids_BT, mask_BT)]
