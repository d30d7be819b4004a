"""Divergences against a sparse teacher that only sends its top-K ids and log-probs.

A teacher served remotely typically returns, per position, ``K`` token ids and their
log-probs (``teacher_topk_ids_BTK``, ``teacher_topk_logp_BTK``) instead of ``[B, T, V]``
logits. The student still has its full logits. The divergence is computed on the
support ``S = ids`` (Fu et al., METHODS §6), optionally with a tail bucket holding the
mass outside S (so both sides stay full distributions over ``K + 1`` outcomes).

Numerics, kinds and per-entry terms: as in :mod:`opd.losses.divergence`.
:func:`chunked_sparse_divergence` is the same divergence from the student's hidden states and
LM head, never ``[N, V]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from opd.losses.divergence import (
    check_args,
    compute_dtype,
    divergence_from_logp,
    floored_logits,
    has_mass,
    nan_rows,
    nan_where,
)
from opd.losses.selective import chunked_logsumexp, logits_at_ids


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, stable on both ends (Mächler 2012).

    ``x ≥ 0`` (no mass left) gives the dtype's lowest finite value (a floored
    ``log 0``) with zero gradient. Source: standard numerics.
    """
    floor = torch.finfo(x.dtype).min
    neg = x < 0
    x = torch.where(neg, x, -1.0)
    near0 = x > -math.log(2.0)
    out = torch.where(
        near0, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x.clamp_max(-math.log(2.0))))
    )
    return torch.where(neg, out.clamp_min(floor), floor)


def _outside_lse(s_BTV, ids_BTK):
    """``log Σ_{v∉S} exp(s_v)`` ``[..., 1]`` of floored scaled logits: a ``logsumexp`` over the
    logits with S's entries floored. Exact, with no ``1 − Σ`` cancellation however peaked the
    student is; the floor (about ``finfo.min``) when nothing outside S has mass (S is the
    whole vocabulary, or everything else is ``-inf``)."""
    return torch.scatter(s_BTV, -1, ids_BTK, torch.finfo(s_BTV.dtype).min).logsumexp(-1, keepdim=True)


def _teacher_tail_logp(t_BTK: torch.Tensor, eps: float) -> torch.Tensor:
    """``log max(1 − Σ_k exp(logp_k), K·eps)`` ``[..., 1]`` (``log1mexp``).

    ``1 − Σ`` is only known to the rounding of the sent log-probs (``eps`` of their
    dtype): a smaller tail is taken to be ``K·eps`` rather than 0, so that a very
    confident teacher does not make the student's tail infinitely costly (rkl).
    """
    floor = math.log(t_BTK.shape[-1] * eps)
    return log1mexp(t_BTK.logsumexp(-1, keepdim=True)).clamp_min(floor)


def _with_tail(s_BTK, lse_BT1, outside_BT1, t_BTK, eps):
    """Both sides as log-probs over the K ids plus the tail bucket (sparse_divergence doc);
    ``lse``/``outside``: the student's log-normalizer over all ids / over the ids outside S."""
    nonempty = outside_BT1 > torch.finfo(outside_BT1.dtype).min
    t_tail = _teacher_tail_logp(t_BTK, eps).masked_fill(~nonempty, torch.finfo(t_BTK.dtype).min)
    return torch.cat([s_BTK - lse_BT1, outside_BT1 - lse_BT1], dim=-1), torch.cat([t_BTK, t_tail], dim=-1)


def _on_support(s_BTK, lse_BT1, t_BTK, renormalize: str):
    """Log-probs on the K ids by ``renormalize`` (as ``divergence``'s top-K support);
    ``lse``: the student's log-normalizer over all ids (unused for "both")."""
    t_hat = t_BTK if renormalize == "none" else F.log_softmax(t_BTK, dim=-1)
    if renormalize == "both":
        return F.log_softmax(s_BTK, dim=-1), t_hat
    return s_BTK - lse_BT1, t_hat


def _from_parts(s_K, lse_1, outside_1, t_K, teacher_logp, kind, *, beta, renormalize, tail_bucket, entry_clip):
    """The divergence from the student's floored scaled logits at the ids ``s_K``, its
    log-normalizers (``lse_1``: over all ids, ``outside_1``: outside them; None where not
    needed) and the teacher's floored log-probs ``t_K``, with the mass checks of
    :func:`sparse_divergence` (NaN rows are the caller's)."""
    ok = has_mass(t_K) & (has_mass(s_K) if lse_1 is None else lse_1.squeeze(-1) > torch.finfo(lse_1.dtype).min)
    if tail_bucket:
        s_lp, t_lp = _with_tail(s_K, lse_1, outside_1, t_K, torch.finfo(teacher_logp.dtype).eps)
    else:
        s_lp, t_lp = _on_support(s_K, lse_1, t_K, renormalize)
        ok = ok & has_mass(s_K) if renormalize == "both" else ok
    return divergence_from_logp(s_lp, t_lp, kind, beta=beta, entry_clip=entry_clip).masked_fill(~ok, 0.0)


def _check_sparse(student_shape, ids, logp) -> None:
    """``student_shape``: the student logits' ``[..., V]`` (made or not)."""
    if ids.shape != logp.shape or tuple(ids.shape[:-1]) != tuple(student_shape[:-1]):
        raise ValueError(
            f"shapes disagree: student {tuple(student_shape)}, ids {tuple(ids.shape)}, "
            f"logp {tuple(logp.shape)} (want [..., V], [..., K], [..., K])"
        )
    if ids.dtype != torch.long:
        raise TypeError(f"teacher_topk_ids must be int64, got {ids.dtype}")
    if not 1 <= ids.shape[-1] <= student_shape[-1]:
        raise ValueError(f"need 1 <= K <= V, got K={ids.shape[-1]}, V={student_shape[-1]}")


def sparse_divergence(
    student_logits_BTV: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor,
    teacher_topk_logp_BTK: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    renormalize: str = "both",
    tail_bucket: bool = False,
    entry_clip: float | None = None,
) -> torch.Tensor:
    """Per-position divergence against a top-K teacher: ``[..., V]``, ``[..., K]`` -> ``[...]``.

    ``D_t = Σ_{o} min(ℓ_{t,o}, entry_clip)`` (``ℓ`` of ``kind``, see
    :mod:`opd.losses.divergence`) over the outcomes ``o``:

    - ``tail_bucket=False``: the K ids, with ``renormalize`` exactly as
      ``divergence(..., support="teacher_topk", k=K)`` ("both": both renormalized on
      the ids; "teacher": teacher renormalized, student full-vocabulary log-probs;
      "none": both as given). Equal to it when the ids are the teacher's top-K and the
      log-probs its full-vocabulary log-probs at the loss temperature.
    - ``tail_bucket=True``: K + 1 outcomes, the ids plus one bucket with the rest of
      the mass: student ``Σ_{v∉ids} S(v)`` (an exact ``logsumexp`` over the other
      logits), teacher ``1 − Σ_k exp(logp_k)`` (``log1mexp``), floored at ``K·eps``
      (``eps`` of ``teacher_topk_logp``'s dtype: below that the sent log-probs cannot
      resolve it), and exactly 0 where the student has no mass outside the ids (K = V,
      or the rest of the vocabulary is ``-inf``: a vocabulary mask shared by both
      sides). Both sides are (up to that floor) full distributions, so ``renormalize``
      is ignored. ``entry_clip`` clips the bucket's entry like any other. With K = V
      this is the full-vocabulary divergence.

    ``temperature`` divides the *student* logits only: ``teacher_topk_logp`` must
    already be the teacher's log-probs at the loss temperature (METHODS rule 3). Ids
    may come in any order; they must be distinct. Gradients flow to the student logits
    (and to ``teacher_topk_logp`` if it requires grad). A position whose teacher
    log-probs are all ``-inf`` gets value 0, one with a NaN (either side) NaN with zero
    gradient (as in ``divergence``).

    Source: code/paper (METHODS §6 top-K support; the tail bucket as in TRL's
    ``iw_opd`` ``add_tail``, which instead clamps both sides' tails at 1e-7).
    Deviations: the teacher tail's ``K·eps`` floor (a numerical choice).
    """
    check_args(kind, beta, temperature, renormalize, entry_clip)
    _check_sparse(student_logits_BTV.shape, teacher_topk_ids_BTK, teacher_topk_logp_BTK)
    dtype = compute_dtype(student_logits_BTV, teacher_topk_logp_BTK)
    s_BTV = floored_logits(student_logits_BTV, temperature, dtype)
    t_K = floored_logits(teacher_topk_logp_BTK, 1.0, dtype)
    s_K = s_BTV.gather(-1, teacher_topk_ids_BTK)
    lse_1 = s_BTV.logsumexp(-1, keepdim=True)
    outside_1 = _outside_lse(s_BTV, teacher_topk_ids_BTK) if tail_bucket else None
    value = _from_parts(s_K, lse_1, outside_1, t_K, teacher_topk_logp_BTK, kind, beta=beta, renormalize=renormalize,
                        tail_bucket=tail_bucket, entry_clip=entry_clip)
    return nan_where(nan_rows(student_logits_BTV, teacher_topk_logp_BTK), value)


def chunked_sparse_divergence(
    hidden_NH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor,
    teacher_topk_logp_BTK: torch.Tensor,
    kind: str,
    *,
    bias_V: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    renormalize: str = "both",
    tail_bucket: bool = False,
    entry_clip: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`sparse_divergence` of the student logits ``z = h W^T + b`` without ``[N, V]``.

    The student's logits at the ids come from the ``K`` gathered rows of ``W``
    (:func:`opd.losses.selective.logits_at_ids`); its log-normalizer over all ids and, with
    ``tail_bucket``, over the ids outside S, from one chunked ``logsumexp`` sweep
    (:func:`opd.losses.selective.chunked_logsumexp`, ``chunk_size`` positions at a time), so
    ``renormalize="both"`` without a tail never makes a position's ``V`` logits at all.
    ``hidden_NH [..., H]`` shares its leading dims with the ids; same keywords and values,
    gradients w.r.t. hidden, weight and bias equal to the full-logits form up to float
    rounding. Deviation: with ``renormalize="both"`` and no tail, a NaN is seen in the
    hidden states and the logits at the ids only (the value does not depend on the others).
    """
    check_args(kind, beta, temperature, renormalize, entry_clip)
    V = lm_head_weight_VH.shape[0]
    _check_sparse((*hidden_NH.shape[:-1], V), teacher_topk_ids_BTK, teacher_topk_logp_BTK)
    dtype = compute_dtype(hidden_NH, lm_head_weight_VH, teacher_topk_logp_BTK)
    lead, H = hidden_NH.shape[:-1], hidden_NH.shape[-1]
    ids_NK = teacher_topk_ids_BTK.reshape(-1, teacher_topk_ids_BTK.shape[-1])
    z_K = logits_at_ids(hidden_NH.reshape(-1, H), lm_head_weight_VH, ids_NK, bias_V=bias_V).view(teacher_topk_ids_BTK.shape)
    s_K = floored_logits(z_K, temperature, dtype)
    t_K = floored_logits(teacher_topk_logp_BTK, 1.0, dtype)
    bad = nan_rows(z_K, teacher_topk_logp_BTK) | hidden_NH.detach().isnan().any(-1)
    lse_1 = outside_1 = None
    kw = dict(bias_V=bias_V, temperature=temperature, chunk_size=chunk_size)
    if tail_bucket or renormalize != "both":
        exclude = teacher_topk_ids_BTK if tail_bucket else None
        lse, outside, nan_s = chunked_logsumexp(hidden_NH, lm_head_weight_VH, exclude_ids_NK=exclude, **kw)
        lse_1, bad = lse.to(dtype)[..., None], bad | nan_s
        outside_1 = None if outside is None else outside.to(dtype)[..., None]
    value = _from_parts(s_K, lse_1, outside_1, t_K, teacher_topk_logp_BTK, kind, beta=beta, renormalize=renormalize,
                        tail_bucket=tail_bucket, entry_clip=entry_clip)
    return nan_where(bad.view(lead), value)
