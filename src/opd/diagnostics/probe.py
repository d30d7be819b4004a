"""Correction-path probe (testbed): plant a wrong step and see whether the student recovers.

For a held-out problem and a depth ``k`` (1-based, ``1 <= k <= horizon``) the prefix is
the reference solution's first ``k`` steps (steps end with ``;``) with step ``k`` cut
right after its last word, its result (addition: the units digit ``u_k``, which later
steps do not read but the answer copies; modchain: ``v_k``, which every later step
reads), which is replaced by a plausible wrong word (one
of the oracle's plausible-but-wrong ids at that slot, picked by a seeded generator)::

    addition, k = 2:   2 5 0 = 0 7 ; 7 1 0 = 0 3        (right: 0 8)

The correct continuation is the correction onset ``wait`` (then the redone step, see
:mod:`opd.testbed.steps`). Measured for the student:

- ``p_wait``: ``pi_S(wait | x, prefix)``, the probability of the correction onset;
- ``onset``: the share of greedy continuations that start with ``wait``;
- ``recovery``: the share of greedy continuations whose full completion (prefix +
  continuation) verifies correct. Only the final answer is checked, so a continuation
  that writes the right answer without correcting the step counts (a *silent*
  recovery: ``recovery`` above ``onset``);
- ``clean_recovery``: the same with the correct result kept (the prefix's baseline);
- ``wait_redo``: the share of greedy continuations that start with ``wait`` and then
  redo step ``k`` exactly (its reference words and ``;``), and ``redo_given_wait``, that
  share over ``onset`` (P(correct redo | wait); NaN when no continuation waited);
- ``false_wait``: ``pi_S(wait | x, clean prefix)``, and ``false_onset``: the share of
  greedy continuations of the clean prefix that start with ``wait`` (a false alarm: the
  step was right).

Pure measurement: models, oracles, tokenized inputs and the verifier come in as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.batch import make_batch
from opd.models.hf import completion_hidden
from opd.models.sampler import sample


@dataclass
class Planted:
    prompt: list[int]
    prefix: list[int]  # the cut reference with the planted wrong result (last token)
    clean: list[int]  # the same cut with the right result
    position: int  # index of the planted token in ``prefix``
    redo: list[int]  # step k's reference words and its ``sep``: the right redo after ``wait``


def cut_after_step(solution_ids: list[int], sep_id: int, k: int) -> list[int]:
    """The first ``k`` steps of ``solution_ids`` without step ``k``'s closing ``sep``."""
    seps = [i for i, tok in enumerate(solution_ids) if tok == sep_id]
    if not 1 <= k <= len(seps):
        raise ValueError(f"depth k={k} outside 1..{len(seps)} (the solution's steps)")
    return list(solution_ids[: seps[k - 1]])


def plant_wrong_step(oracle, prompt: list[int], solution_ids: list[int], sep_id: int, k: int, generator) -> Planted:
    """Cut the reference after step ``k`` and replace its result (module doc)."""
    clean = cut_after_step(solution_ids, sep_id, k)
    pos = len(clean) - 1
    target = oracle.trace(prompt, clean)[pos]
    wrong = [i for i in target.plausible if i != clean[pos]]
    if not wrong:
        raise ValueError(f"the oracle names no plausible wrong word at step {k}'s result")
    pick = wrong[int(torch.randint(len(wrong), (1,), generator=generator, device="cpu"))]
    step_start = max((i + 1 for i, tok in enumerate(clean) if tok == sep_id), default=0)
    return Planted(list(prompt), clean[:pos] + [pick], clean, pos, clean[step_start:] + [sep_id])


def first_deviation(oracle, prompt: list[int], completion: list[int]) -> int | None:
    """The first position where ``completion`` differs from the oracle's intended word."""
    for t, (tok, target) in enumerate(zip(completion, oracle.trace(prompt, completion))):
        if tok != target.intended:
            return t
    return None


@torch.no_grad()
def next_token_logp(model, prompts: list[list[int]], prefixes: list[list[int]], token_id: int | list[int], pad_id: int) -> torch.Tensor:
    """``log pi(token | x, prefix)`` per row, ``[N]`` (one batched forward pass); ``token_id``
    one id for every row or one per row."""
    ids = [token_id] * len(prefixes) if isinstance(token_id, int) else list(token_id)
    batch = make_batch(prompts, [list(q) + [t] for q, t in zip(prefixes, ids)], pad_id)
    hidden_BTH = completion_hidden(model, batch)
    last_B = torch.tensor([len(q) for q in prefixes], device=hidden_BTH.device)
    rows_B = torch.arange(len(prefixes), device=hidden_BTH.device)
    logits_BV = model.get_output_embeddings()(hidden_BTH[rows_B, last_B]).float()  # one position per row
    ids_B = torch.tensor(ids, device=logits_BV.device)
    return torch.log_softmax(logits_BV, -1)[rows_B, ids_B].cpu()


@torch.no_grad()
def greedy_continuations(
    model, prompts: list[list[int]], prefixes: list[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int
) -> list[list[int]]:
    """The greedy continuation of each ``(prompt, prefix)`` (the new tokens only)."""
    out = sample(
        model, [list(p) + list(q) for p, q in zip(prompts, prefixes)],
        max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, temperature=0.0,
    )
    return out.batch.completions()


def recovery_rate(prefixes: list[list[int]], continuations: list[list[int]], verify_fn) -> float:
    """Share of rows ``i`` with ``verify_fn(i, prefix_i + continuation_i)`` true."""
    ok = [bool(verify_fn(i, list(q) + list(c))) for i, (q, c) in enumerate(zip(prefixes, continuations))]
    return sum(ok) / len(ok) if ok else float("nan")


def probe_depth(model, planted: list[Planted], verify_fn, *, wait_id: int, eos_id: int, pad_id: int, max_new_tokens: int) -> dict[str, float]:
    """``p_wait``, ``onset``, ``recovery``, ``clean_recovery``, ``wait_redo``,
    ``redo_given_wait``, ``false_wait`` and ``false_onset`` (module doc) over the planted
    prefixes; ``verify_fn(i, completion)`` checks row ``i``'s completion."""
    prompts = [p.prompt for p in planted]
    wrong, clean = [p.prefix for p in planted], [p.clean for p in planted]
    kw = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
    cont = greedy_continuations(model, prompts, wrong, **kw)
    clean_cont = greedy_continuations(model, prompts, clean, **kw)
    return {
        "p_wait": float(next_token_logp(model, prompts, wrong, wait_id, pad_id).exp().mean()),
        **correction_shares(planted, cont, clean_cont, wait_id),
        "recovery": recovery_rate(wrong, cont, verify_fn),
        "clean_recovery": recovery_rate(clean, clean_cont, verify_fn),
        "false_wait": float(next_token_logp(model, prompts, clean, wait_id, pad_id).exp().mean()),
        "n": float(len(planted)),
    }


def correction_shares(planted: list[Planted], cont: list[list[int]], clean_cont: list[list[int]], wait_id: int) -> dict[str, float]:
    """``onset``, ``wait_redo``, ``redo_given_wait`` and ``false_onset`` (module doc) from the
    continuations of the wrong prefixes (``cont``) and of the clean ones (``clean_cont``)."""
    waits = [bool(c) and c[0] == wait_id for c in cont]
    redone = [w and c[1:1 + len(p.redo)] == p.redo for w, c, p in zip(waits, cont, planted)]
    return {
        "onset": sum(waits) / len(cont),
        "wait_redo": sum(redone) / len(cont),
        "redo_given_wait": sum(redone) / sum(waits) if any(waits) else float("nan"),
        "false_onset": sum(bool(c) and c[0] == wait_id for c in clean_cont) / len(clean_cont),
    }
