"""The full-vocabulary divergence of a student view against the teacher in a signal.

``D_t = D(π_θ(·|c_t) ‖ π_T(·|c_t))`` of :func:`opd.losses.divergence.divergence`, with the
teacher's log-probs floored (:func:`opd.signals.teacher_logp.floored_logp_V`), per token
``[B, T]``. From the student's hidden states and LM head and the teacher's hidden states and
head (or its logits, for a program teacher; :class:`~opd.losses.teacher_dist.TeacherDist`,
:func:`teacher_of`) it is computed chunk by chunk
(:func:`opd.losses.chunked.chunked_divergence`): neither side's ``[B, T, V]`` logits exist at
once. The per-position statistics of the teacher (its tied top-K support, a statistic at
given ids) go through the same chunks (:func:`per_position`, :func:`teacher_support_BTK`). A student head that is not a plain ``nn.Linear`` (a quantized layer) falls back to the
full logits of the micro-batch. Both forms give the same values and gradients up to float
rounding (``tests/test_full_vocab.py``).
"""

from __future__ import annotations

import torch

from opd.losses import divergence
from opd.losses.chunked import chunked_divergence, default_chunk_size
from opd.losses.selective import logits_at_ids, token_logp_and_stats
from opd.losses.teacher_dist import TeacherDist
from opd.models.head import head_params
from opd.models.hf import completion_hidden
from opd.methods.base import Signal, StudentView
from opd.signals.teacher_logp import TEACHER_LOGP_FLOOR, floored_logp_V
from opd.signals.topk_lsm import teacher_support


def teacher_of(signal: Signal, prefix: str = "teacher") -> TeacherDist:
    """The teacher's (``prefix="ref"``: the reference model's) full distribution in a signal
    as a :class:`TeacherDist`: ``{prefix}_hidden_BTH`` with the head ``{prefix}_head`` (a model),
    or ``{prefix}_logits_BTV`` (a program teacher). The signal carries the per-row tensor and
    the head separately so that the loop can cut micro-batches of it."""
    if f"{prefix}_hidden_BTH" in signal:
        head = signal[f"{prefix}_head"]
        return TeacherDist(hidden=signal[f"{prefix}_hidden_BTH"], weight_VH=head.weight_VH, bias_V=head.bias_V)
    return TeacherDist(logits=signal[f"{prefix}_logits_BTV"])


def teacher_divergence_BT(view: StudentView, signal: Signal, kind: str, *, prefix: str = "teacher",
                          floor: float | None = TEACHER_LOGP_FLOOR, **kw) -> torch.Tensor:
    """``D_t`` per token (module doc) against ``prefix``'s distribution, its log-probs
    floored at ``floor`` (None: as they are); ``kw``: ``divergence``'s ``beta``,
    ``temperature``, ``entry_clip``, ``support``, ``k``, ``renormalize``. The gradients
    for the loop's masked token mean over ``signal["mask_BT"]`` are made in the forward
    (no recompute); any other use of ``D_t`` falls back to recomputing."""
    teacher = teacher_of(signal, prefix)
    head = view.linear_head
    if head is None or view.hidden_BTH is None or view.has_logits:  # a head that is no plain matrix
        logits_BTV = teacher.full_logits()
        return divergence(view.logits_BTV, logits_BTV if floor is None else floored_logp_V(logits_BTV, floor), kind, **kw)
    return chunked_divergence(view.hidden_BTH, head[0], teacher, kind, bias_V=head[1], chunk_size=view.chunk_size,
                              teacher_floor=floor, expected_grad=signal.get("mask_BT"), **kw)


def teacher_logit_chunks(signal: Signal, chunk_size: int | None = None):
    """``(lo, hi, logits_CV)``: the teacher's logits (float32; float64 kept) at flat positions ``lo:hi``,
    one chunk of positions at a time (never all ``[B, T, V]`` at once)."""
    teacher = teacher_of(signal)
    return teacher.chunks(chunk_size or default_chunk_size(teacher.vocab))


def teacher_logp_chunks(signal: Signal, chunk_size: int | None = None):
    """``(lo, hi, logp_CV)``: the teacher's floored log-probs (:func:`floored_logp_V`), per chunk."""
    for lo, hi, logits_CV in teacher_logit_chunks(signal, chunk_size):
        yield lo, hi, floored_logp_V(logits_CV)


@torch.no_grad()
def per_position(signal: Signal, fn, *rows: torch.Tensor, floored: bool = True, chunk_size: int | None = None) -> torch.Tensor:
    """``fn(teacher_CV, *rows_C)`` over every position, a chunk at a time -> ``[B, T, ...]``:
    ``teacher_CV`` the teacher's floored log-probs (``floored=False``: its logits), ``rows``
    per-position tensors ``[B, T, ...]`` cut to the same chunk."""
    B, T = rows[0].shape[:2]
    flat = [r.reshape(B * T, *r.shape[2:]) for r in rows]
    # floored_logp_V and a statistic's masks hold ~6 [C, V] temporaries: a quarter chunk
    chunk_size = chunk_size or max(1, default_chunk_size(teacher_of(signal).vocab) // 4)
    chunks = teacher_logp_chunks(signal, chunk_size) if floored else teacher_logit_chunks(signal, chunk_size)
    parts = [fn(x_CV, *(r[lo:hi].to(x_CV.device) for r in flat)) for lo, hi, x_CV in chunks]
    out = torch.cat(parts)
    return out.view(B, T, *out.shape[1:])


@torch.no_grad()
def teacher_support_BTK(signal: Signal, shape_BT: tuple[int, int], k: int, token_ids_BT: torch.Tensor | None = None,
                        chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The support ``S_t`` (the teacher's top-``k`` with ties, plus ``y_t`` when
    ``token_ids_BT`` is given; :func:`opd.signals.topk_lsm.teacher_support`) as ids
    ``[B, T, K']`` and the teacher's floored log-probs there (``-inf`` on padding entries,
    ``K'`` the largest support), made chunk by chunk. A position whose teacher has no
    distribution has an empty support."""
    ids_parts, logp_parts = [], []
    tokens_N = None if token_ids_BT is None else token_ids_BT.reshape(-1)
    # floored_logp_V and the tied top-K mask hold ~8 [C, V] temporaries: a quarter chunk
    chunk_size = chunk_size or max(1, default_chunk_size(teacher_of(signal).vocab) // 4)
    for lo, hi, logp_CV in teacher_logp_chunks(signal, chunk_size):
        tok_C = None if tokens_N is None else tokens_N[lo:hi].to(logp_CV.device)
        mask_CV = teacher_support(logp_CV, k, tok_C) & (logp_CV > float("-inf"))
        kc = max(1, int(mask_CV.sum(-1).max()))
        vals_CK, ids_CK = logp_CV.masked_fill(~mask_CV, float("-inf")).topk(kc, dim=-1)
        ids_parts.append(ids_CK), logp_parts.append(vals_CK)
    K = max(p.shape[1] for p in ids_parts)
    ids_NK = torch.cat([torch.nn.functional.pad(p, (0, K - p.shape[1])) for p in ids_parts])
    logp_NK = torch.cat([torch.nn.functional.pad(p, (0, K - p.shape[1]), value=float("-inf")) for p in logp_parts])
    return ids_NK.view(*shape_BT, K), logp_NK.view(*shape_BT, K)


def student_logits_at(view: StudentView, ids_BTK: torch.Tensor) -> torch.Tensor:
    """The student's logits (float32) at ids ``[B, T, K]``, differentiable, from its hidden
    states and the ``K`` gathered rows of its head (:func:`opd.losses.selective.logits_at_ids`:
    no position's ``V`` logits are ever made)."""
    head = view.linear_head
    if head is None or view.hidden_BTH is None or view.has_logits:
        return view.logits_BTV.gather(-1, ids_BTK)
    B, T, H = view.hidden_BTH.shape
    K = ids_BTK.shape[-1]
    z_NK = logits_at_ids(view.hidden_BTH.reshape(B * T, H), head[0], ids_BTK.reshape(B * T, K), bias_V=head[1])
    return z_NK.view(B, T, K)


def support_divergence_BTK(view: StudentView, ids_BTK: torch.Tensor, teacher_logp_BTK: torch.Tensor, kind: str) -> torch.Tensor:
    """The divergence ``kind`` on the support, both sides renormalized on it -> ``[B, T]``:
    the sparse form of :func:`opd.methods.topk_lsm.support_divergence` (same values)."""
    valid_BTK = teacher_logp_BTK > float("-inf")
    student_BTK = student_logits_at(view, ids_BTK).masked_fill(~valid_BTK, float("-inf"))
    return divergence(student_BTK, teacher_logp_BTK, kind)


@torch.no_grad()
def frozen_student_stats(model, batch, *, topk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entropy_BT, topk_ids_BTk)`` of the student's next-token distributions at every
    completion column (eval mode, no gradient), chunk by chunk from its hidden states and
    head (:func:`opd.losses.selective.token_logp_and_stats`): never ``[B, T, V]``; a head
    that is not a plain ``nn.Linear`` falls back to its full logits."""
    was_training = model.training
    model.eval()
    hidden_BTH = completion_hidden(model, batch)
    head = model.get_output_embeddings()
    model.train(was_training)
    if type(head) is not torch.nn.Linear:  # not a plain matrix (a quantized layer): the full logits
        logp_BTV = torch.log_softmax(head(hidden_BTH).float(), -1)
        entropy_BT = -(logp_BTV.exp() * logp_BTV).nan_to_num().sum(-1)
        return entropy_BT, logp_BTV.topk(min(topk, logp_BTV.shape[-1]), -1).indices
    weight, bias = head_params(head)
    ids_BT = batch.completion_ids_BT.to(hidden_BTH.device)
    _, entropy_BT, topk_ids_BTk = token_logp_and_stats(hidden_BTH, weight, ids_BT, topk=topk, bias_V=bias)
    return entropy_BT.float(), topk_ids_BTk
