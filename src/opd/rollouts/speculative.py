"""SKD's interleaved sampling: the student proposes, the teacher vets (METHODS §15).

Each round, for every unfinished row (all rows batched together):

1. the student samples a block of up to ``block`` tokens after ``x + y_so_far``
   (its own temperature / top-p);
2. the teacher scores ``x + y_so_far + block`` in one pass;
3. the longest prefix of the block whose tokens are all in the teacher's top-K is kept;
4. at the first rejected position the teacher samples a replacement from its own
   next-token distribution there (``teacher_temperature``, ``teacher_top_p``; greedy at
   temperature 0), which is appended; then the next round starts.

A row stops at EOS or at ``max_new_tokens``. If a whole block is accepted no teacher
token is added (no "bonus" token, as in the source).

"In the teacher's top-K" is rank-based with ties included: token ``y`` is accepted iff
``log p_T(y) >= `` the K-th largest teacher log-prob, i.e. fewer than K tokens are
strictly more likely. For a model teacher ties do not occur and this is ``y ∈ topk_ids``;
for the testbed oracle (every non-intended word tied) it keeps the set well defined:
K = 1 accepts only the intended word, K >= 2 every live word when ``noise = 0``.

Random stream: the student proposes for *every* row each round (finished rows too, their
proposals discarded), so the student consumes the generator exactly as a plain
:func:`opd.models.sampler.sample` call would; with ``topk >= vocab`` nothing is ever
rejected and the result is the plain student sample (up to floating-point differences
between re-encoding and a KV cache). Teacher replacements are drawn after the round's
proposals, one batched draw over the rejecting rows.

Cost: the prefix is re-encoded every round, by the student (one prefill of
``x + y_so_far``) and by the teacher (one scoring pass over the whole sequence), so a
rollout of ``T`` tokens costs ``O(T / block)`` passes of length up to ``T`` each
(``O(T^2 / block)`` token work) instead of one cached pass. Acceptable for the testbed
and short rollouts; a cached implementation would keep both KV caches across rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from opd.batch import SeqBatch, make_batch
from opd.models.base import Teacher
from opd.models.sampler import pick_tokens, sample


@dataclass
class Speculative:
    batch: SeqBatch  # prompts | interleaved completions
    teacher_written_BT: torch.Tensor  # bool, completion columns the teacher wrote
    proposed_B: torch.Tensor  # long, student tokens the teacher vetted, per row
    accepted_B: torch.Tensor  # long, of which accepted (proposed - accepted = teacher tokens)


def in_teacher_topk(token_logp_BT: torch.Tensor, topk_logp_BTK: torch.Tensor) -> torch.Tensor:
    """bool ``[B, T]``: ``log p_T(y_t) >= `` the K-th largest teacher log-prob (ties kept)."""
    return token_logp_BT >= topk_logp_BTK[..., -1]


def accepted_prefix_len(accept_BT: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """long ``[B]``: length of the leading run of accepted tokens among the valid ones
    (``valid_BT`` is a left-aligned mask, as a completion mask is)."""
    return (accept_BT & valid_BT).long().cumprod(dim=1).sum(dim=1)


def _vet(teacher: Teacher, prompts, comps, props, rows, *, topk: int, pad_id: int):
    """Teacher pass over ``rows``: accepted block lengths [R] and ``logits_at(idx_R, col_R)``,
    the teacher's full logits ``[n, V]`` at the given (row, column) positions only (made
    from its hidden states and head when it gave those: never ``[R, T, V]``)."""
    batch = make_batch([prompts[b] for b in rows], [comps[b] + props[b] for b in rows], pad_id)
    scores = teacher.score(batch, topk=topk, full=True)
    start_R = torch.tensor([len(comps[b]) for b in rows], device="cpu")
    cols_T = torch.arange(batch.completion_mask_BT.shape[1], device="cpu")
    block_BT = batch.completion_mask_BT & (cols_T[None, :] >= start_R[:, None])
    accept_BT = in_teacher_topk(scores.token_logp_BT.cpu(), scores.topk_logp_BTK.cpu()) | ~block_BT
    n_ok_R = accepted_prefix_len(accept_BT, batch.completion_mask_BT) - start_R
    def logits_at(idx_R: torch.Tensor, col_R: torch.Tensor) -> torch.Tensor:
        if scores.hidden_BTH is None:
            return scores.logits_BTV[idx_R.to(scores.logits_BTV.device), col_R.to(scores.logits_BTV.device)].float()
        hidden = scores.hidden_BTH
        return torch.nn.functional.linear(hidden[idx_R.to(hidden.device), col_R.to(hidden.device)], *scores.head).float()

    return n_ok_R.clamp(min=0), logits_at


def _finished(comp: list[int], max_new_tokens: int, eos_id: int) -> bool:
    return len(comp) >= max_new_tokens or (bool(comp) and comp[-1] == eos_id)


def _round(propose, vet, replace, comps, flags, counts, *, block: int, max_new_tokens: int, eos_id: int) -> None:
    """One propose-vet-replace round; updates ``comps``/``flags``/``counts`` in place."""
    rows = [b for b, c in enumerate(comps) if not _finished(c, max_new_tokens, eos_id)]
    n = min(block, max(max_new_tokens - len(comps[b]) for b in rows))
    proposals = propose(n)  # every row, so the student's random stream is the plain sampler's
    props = {b: proposals[b][: max_new_tokens - len(comps[b])] for b in rows}
    n_ok_R, logits_at = vet(props, rows)
    rejects = []  # (row, completion column of the rejected token)
    for i, b in enumerate(rows):
        ok = int(n_ok_R[i])
        counts[b][0] += min(ok + 1, len(props[b]))
        counts[b][1] += ok
        comps[b] += props[b][:ok]
        flags[b] += [False] * ok
        if ok < len(props[b]):
            rejects.append((i, len(comps[b])))
    if rejects:
        idx_R, col_R = (torch.tensor(v, device="cpu") for v in zip(*rejects))
        for (i, _), tok in zip(rejects, replace(logits_at(idx_R, col_R).cpu()).tolist()):
            comps[rows[i]].append(tok)
            flags[rows[i]].append(True)


@torch.no_grad()
def speculative_sample(
    student,
    teacher: Teacher,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    block: int,
    topk: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    teacher_temperature: float = 0.2,
    teacher_top_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> Speculative:
    """Interleaved student/teacher sampling (module doc); one completion per prompt."""
    if block < 1 or topk < 1:
        raise ValueError(f"block and topk must be >= 1, got {block} and {topk}")
    B = len(prompts)
    comps: list[list[int]] = [[] for _ in range(B)]
    flags: list[list[bool]] = [[] for _ in range(B)]
    counts = [[0, 0] for _ in range(B)]  # (proposed and vetted, accepted)

    def propose(n: int) -> list[list[int]]:
        contexts = [list(p) + c for p, c in zip(prompts, comps)]
        out = sample(student, contexts, max_new_tokens=n, eos_id=eos_id, pad_id=pad_id,
                     temperature=temperature, top_p=top_p, generator=generator)
        return out.batch.completions()

    def vet(props, rows):
        return _vet(teacher, prompts, comps, props, rows, topk=topk, pad_id=pad_id)

    def replace(logits_RV: torch.Tensor) -> torch.Tensor:
        return pick_tokens(logits_RV, teacher_temperature, teacher_top_p, generator)

    while not all(_finished(c, max_new_tokens, eos_id) for c in comps):
        _round(propose, vet, replace, comps, flags, counts, block=block,
               max_new_tokens=max_new_tokens, eos_id=eos_id)
    batch = make_batch([list(p) for p in prompts], comps, pad_id)
    written_BT = torch.zeros_like(batch.completion_mask_BT)
    for b, f in enumerate(flags):
        written_BT[b, : len(f)] = torch.tensor(f, dtype=torch.bool, device="cpu")
    proposed_B, accepted_B = torch.tensor(counts, dtype=torch.long, device="cpu").unbind(-1)
    return Speculative(batch, written_BT, proposed_B, accepted_B)
