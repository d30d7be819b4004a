"""Local noise: the teacher's uncertainty on student prefixes, and what its argmax does
after a wrong step.

- Entropy distribution: the teacher's next-token entropy ``H(pi_T(. | c_t))`` at every
  real completion position of the student's rollouts (quantiles and a histogram).
- After a wrong step (testbed only, where wrong steps are known): two oracles walk each
  student rollout. The *recovering* oracle (``recovers=True``) intends ``wait`` at every
  position whose prefix holds an uncorrected wrong word; the *continuing* oracle
  (``recovers=False``) intends the word that continues the wrong prefix as if it were
  right. At those positions (recovering oracle intends ``wait``, at least one deviation
  before, and the continuing oracle names a real continuation word) the configured
  teacher's argmax ``a_t`` is classified:

      corrects   a_t = wait                       (the correction onset)
      continues  a_t = the continuing oracle's word
      other      anything else

  Once the student writes ``wait`` the prefix is no longer wrong (the redone step follows),
  so a teacher that keeps correcting is counted once per wrong position it saw.
Pure measurement: teachers, oracles and token lists come in as arguments.
"""

from __future__ import annotations

import torch

from opd.batch import make_batch

ENTROPY_QUANTILES = (0.1, 0.5, 0.9, 0.99)
CLASSES = ("corrects", "continues", "other")


def masked_values(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """The real entries of ``values_BT`` as a flat float64 tensor (row-major order)."""
    return values_BT.double().cpu()[mask_BT.bool().cpu()]


def entropy_stats(entropy_N: torch.Tensor, high: float = 1.0) -> dict[str, float]:
    """Mean, quantiles and the share above ``high`` nats of a flat tensor of entropies."""
    if entropy_N.numel() == 0:
        return {}
    out = {"mean": float(entropy_N.mean()), f"share>{high:g}": float((entropy_N > high).double().mean())}
    qs = torch.quantile(entropy_N.double(), torch.tensor(ENTROPY_QUANTILES, dtype=torch.float64, device=entropy_N.device))
    out.update({f"q{int(round(100 * q))}": float(v) for q, v in zip(ENTROPY_QUANTILES, qs)})
    return out


@torch.no_grad()
def teacher_entropy_on(teacher, prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> torch.Tensor:
    """The teacher's entropy at every real position of the rollouts (flat, float64)."""
    batch = make_batch(prompts, completions, pad_id)
    scores = teacher.score(batch, topk=1)
    return masked_values(scores.entropy_BT, batch.completion_mask_BT)


def wrong_prefix_positions(recovering, continuing, prompt: list[int], completion: list[int]) -> list[tuple[int, int]]:
    """``(t, continuation id)`` for each position ``t`` whose prefix holds an uncorrected
    wrong word (module doc); ``recovering`` / ``continuing`` are oracles with
    ``recovers=True`` / ``False``."""
    wait = recovering.wait_token_id
    fix, cont = recovering.trace(prompt, completion), continuing.trace(prompt, completion)
    return [
        (t, c.intended)
        for t, (f, c) in enumerate(zip(fix, cont))
        if f.intended == wait and f.deviations > 0 and c.intended not in (wait, recovering.eos_token_id)
    ]


def classify_argmax(argmax_id: int, wait_id: int, continuation_id: int) -> str:
    if argmax_id == wait_id:
        return "corrects"
    return "continues" if argmax_id == continuation_id else "other"


@torch.no_grad()
def after_wrong_step(
    teacher, recovering, continuing, prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> dict[str, float]:
    """Counts and shares of :data:`CLASSES` of the teacher's argmax at wrong-prefix
    positions, plus ``positions`` (how many) and ``rollouts`` (rows with at least one)."""
    batch = make_batch(prompts, completions, pad_id)
    argmax_BT = teacher.score(batch, topk=1).topk_ids_BTK[..., 0].cpu()
    counts = dict.fromkeys(CLASSES, 0)
    rows = 0
    for b, (p, c) in enumerate(zip(prompts, completions)):
        found = wrong_prefix_positions(recovering, continuing, p, c)
        rows += bool(found)
        for t, cont in found:
            counts[classify_argmax(int(argmax_BT[b, t]), recovering.wait_token_id, cont)] += 1
    n = sum(counts.values())
    out = {"positions": float(n), "rollouts": float(rows)}
    out.update({f"{k}": counts[k] / n if n else float("nan") for k in CLASSES})
    return out
