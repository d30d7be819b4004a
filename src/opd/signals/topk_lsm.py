"""Top-K local support matching (Fu et al., 2603.25562; METHODS §6): the support and masks.

The support ``S_t`` is the teacher's top-K ids, optionally with the sampled token ``y_t``
as a ``K+1``-th element. Supports are carried as ``(ids_BTS, teacher_logp_BTS, keep_BTS)``:
``keep`` is False on an entry that is not part of ``S_t`` (the extra element when ``y_t``
is already among the top K), so every kept id appears once. Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def special_token_mask(ids_BT: torch.Tensor, special_ids: Sequence[int]) -> torch.Tensor:
    """``[B, T]`` bool: True where the token ``y_t`` is one of ``special_ids`` (masked from the loss)."""
    if len(special_ids) == 0:
        return torch.zeros_like(ids_BT, dtype=torch.bool)
    return torch.isin(ids_BT, torch.as_tensor(list(special_ids), dtype=ids_BT.dtype, device=ids_BT.device))


def teacher_support(
    topk_ids_BTK: torch.Tensor,
    topk_logp_BTK: torch.Tensor,
    token_ids_BT: torch.Tensor | None = None,
    token_logp_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``S_t`` = teacher top-K (``token_*`` None) or top-K ∪ {y_t} -> ``(ids, logp, keep)``.

    With the sampled token, ``S = K + 1`` entries: the last is ``y_t`` with the teacher's
    ``log π_T(y_t)``, kept only where ``y_t`` is not already among the top K.
    """
    keep_BTK = torch.ones_like(topk_ids_BTK, dtype=torch.bool)
    if token_ids_BT is None:
        return topk_ids_BTK, topk_logp_BTK, keep_BTK
    extra_BT1 = token_ids_BT.unsqueeze(-1)
    new_BT1 = ~(topk_ids_BTK == extra_BT1).any(-1, keepdim=True)
    ids_BTS = torch.cat([topk_ids_BTK, extra_BT1], dim=-1)
    logp_BTS = torch.cat([topk_logp_BTK, token_logp_BT.unsqueeze(-1).to(topk_logp_BTK.dtype)], dim=-1)
    return ids_BTS, logp_BTS, torch.cat([keep_BTK, new_BT1], dim=-1)


def retained_mass(teacher_logp_BTS: torch.Tensor, keep_BTS: torch.Tensor) -> torch.Tensor:
    """``Σ_{v∈S_t} π_T(v)`` -> ``[B, T]`` (METHODS rule 5), from the teacher's log-probs on S."""
    logp = teacher_logp_BTS.masked_fill(~keep_BTS, float("-inf"))
    return logp.logsumexp(-1).exp().nan_to_num(0.0)
