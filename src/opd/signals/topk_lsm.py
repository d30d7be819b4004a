"""Top-K local support matching (Fu et al., 2603.25562; METHODS §6): the support and masks.

The support ``S_t`` is the teacher's top-K ids, ties included (every id at least as likely
as the K-th, :func:`opd.signals.teacher_logp.tied_topk_mask`), optionally with the sampled
token ``y_t``. It is carried as a boolean mask over the vocabulary, ``support_BTV``. Pure
torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opd.signals.teacher_logp import tied_topk_mask


def special_token_mask(ids_BT: torch.Tensor, special_ids: Sequence[int]) -> torch.Tensor:
    """``[B, T]`` bool: True where the token ``y_t`` is one of ``special_ids`` (masked from the loss)."""
    if len(special_ids) == 0:
        return torch.zeros_like(ids_BT, dtype=torch.bool)
    return torch.isin(ids_BT, torch.as_tensor(list(special_ids), dtype=ids_BT.dtype, device=ids_BT.device))


def teacher_support(teacher_logp_BTV: torch.Tensor, k: int, token_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """``S_t`` -> bool ``[B, T, V]``: the teacher's top-``k`` with ties, and ``y_t`` when
    ``token_ids_BT`` is given. ``teacher_logp_BTV``: the teacher's log-probs (no NaN)."""
    support_BTV = tied_topk_mask(teacher_logp_BTV, k)
    if token_ids_BT is not None:
        support_BTV = support_BTV.scatter(-1, token_ids_BT.unsqueeze(-1), True)
    return support_BTV


def retained_mass(teacher_logp_BTS: torch.Tensor, keep_BTS: torch.Tensor) -> torch.Tensor:
    """``Σ_{v∈S_t} π_T(v)`` -> ``[B, T]`` (METHODS rule 5), from the teacher's log-probs and
    the support mask over the same last axis."""
    logp = teacher_logp_BTS.masked_fill(~keep_BTS, float("-inf"))
    return logp.logsumexp(-1).exp().nan_to_num(0.0)
