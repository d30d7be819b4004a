"""Lean teacher scoring: token log-probs, entropy and top-K without ``[B, T, V]`` tensors.

The teacher's distribution for completion token ``t`` of row ``b`` of a
:class:`~opd.batch.SeqBatch` is ``π = softmax(z / τ)``, ``z = head(h)`` the LM head on the
final hidden state at column ``P - 1 + t``. At each kept position
(``completion_mask_BT``) the scores (:class:`~opd.models.base.Scores`) are

    token_logp = log π(y_t),   entropy = -Σ_v π_v log π_v,   top-K = the K largest log π_v

(the K ids in descending order of log-prob), exactly what the plain pass computes: the
decoder over the padded batch, the head on every completion column, ``log_softmax`` of
the whole ``[B, T, V]`` (plus its ``exp`` for the entropy). Two savings:

1. **Packed, length-bucketed decoder calls.** Row ``b`` needs only its *span*: the columns
   from its first attended prompt column (at most ``P - 1``) to the column predicting its
   last kept token, ``s_b = P - 1 + n_b - left_b`` columns (``n_b``: last kept index + 1).
   Rows are sorted by span and cut into contiguous buckets minimizing
   ``Σ_buckets (rows · max span + call_cost)`` (an exact O(B²) dynamic program over the
   sorted spans), with at most ``max_tokens`` padded cells per bucket unless a bucket is
   one row. In a bucket every span is right-aligned to the bucket's width (left padding
   only, original position ids and attention values kept), so a short row does not pay
   for the longest row's prompt or completion padding, and rows without kept tokens cost
   nothing. Causal attention makes the hidden state at a column depend only on the
   attended columns up to it, so the kept positions' hidden states are the plain pass's
   (up to float rounding of differently shaped matmuls).
2. **The head on kept positions only, in chunks.** The kept hidden states ``[N, H]`` go
   through the head ``chunk_size`` positions at a time; each chunk's logits are upcast to
   float32, log-softmaxed and reduced to the four scores, then dropped. Peak extra
   memory of the head is three ``[chunk_size, V]`` float32 buffers.

Masked positions hold the uniform distribution's scores (``token_logp = -log V``,
``entropy = log V``, top-K ids ``0..K-1`` with log-prob ``-log V``): finite and
self-consistent, as the :class:`~opd.models.base.Scores` contract asks, but meaningless.
"""

from __future__ import annotations

import math

import torch

from opd.batch import SeqBatch
from opd.losses.chunked import default_chunk_size
from opd.models.base import Scores
from opd.models.fsdp import decoder_of
from opd.models.head import head_rows

BUCKET_TOKENS = 1 << 14  # most padded cells (rows · width) of one bucketed decoder call
CALL_COST = 256  # what one extra decoder call is worth, in padded cells


def chunk_scores(logits_CV: torch.Tensor, tokens_C: torch.Tensor, k: int, temperature: float):
    """``(token_logp_C, entropy_C, topk_ids_CK, topk_logp_CK)`` of ``softmax(logits / τ)``,
    in float32 (the math of the plain ``[B, T, V]`` pass, on ``C`` rows)."""
    logp_CV = torch.log_softmax(logits_CV.float() / temperature, dim=-1)
    token_C = logp_CV.gather(-1, tokens_C.unsqueeze(-1)).squeeze(-1)
    topk_logp_CK, topk_ids_CK = logp_CV.topk(k, dim=-1)
    entropy_C = -logp_CV.exp().mul_(logp_CV).nan_to_num_().sum(-1)
    return token_C, entropy_C, topk_ids_CK, topk_logp_CK


def plan_buckets(spans: list[int], *, max_tokens: int = BUCKET_TOKENS, call_cost: int = CALL_COST) -> list[list[int]]:
    """Partition row indices into buckets (each a list, longest span first).

    Rows sorted by span (descending) are cut into contiguous runs minimizing
    ``Σ (len(run) · span of its first row + call_cost)``, each run holding at most
    ``max_tokens`` cells unless it is a single row. ``best[j]`` is the least cost of the
    first ``j`` sorted rows; a run's cells only grow as it extends to longer rows, so the
    search for its start stops at the first run over budget.
    """
    order = sorted(range(len(spans)), key=lambda b: -spans[b])
    s = [spans[b] for b in order]
    best, start = [0.0] + [math.inf] * len(s), [0] * (len(s) + 1)
    for j in range(1, len(s) + 1):
        for i in range(j - 1, -1, -1):
            cells = (j - i) * s[i]
            if cells > max_tokens and i < j - 1:
                break
            if best[i] + cells + call_cost < best[j]:
                best[j], start[j] = best[i] + cells + call_cost, i
    buckets, j = [], len(s)
    while j > 0:
        buckets.append(order[start[j] : j])
        j = start[j]
    return buckets[::-1]


def row_spans(batch: SeqBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left_B, span_B)``: each row's first needed column and its number of needed columns
    (0 for a row without kept tokens)."""
    P, mask_BT = batch.prompt_len, batch.completion_mask_BT.bool()
    T = mask_BT.shape[1]
    n_B = (mask_BT * torch.arange(1, T + 1, device=mask_BT.device)).amax(1) if T else mask_BT.sum(1)
    attended_BP = batch.attention_mask_BL[:, :P] != 0
    first_B = torch.where(attended_BP.any(1), attended_BP.long().argmax(1), P)
    left_B = first_B.clamp(max=P - 1)
    return left_B, torch.where(n_B > 0, P - 1 + n_B - left_B, 0)


def bucket_hidden(model, batch: SeqBatch, rows_R: torch.Tensor, left_B: torch.Tensor, span_B: torch.Tensor):
    """Final hidden states at the kept positions of ``rows_R``, from one decoder call on
    their right-aligned spans: ``(hidden_NH, flat_N)``, ``flat_N = b·T + t``."""
    left_R, span_R = left_B[rows_R], span_B[rows_R]
    W = int(span_R.max())
    off_R = W - span_R - left_R  # packed column = original column + off
    src_RW = torch.arange(W, device=rows_R.device)[None, :] - off_R[:, None]
    valid_RW = src_RW >= left_R[:, None]
    src_RW = src_RW.clamp(min=0)

    def take(x_BL: torch.Tensor) -> torch.Tensor:
        return x_BL[rows_R].gather(1, src_RW) * valid_RW  # 0 (id, position, attention) on padding

    out = decoder_of(model)(
        input_ids=take(batch.input_ids_BL),
        attention_mask=take(batch.attention_mask_BL),
        position_ids=take(batch.position_ids_BL),
        use_cache=False,
    )
    mask_RT = batch.completion_mask_BT[rows_R].bool()
    r_N, t_N = mask_RT.nonzero(as_tuple=True)
    hidden_NH = out.last_hidden_state[r_N, batch.prompt_len - 1 + t_N + off_R[r_N]]
    return hidden_NH, rows_R[r_N] * mask_RT.shape[1] + t_N


def _uniform_scores(B: int, T: int, k: int, V: int, device) -> Scores:
    """The uniform distribution's scores everywhere (what masked positions keep)."""
    logp = -math.log(V)
    return Scores(
        token_logp_BT=torch.full((B, T), logp, device=device),
        entropy_BT=torch.full((B, T), -logp, device=device),
        topk_ids_BTK=torch.arange(k, device=device).expand(B, T, k).clone(),
        topk_logp_BTK=torch.full((B, T, k), logp, device=device),
    )


@torch.no_grad()
def lean_scores(
    model,
    batch: SeqBatch,
    *,
    topk: int,
    temperature: float = 1.0,
    max_tokens: int = BUCKET_TOKENS,
    call_cost: int = CALL_COST,
    chunk_size: int | None = None,
) -> Scores:
    """Scores of the kept positions of ``batch`` under a causal LM (module doc), never
    holding ``[B, T, V]``; ``max_tokens``/``call_cost`` steer the buckets
    (:func:`plan_buckets`), ``chunk_size`` the head's positions per chunk."""
    head = model.get_output_embeddings()
    V = head_rows(head)  # the ids it scores: a head padded past its tokenizer is cut (opd.models.head)
    k, C = min(topk, V), chunk_size or default_chunk_size(V)
    B, T = batch.completion_mask_BT.shape
    dev = batch.input_ids_BL.device
    out = _uniform_scores(B, T, k, V, dev)
    flat = (out.token_logp_BT.view(-1), out.entropy_BT.view(-1), out.topk_ids_BTK.view(-1, k), out.topk_logp_BTK.view(-1, k))
    tokens_N = batch.completion_ids_BT.reshape(-1)
    left_B, span_B = row_spans(batch)
    live = [b for b, s in enumerate(span_B.tolist()) if s > 0]
    for bucket in plan_buckets([int(span_B[b]) for b in live], max_tokens=max_tokens, call_cost=call_cost):
        rows_R = torch.tensor([live[i] for i in bucket], device=dev)
        hidden_NH, flat_N = bucket_hidden(model, batch, rows_R, left_B, span_B)
        for s in range(0, flat_N.shape[0], C):
            idx = flat_N[s : s + C]
            for dst, val in zip(flat, chunk_scores(head(hidden_NH[s : s + C]), tokens_N[idx], k, temperature)):
                dst[idx] = val.to(dst.dtype)
    return out
