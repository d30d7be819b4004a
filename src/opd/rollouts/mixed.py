"""Teacher-mixed sampling (MiniLLM, Gu et al. 2306.08543; METHODS §4).

Each next token is drawn from the mixture of the teacher and the student::

    p̃(·|c_t) = α·π_T(·|c_t) + (1−α)·π_θ(·|c_t),        α = mix_alpha (0.2 in MiniLLM)

and the sampler records, per token and at temperature 1 (the learner's scoring
temperature, METHODS rule 3, as :mod:`opd.models.sampler` does):

- ``mix_logp_BT``     = log p̃(y_t|c_t)
- ``student_logp_BT`` = log π_θ(y_t|c_t)

so that the per-token importance weight of MiniLLM, ``w_t = π_θ(y_t)/p̃(y_t) =
exp(student_logp − mix_logp)``, can be formed. The mixture is computed in the log domain,
``log p̃ = logaddexp(log α + log π_T, log(1−α) + log π_θ)``; ``α = 0`` is plain student
sampling (the teacher is not queried), ``α = 1`` pure teacher sampling.

Sampling temperature ``τ`` and nucleus ``top_p``: the token is drawn from the mixture of the
*tempered* distributions ``α·softmax(z_T/τ) + (1−α)·softmax(z_θ/τ)``, cut to its top-p
nucleus; ``τ = 0`` is greedy on the untempered mixture. The recorded log-probs are always
the untempered ones above. Source: paper; code (microsoft/LMOps ``minillm``, which mixes
the two next-token distributions inside generation).

Cost (deliberate, for the testbed): a teacher only answers ``score(batch, full=True)``, so
at step ``t`` it rescores the prompt and the whole prefix to get one next-token
distribution: O(T²) teacher work per sequence. The student decodes with a KV cache. An HF
teacher could keep its own KV cache later and make the teacher side O(T) too. The
``teacher_queries`` count is one per sampled token of a live row (what a cached teacher
would pay), not the recomputed prefix length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opd.batch import SeqBatch, make_batch
from opd.rollouts.base import Experience, RolloutEnv
from opd.models.sampler import Decoder, assemble, pick_tokens
from opd.rollouts.student import group_rows, verify_rows, truncated_rows
from opd.tasks.base import Problem


@dataclass
class MixedSampled:
    batch: SeqBatch
    student_logp_BT: torch.Tensor  # log pi_theta(y_t | c_t), temperature 1, 0 on padding
    mix_logp_BT: torch.Tensor  # log p~(y_t | c_t), temperature 1, 0 on padding
    teacher_queries: int  # next-token distributions asked of the teacher


def mix_logp(teacher_logp: torch.Tensor, student_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """``log(α·exp(t) + (1−α)·exp(s))`` elementwise, in the log domain (any shape).

    ``α = 0`` returns ``s`` and ``α = 1`` returns ``t`` exactly (the other side is not read,
    so it may hold anything there).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return student_logp
    if alpha == 1.0:
        return teacher_logp
    return torch.logaddexp(teacher_logp + math.log(alpha), student_logp + math.log1p(-alpha))


def teacher_next_logp(teacher, prompts: list[list[int]], prefixes: list[list[int]], pad_id: int) -> torch.Tensor:
    """``log π_T(·| x_b, prefix_b)`` at temperature 1 -> ``[A, V]`` (float32).

    Every prefix has the same length ``t`` (rows decode in lockstep); the teacher scores
    ``prompt | prefix`` with one empty completion column ``t`` whose logits are the answer.
    """
    t = len(prefixes[0])
    batch = make_batch(prompts, prefixes, pad_id, width=t + 1)
    scores = teacher.score(batch, topk=1, full=True, temperature=1.0)
    if scores.hidden_BTH is None:
        return torch.log_softmax(scores.logits_BTV[:, t].float(), dim=-1)
    return torch.log_softmax(torch.nn.functional.linear(scores.hidden_BTH[:, t], *scores.head).float(), dim=-1)


def _pick(mix_BV, teacher_BV, student_BV, alpha, temperature, top_p, generator):
    """One token per row from the (tempered) mixture; greedy on the mixture at τ = 0."""
    if temperature == 0:
        return mix_BV.argmax(-1)
    if temperature != 1.0:
        mix_BV = mix_logp(
            torch.log_softmax(teacher_BV / temperature, -1), torch.log_softmax(student_BV / temperature, -1), alpha
        )
    return pick_tokens(mix_BV, 1.0, top_p, generator)


def _cut(values_BT: torch.Tensor, batch: SeqBatch) -> torch.Tensor:
    """Align step-major values to the batch's completion columns, 0 on padding."""
    mask_BT = batch.completion_mask_BT
    out_BT = torch.zeros(mask_BT.shape, device=mask_BT.device)
    width = min(mask_BT.shape[1], values_BT.shape[1])
    out_BT[:, :width] = values_BT[:, :width].float().to(out_BT.device)
    return out_BT.masked_fill(~mask_BT, 0.0)


@torch.no_grad()
def mixed_sample(
    student,
    teacher,
    prompts: list[list[int]],
    *,
    alpha: float,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> MixedSampled:
    """Sample one completion per prompt from ``p̃ = α·π_T + (1−α)·π_θ`` (module doc)."""
    dec = Decoder(student, prompts, pad_id)
    B = len(prompts)
    prefixes: list[list[int]] = [[] for _ in range(B)]
    tokens, s_logps, m_logps, queries = [], [], [], 0
    done_B = torch.zeros(B, dtype=torch.bool, device=dec.logits_BV.device)
    for _ in range(max_new_tokens):
        student_BV = torch.log_softmax(dec.logits_BV, -1)
        teacher_BV = student_BV.clone()  # finished rows: never read
        if alpha > 0:
            live = (~done_B).nonzero().squeeze(-1).tolist()
            live_t = teacher_next_logp(teacher, [prompts[b] for b in live], [prefixes[b] for b in live], pad_id)
            teacher_BV[live] = live_t.to(teacher_BV.device)
            queries += len(live)
        mix_BV = mix_logp(teacher_BV, student_BV, alpha)
        tok_B = _pick(mix_BV, teacher_BV, student_BV, alpha, temperature, top_p, generator).masked_fill(done_B, pad_id)
        tokens.append(tok_B)
        s_logps.append(student_BV.gather(-1, tok_B[:, None]).squeeze(-1).masked_fill(done_B, 0.0))
        m_logps.append(mix_BV.gather(-1, tok_B[:, None]).squeeze(-1).masked_fill(done_B, 0.0))
        for b in (~done_B).nonzero().squeeze(-1).tolist():
            prefixes[b].append(int(tok_B[b]))
        live_B = ~done_B
        done_B = done_B | (tok_B == eos_id)
        if bool(done_B.all()):
            break
        dec.advance(tok_B, live_B)
    out = assemble(prompts, torch.stack(tokens, 1).cpu(), torch.stack(s_logps, 1).cpu(), eos_id, pad_id)
    return MixedSampled(out.batch, out.sampler_logp_BT, _cut(torch.stack(m_logps, 1), out.batch), queries)


def mixed_rollout(env: RolloutEnv, problems: list[Problem], generator: torch.Generator, *, alpha: float) -> Experience:
    """``group_size`` samples per prompt from the teacher-student mixture.

    ``sampler_logp_BT`` holds the *student's* log-probs at sampling time (the reward's
    ``log π_θ``) and ``extra["mix_logp_BT"]`` the mixture's (the PPO ratio's denominator).
    ``on_policy`` is true only for ``α = 0``; ``teacher_tokens`` counts teacher queries.
    """
    rows, group_B = group_rows(problems, env.group_size)
    was_training = env.student.training
    env.student.eval()
    out = mixed_sample(
        env.student, env.teacher, [env.encode_prompt(p) for p in rows], alpha=alpha,
        max_new_tokens=env.max_new_tokens, eos_id=env.eos_id, pad_id=env.pad_id,
        temperature=env.temperature, top_p=env.top_p, generator=generator,
    )
    env.student.train(was_training)
    completions = out.batch.completions()
    return Experience(
        batch=out.batch, problems=rows, group_B=group_B, sampler_logp_BT=out.student_logp_BT,
        rewards_B=verify_rows(env, rows, completions), truncated_B=truncated_rows(completions, env.eos_id),
        on_policy=alpha == 0.0, teacher_tokens=out.teacher_queries, extra={"mix_logp_BT": out.mix_logp_BT},
    )
