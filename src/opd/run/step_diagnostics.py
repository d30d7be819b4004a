"""Per-step diagnostics: cheap statistics of the student's tokens, logged under ``diag/``.

Pure tensor functions (no model, no config, no method): the loop computes them on every
step for every method from what it already holds — the student's micro-batch logits, or
its hidden states and LM head (detached, under ``no_grad``), the teacher's
:class:`opd.models.base.Scores` fields when the method asked for scores, and the
completion ids. Notation: ``m_t`` the batch's completion mask (real tokens, whoever
sampled them), ``y_t`` the completion token at position ``t``, ``pi_S`` / ``pi_T``
student / teacher, ``K`` the teacher's returned top-K size. Every mean is over real
tokens, ``Σ_t m_t x_t / Σ_t m_t``; a metric with nothing to measure (no real token, an
empty bucket, no rows) is omitted, never NaN.

Student side, per token (the loop sums them over micro-batches, as the loss metrics;
without full logits they come from the lean view's chunked forward sweep,
:func:`student_step_stats_from_parts`, or from the hidden states and the LM head a chunk
of tokens at a time, :func:`student_step_stats_from_hidden`):

- ``diag/student_entropy``: ``H_t = −Σ_v pi_S(v|c_t) log pi_S(v|c_t)`` (nats);
- ``diag/topk_overlap``: ``o_t = |TopK_S(c_t) ∩ TopK_T(c_t)| / K``, only with teacher scores.

Teacher side, per step (teacher entropy and mean log-likelihood stay ``teacher/entropy``
and ``teacher/token_logp``, logged by the loop as before):

- ``diag/teacher_topk_mass``: ``Σ_{v ∈ TopK_T(c_t)} pi_T(v|c_t)``, the mass a top-K
  sparse signal keeps;
- ``diag/teacher_disagree``: ``1[argmax_v pi_T(v|c_t) ≠ y_t]``, the teacher's argmax
  being its first returned top-K id;
- ``diag/teacher_logp@lo-hi``: ``log pi_T(y_t|c_t)`` (floored at :data:`LOGP_FLOOR`)
  averaged over completion positions ``lo <= t <= hi``, buckets ``0-15``, ``16-31``,
  ``32-63``, ``64-127``, ... (doubling): coverage decay along the rollout.

Rollouts: ``diag/repetition`` (share of rows whose tail compression ratio exceeds
:data:`REP_THRESHOLD`) and ``diag/compression`` (mean ratio), from
:mod:`opd.signals.monitors`. Truncation (``rollout/truncated``), the kept fraction
(``signal/kept_frac``) and clip fractions (``pg/clip_frac*``) are logged elsewhere.

Source: METHODS.md, "What the pitfalls look like, to measure them"; the buckets, the
floor and the repetition threshold are this library's choices.
"""

from __future__ import annotations

import torch

from opd.losses import entropy
from opd.losses.selective import token_logp_and_stats
from opd.signals.monitors import DEFAULT_TAIL, repetition_ratios_B

LOGP_FLOOR = -100.0  # teacher log-probs below this (``-inf`` included) count as this
FIRST_BUCKET = 16  # the first position bucket is 0..15, then each bucket doubles
REP_THRESHOLD = 3.0  # same default as stable_opd's ``rep_threshold``
ENTROPY_CHUNK = 1 << 24  # most logits upcast at once by :func:`student_entropy_BT`


def masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> float | None:
    """``Σ_t m_t x_t / Σ_t m_t`` in float64; ``None`` when no token is masked in.
    Values at masked-out positions are ignored, whatever they are (NaN included)."""
    mask_BT = mask_BT.bool()
    n = int(mask_BT.sum())
    if n == 0:
        return None
    return float(torch.where(mask_BT, values_BT.double(), 0.0).sum()) / n


def student_entropy_BT(logits_BTV: torch.Tensor, *, chunk: int = ENTROPY_CHUNK) -> torch.Tensor:
    """``H_t = −Σ_v p_t(v) log p_t(v)``, ``p_t = softmax(z_t)``: ``[B, T, V]`` -> ``[B, T]``.

    Computed over slices of positions so that at most ``chunk`` logits are upcast at a
    time (no full ``[B, T, V]`` temporary). ``-inf`` logits contribute 0; an all ``-inf``
    row gives 0 (:func:`opd.losses.entropy`). float32, float64 for float64 input.
    """
    B, T, V = logits_BTV.shape
    dtype = torch.float64 if logits_BTV.dtype == torch.float64 else torch.float32
    out_BT = torch.zeros(B, T, dtype=dtype, device=logits_BTV.device)
    step = max(1, chunk // max(V, 1))
    for b in range(B):
        for t0 in range(0, T, step):
            out_BT[b, t0 : t0 + step] = entropy(logits_BTV[b, t0 : t0 + step])
    return out_BT


def topk_overlap_BT(
    student_logits_BTV: torch.Tensor, teacher_topk_ids_BTK: torch.Tensor, teacher_topk_logp_BTK: torch.Tensor
) -> torch.Tensor:
    """``o_t = |S_t ∩ T_t| / K`` -> float ``[B, T]`` in ``[0, 1]``, ``K = teacher_topk_ids_BTK.shape[-1]``.

    ``T_t``: the teacher's returned ids with a finite log-prob; ``S_t``: the student's
    ``min(K, V)`` largest logits that are finite (ties broken by ``torch.topk``). Ids are
    compared as they are (a shared tokenizer); ``K = 0`` is an error.
    """
    K = teacher_topk_ids_BTK.shape[-1]
    if K == 0:
        raise ValueError("top-K overlap needs the teacher's top-K ids (K >= 1)")
    k = min(K, student_logits_BTV.shape[-1])
    s_val_BTk, s_ids_BTk = student_logits_BTV.topk(k, dim=-1)
    return topk_overlap_from_ids_BT(s_ids_BTk, teacher_topk_ids_BTK, teacher_topk_logp_BTK, s_val_BTk > float("-inf"))


def topk_overlap_from_ids_BT(
    student_topk_ids_BTk: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor,
    teacher_topk_logp_BTK: torch.Tensor,
    student_ok_BTk: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`topk_overlap_BT` from the student's top-``k`` ids (``k = min(K, V)``);
    ``student_ok_BTk``: which of them have a finite logit (None: all)."""
    K = teacher_topk_ids_BTK.shape[-1]
    if K == 0:
        raise ValueError("top-K overlap needs the teacher's top-K ids (K >= 1)")
    t_ok_BTK = teacher_topk_logp_BTK > float("-inf")
    same_BTkK = (student_topk_ids_BTk[..., :, None] == teacher_topk_ids_BTK[..., None, :]) & t_ok_BTK[..., None, :]
    hits_BTk = same_BTkK.any(-1)
    if student_ok_BTk is not None:
        hits_BTk &= student_ok_BTk
    return hits_BTk.sum(-1).float() / K


def teacher_topk_mass_BT(topk_logp_BTK: torch.Tensor) -> torch.Tensor:
    """``Σ_k exp(ℓ_k)``, the teacher mass on its returned top-K ids (``-inf`` -> 0)."""
    return topk_logp_BTK.exp().sum(-1)


def teacher_disagree_BT(topk_ids_BTK: torch.Tensor, completion_ids_BT: torch.Tensor) -> torch.Tensor:
    """``1[a_t ≠ y_t]`` (float), ``a_t = topk_ids_BTK[..., 0]`` the teacher's argmax."""
    return (topk_ids_BTK[..., 0] != completion_ids_BT).float()


def position_buckets(T: int, first: int = FIRST_BUCKET) -> list[tuple[int, int]]:
    """Half-open position ranges ``[lo, hi)`` covering ``0..T-1``: ``[0, first)``, then
    ``[first, 2·first)``, ``[2·first, 4·first)``, ... (the last one may reach past ``T``)."""
    if first < 1:
        raise ValueError(f"first bucket size must be >= 1, got {first}")
    out, lo, hi = [], 0, first
    while lo < T:
        out.append((lo, hi))
        lo, hi = hi, 2 * hi
    return out


def teacher_logp_by_position(
    token_logp_BT: torch.Tensor, mask_BT: torch.Tensor, first: int = FIRST_BUCKET
) -> dict[str, float]:
    """``{"diag/teacher_logp@lo-hi": mean of max(log pi_T(y_t|c_t), LOGP_FLOOR) over real
    tokens with lo <= t <= hi}``; buckets from :func:`position_buckets`, empty ones omitted."""
    logp_BT = token_logp_BT.double().nan_to_num(nan=LOGP_FLOOR).clamp(min=LOGP_FLOOR)
    out = {}
    for lo, hi in position_buckets(logp_BT.shape[-1], first):
        mean = masked_mean(logp_BT[:, lo:hi], mask_BT[:, lo:hi])
        if mean is not None:
            out[f"diag/teacher_logp@{lo}-{hi - 1}"] = mean
    return out


def teacher_step_metrics(
    token_logp_BT: torch.Tensor,
    topk_ids_BTK: torch.Tensor,
    topk_logp_BTK: torch.Tensor,
    completion_ids_BT: torch.Tensor,
    mask_BT: torch.Tensor,
) -> dict[str, float]:
    """The teacher-side ``diag/`` metrics of one step (module doc), over ``mask_BT``."""
    out = {}
    for key, val_BT in (
        ("diag/teacher_topk_mass", teacher_topk_mass_BT(topk_logp_BTK)),
        ("diag/teacher_disagree", teacher_disagree_BT(topk_ids_BTK, completion_ids_BT)),
    ):
        mean = masked_mean(val_BT, mask_BT)
        if mean is not None:
            out[key] = mean
    out.update(teacher_logp_by_position(token_logp_BT, mask_BT))
    return out


def student_step_stats(
    logits_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor | None = None,
    teacher_topk_logp_BTK: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token student-side ``diag/`` statistics ``[B, T]``, zero where ``mask_BT`` is
    False (so that sums over the mask are exact). The overlap needs the teacher's top-K
    (row- and column-aligned with ``logits_BTV``); without it only the entropy is given.
    Call under ``torch.no_grad()`` with detached logits."""
    mask_BT = mask_BT.bool()
    stats = {"diag/student_entropy": student_entropy_BT(logits_BTV)}
    if teacher_topk_ids_BTK is not None and teacher_topk_ids_BTK.shape[-1] > 0:
        stats["diag/topk_overlap"] = topk_overlap_BT(logits_BTV, teacher_topk_ids_BTK, teacher_topk_logp_BTK)
    return {k: torch.where(mask_BT, v, 0.0) for k, v in stats.items()}


def student_step_stats_from_parts(
    entropy_BT: torch.Tensor,
    student_topk_ids_BTk: torch.Tensor | None,
    mask_BT: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor | None = None,
    teacher_topk_logp_BTK: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`student_step_stats` from the student's per-token entropy and top-``k`` ids
    (``k = min(K, V)``, e.g. from :func:`opd.losses.selective.token_logp_and_stats`)
    instead of its logits: same keys, same values."""
    stats = {"diag/student_entropy": entropy_BT}
    if teacher_topk_ids_BTK is not None and teacher_topk_ids_BTK.shape[-1] > 0:
        stats["diag/topk_overlap"] = topk_overlap_from_ids_BT(student_topk_ids_BTk, teacher_topk_ids_BTK, teacher_topk_logp_BTK)
    return {k: torch.where(mask_BT.bool(), v, 0.0) for k, v in stats.items()}


def student_step_stats_from_hidden(
    hidden_BTH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    mask_BT: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor | None = None,
    teacher_topk_logp_BTK: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`student_step_stats` of the logits ``z = h W^T + b`` (float32, float64 for a
    float64 head), made ``chunk_size`` tokens at a time (default
    :func:`opd.losses.chunked.default_chunk_size`) so that ``[B, T, V]`` is never held:
    same keys, same values up to float rounding (two ``[chunk, V]`` buffers)."""
    K = 0 if teacher_topk_ids_BTK is None else teacher_topk_ids_BTK.shape[-1]
    with torch.no_grad():
        ids_BT = torch.zeros(hidden_BTH.shape[:-1], dtype=torch.long, device=hidden_BTH.device)
        _, ent_BT, s_ids_BTk = token_logp_and_stats(hidden_BTH, weight_VH, ids_BT, topk=K, bias_V=bias_V, chunk_size=chunk_size)
    return student_step_stats_from_parts(ent_BT, s_ids_BTk, mask_BT, teacher_topk_ids_BTK, teacher_topk_logp_BTK)


def repetition_metrics(
    completion_ids_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    threshold: float = REP_THRESHOLD,
    tail: int | None = DEFAULT_TAIL,
) -> dict[str, float]:
    """``diag/repetition``: share of rows whose tail ratio
    (:func:`opd.signals.monitors.repetition_ratio`) exceeds ``threshold``;
    ``diag/compression``: the mean ratio. No rows: ``{}``."""
    if completion_ids_BT.shape[0] == 0:
        return {}
    ratios_B = repetition_ratios_B(completion_ids_BT, mask_BT, tail).double()
    return {
        "diag/repetition": float((ratios_B > threshold).double().mean()),
        "diag/compression": float(ratios_B.mean()),
    }
