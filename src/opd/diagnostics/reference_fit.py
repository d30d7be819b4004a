"""How the student fits the reference solution, position by position: the argmax against the
mass (testbed and any task with reference solutions).

Greedy accuracy needs the student's argmax to be a right token at every step; sampled
accuracy (pass@1) needs the mass on right tokens, multiplied over the steps. On a task whose
reference solution is the one right path (``modchain``, ``addition``: the oracle's moves), a
teacher-forced pass over the reference measures both without sampling. For a problem with
prompt ``x`` and reference ``y_1..y_T`` (the solution's tokens, end of sequence left out),
with ``p_t = pi_S(y_t | x, y_<t)``:

- ``p_ref``: the mean of ``p_t`` over the tokens of a part of the solution;
- ``argmax_ref``: the share of those tokens where ``argmax pi_S(. | x, y_<t) = y_t``;
- ``entropy``: the mean of ``H(pi_S(. | x, y_<t))`` over them, in nats;
- ``follow``: the share of problems whose argmax equals ``y_t`` at every ``t`` up to the end of
  the part (greedy decoding then writes the reference so far);
- ``p_follow``: the mean over problems of ``prod_{t <= end of part} p_t``, the probability
  that one sample at temperature 1 writes the reference so far.

The solution is cut into ``parts`` equal shares of its tokens (part ``k`` holds the 0-based
positions ``ceil((k - 1) T / parts) <= t < ceil(k T / parts)``), so the last part's ``follow`` and
``p_follow`` cover the whole solution: a lower bound on greedy accuracy and on pass@1 where
other paths can also be right. Pure measurement: the model and tokenized inputs come in.
"""

from __future__ import annotations

import math

import torch

from opd.batch import make_batch
from opd.models.hf import completion_logits


@torch.no_grad()
def token_fit_BT(model, prompts: list[list[int]], solutions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Per reference token (``[B, T]``, right-padded: row ``b``'s first ``len(solutions[b])``
    columns are its tokens): ``logp_BT`` of the reference token, ``argmax_BT`` (it is the
    argmax) and ``entropy_BT``."""
    batch = make_batch(prompts, solutions, pad_id)
    logp_BTV = torch.log_softmax(completion_logits(model, batch), -1).cpu()
    ref_BT = batch.input_ids_BL[:, batch.prompt_len:]
    logp_BT = logp_BTV.gather(-1, ref_BT.unsqueeze(-1)).squeeze(-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
    return {"logp_BT": logp_BT, "argmax_BT": logp_BTV.argmax(-1) == ref_BT, "entropy_BT": entropy_BT}


def part_ends(length: int, parts: int) -> list[int]:
    """The exclusive end index of each of ``parts`` equal shares of ``length`` tokens."""
    return [math.ceil(k * length / parts) for k in range(1, parts + 1)]


def reference_fit(model, prompts: list[list[int]], solutions: list[list[int]], pad_id: int, *, parts: int = 4,
                  rows: int = 32) -> dict[int, dict[str, float]]:
    """``{k: metrics}`` for each part ``k`` = 1..``parts`` of the solutions (the module's
    docstring defines the metrics), ``rows`` problems per forward pass."""
    sums = {k: {"p": 0.0, "argmax": 0.0, "entropy": 0.0, "tokens": 0, "follow": 0.0, "p_follow": 0.0}
            for k in range(1, parts + 1)}
    for start in range(0, len(prompts), rows):
        fit = token_fit_BT(model, prompts[start:start + rows], solutions[start:start + rows], pad_id)
        for b, solution in enumerate(solutions[start:start + rows]):
            _add_row(sums, {key: v[b, :len(solution)] for key, v in fit.items()}, part_ends(len(solution), parts))
    n = len(prompts)
    return {k: {"p_ref": s["p"] / max(s["tokens"], 1), "argmax_ref": s["argmax"] / max(s["tokens"], 1),
                "entropy": s["entropy"] / max(s["tokens"], 1), "follow": s["follow"] / n, "p_follow": s["p_follow"] / n,
                "n": n} for k, s in sums.items()}


def _add_row(sums: dict, row: dict[str, torch.Tensor], ends: list[int]) -> None:
    """One problem's tokens added to each part's sums (``row``: its ``[T]`` slices)."""
    begin = 0
    for k, end in enumerate(ends, start=1):
        s = sums[k]
        s["p"] += float(row["logp_BT"][begin:end].exp().sum())
        s["argmax"] += float(row["argmax_BT"][begin:end].float().sum())
        s["entropy"] += float(row["entropy_BT"][begin:end].sum())
        s["tokens"] += end - begin
        s["follow"] += float(bool(row["argmax_BT"][:end].all()))
        s["p_follow"] += math.exp(float(row["logp_BT"][:end].sum()))
        begin = end
