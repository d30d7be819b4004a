"""Coverage decay: how well the teacher covers the tokens it is asked to score, by position.

For a set of rollouts (student's own, or the teacher's own for the same prompts), at
every completion position ``t`` averaged over the rollouts still running at ``t``:

- ``logp``: ``log pi_T(y_t | c_t)`` (floored at :data:`opd.run.step_diagnostics.LOGP_FLOOR`),
  the teacher's log-likelihood of the rollout's own tokens;
- ``entropy``: ``H(pi_T(. | c_t))`` in nats;
- ``overlap``: ``|TopK_S(c_t) ∩ TopK_T(c_t)| / K`` (:func:`opd.run.step_diagnostics.topk_overlap_BT`);
- ``agree``: the same with ``K = 1``, ``1[argmax pi_S = argmax pi_T]`` (a peaked teacher
  with many tied runner-up words, such as the oracle, makes its top-K beyond the first
  an arbitrary tie-break, so the top-1 agreement is the cleaner number there).

On the teacher's own rollouts the teacher is on its support by construction; the gap to
the student's rollouts, and how it grows with ``t``, is the coverage decay of METHODS.md.
Pure measurement: models, teachers and token lists come in as arguments.
"""

from __future__ import annotations

import torch

from opd.batch import make_batch
from opd.run.step_diagnostics import LOGP_FLOOR, topk_overlap_from_ids_BT
from opd.methods.full_vocab import frozen_student_stats

CURVES = ("logp", "entropy", "overlap", "agree")


def position_means(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> list[float | None]:
    """Per column ``t``: ``Σ_b m_bt x_bt / Σ_b m_bt``; ``None`` where no row is real."""
    mask_BT = mask_BT.bool()
    vals_BT = torch.where(mask_BT, values_BT.double(), 0.0)
    n_T = mask_BT.sum(0)
    return [float(s / n) if n > 0 else None for s, n in zip(vals_BT.sum(0).tolist(), n_T.tolist())]


@torch.no_grad()
def coverage_profile(
    teacher, student, prompts: list[list[int]], completions: list[list[int]], pad_id: int, *, topk: int = 8
) -> dict[str, list[float | None]]:
    """The teacher's per-position curves (module doc) on the given rollouts.

    ``student`` (a causal LM, or None) gives ``overlap`` and ``agree``; without it only
    ``logp`` and ``entropy`` are returned. Also ``count``: rollouts running at each ``t``.
    """
    batch = make_batch(prompts, completions, pad_id)
    mask_BT = batch.completion_mask_BT
    scores = teacher.score(batch, topk=topk)
    logp_BT = scores.token_logp_BT.double().cpu().nan_to_num(nan=LOGP_FLOOR).clamp(min=LOGP_FLOOR)
    out = {
        "logp": position_means(logp_BT, mask_BT),
        "entropy": position_means(scores.entropy_BT.cpu(), mask_BT),
        "count": mask_BT.sum(0).tolist(),
    }
    if student is not None:
        _, s_ids_BTk = frozen_student_stats(student, batch, topk=scores.topk_ids_BTK.shape[-1])  # chunked: no [B, T, V]
        s_ids_BTk = s_ids_BTk.cpu()
        overlap_BT = topk_overlap_from_ids_BT(s_ids_BTk, scores.topk_ids_BTK.cpu(), scores.topk_logp_BTK.cpu())
        out["overlap"] = position_means(overlap_BT, mask_BT)
        agree_BT = topk_overlap_from_ids_BT(s_ids_BTk[..., :1], scores.topk_ids_BTK[..., :1].cpu(), scores.topk_logp_BTK[..., :1].cpu())
        out["agree"] = position_means(agree_BT, mask_BT)
    return out


def summary(profile: dict[str, list[float | None]]) -> dict[str, float]:
    """Token-weighted means of each curve, and of its first and last halves of positions."""
    counts = profile["count"]
    out = {}
    for key in CURVES:
        if key not in profile:
            continue
        pairs = [(v, n) for v, n in zip(profile[key], counts) if v is not None and n > 0]
        if not pairs:
            continue
        half = (len(counts) + 1) // 2
        for name, part in (("all", pairs), ("first", pairs[:half]), ("last", pairs[half:])):
            w = sum(n for _, n in part)
            if w > 0:
                out[f"{key}/{name}"] = sum(v * n for v, n in part) / w
    return out
