"""Per-position divergences between a student and a teacher over the vocabulary. Pure torch.

Notation (METHODS.md): student ``S = softmax(z_S / τ)``, teacher ``T = softmax(z_T / τ)``
with ``τ`` the loss temperature (METHODS rule 3), per position, over the vocabulary ``V``.

- ``"fkl"``: forward KL  ``KL(T‖S) = Σ_v T(v)(log T(v) − log S(v))``
- ``"rkl"``: reverse KL  ``KL(S‖T) = Σ_v S(v)(log S(v) − log T(v))``
- ``"jsd"``: generalized JSD (GKD, Agarwal et al. 2306.13649 Eq. 1; TRL
  ``GKDTrainer.generalized_jsd_loss``) with mixture ``M = β·T + (1−β)·S``:
  ``JSD_β = β·KL(T‖M) + (1−β)·KL(S‖M)``. ``β = 0`` is *exactly* forward KL and ``β = 1``
  *exactly* reverse KL (special-cased as in TRL: the raw formula is 0 at both ends).
  Near the ends ``JSD_β ≈ β·FKL`` (β→0) and ``≈ (1−β)·RKL`` (β→1).

Per-entry contributions ``ℓ_v`` (summed over the support to give the value; the OPSD
per-entry clip ``entry_clip=τ_c`` replaces each by ``min(ℓ_v, τ_c)`` before the sum,
METHODS §5):

- fkl: ``ℓ_v = T(v)(log T(v) − log S(v))``
- rkl: ``ℓ_v = S(v)(log S(v) − log T(v))``
- jsd: ``ℓ_v = β·T(v)(log T(v) − log M(v)) + (1−β)·S(v)(log S(v) − log M(v))``
  (fkl's / rkl's at β = 0 / 1). These are TRL's per-entry values (``reduction="none"``).

Numerics (shared by every function here):

- Half-precision inputs are computed in float32; float64 stays float64; outputs are
  float32 (float64 if an input is float64).
- Logits are floored at the dtype's lowest finite value (``-inf`` → ``finfo.min``)
  before the softmax. That leaves every distribution unchanged (``exp(finfo.min − x) =
  0``) but keeps every log-prob finite, so ``0·log 0 = 0`` holds with finite gradients.
  Where the first argument of a KL has mass and the second has none the KL is truly
  infinite: the value is then huge (≈ mass·3.4e38 in float32, or inf) and its gradient
  meaningless; avoid it (share the ``-inf`` mask between the two sides). JSD with
  ``0 < β < 1`` is always finite.
- A position whose logits are all ``-inf`` on either side (no distribution), or, with a
  top-K support, a renormalized side with no mass on the support, gets value 0 and zero
  gradient: mask it.
- A position with a NaN logit on either side gets value NaN and zero gradient: the NaN
  is *selected* away (``torch.where``) before any arithmetic, so it cannot reach a
  gradient. Masked out by the reduction (:mod:`opd.losses.reduce`), such a position
  costs nothing; kept, it makes the loss NaN (loud: the step is not applied), never a
  silent 0.
- Gradients flow to both logits; the caller detaches the teacher (``sg``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("fkl", "rkl", "jsd")
SUPPORTS = (None, "teacher_topk", "student_topk")
RENORMALIZE = ("both", "teacher", "none")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def floored_logits(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``max(z / τ, finfo.min)`` in ``dtype``: same distribution, finite log-probs (module doc).

    NaN entries become the floor too (no mass, zero gradient); :func:`nan_rows` flags them."""
    x = logits.to(dtype)
    if temperature != 1.0:
        x = x / temperature
    return _floor(x)


def nan_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """``[...]`` bool: the row ``[..., X]`` holds a NaN in any of ``tensors`` (same leading shape)."""
    rows = tensors[0].detach().amax(-1).isnan()
    for t in tensors[1:]:
        rows = rows | t.detach().amax(-1).isnan()
    return rows


def nan_where(rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` with NaN at ``rows`` (no gradient flows there)."""
    return value.masked_fill(rows, float("nan"))


def has_mass(x: torch.Tensor) -> torch.Tensor:
    """``[...]`` bool: the floored logits ``x [..., V]`` have some entry above the floor."""
    return x.amax(-1) > torch.finfo(x.dtype).min


def log_softmax_t(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(z / τ)`` over the last axis, upcast to float32 (float64 stays).

    Exact and plain (``-inf`` logits give ``-inf``; an all ``-inf`` row gives NaN, as
    ``torch.log_softmax``): a convenience for scoring, not used inside the losses.
    """
    x = logits.to(compute_dtype(logits))
    return F.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``H = −Σ_v p(v) log p(v)``, ``p = softmax(z / τ)``: ``[..., V]`` -> ``[...]``.

    ``-inf`` logits contribute 0; an all ``-inf`` row gives 0; a row with a NaN gives NaN
    (zero gradient). Source: definition.
    """
    check_temperature(temperature)
    x = floored_logits(logits, temperature, compute_dtype(logits))
    logp = F.log_softmax(x, dim=-1)
    value = -(logp.exp() * logp).sum(-1).masked_fill(~has_mass(x), 0.0)
    return nan_where(nan_rows(logits), value)


def _floor(x: torch.Tensor) -> torch.Tensor:
    """``max(x, finfo.min)``, NaN -> ``finfo.min``; zero gradient at both (``nan_to_num``)."""
    floor = torch.finfo(x.dtype).min
    return x.nan_to_num(nan=floor, neginf=floor, posinf=math.inf)


def _kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``p(v)(log p(v) − log q(v))`` per entry, for floored (finite) log-probs."""
    return logp.exp() * (logp - logq)


def _log_mixture(teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float):
    """``log M = log(β·T + (1−β)·S)`` computed in the log domain (``logaddexp``)."""
    return torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))


def divergence_terms(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str, beta: float = 0.5
) -> torch.Tensor:
    """Per-entry contributions ``ℓ_v`` (module doc) for log-probs ``[..., X]`` -> ``[..., X]``.

    The inputs may be sub-normalized (a restricted support) and may hold ``-inf``; the
    formula is applied as written (no renormalization here). Source: METHODS §3, §5.
    """
    s, t = _floor(student_logp), _floor(teacher_logp)
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return _kl_terms(t, s)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return _kl_terms(s, t)
    if kind != "jsd":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    log_m = _log_mixture(t, s, beta)
    return beta * _kl_terms(t, log_m) + (1.0 - beta) * _kl_terms(s, log_m)


def divergence_from_logp(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    entry_clip: float | None = None,
) -> torch.Tensor:
    """``Σ_v min(ℓ_v, entry_clip)`` over the last axis of log-probs ``[..., X]`` -> ``[...]``.

    ``entry_clip=None`` is the plain sum. Clipping is per vocabulary entry, from above
    (OPSD, METHODS §5 and rule 6); a clipped entry gets no gradient. A row with a NaN
    log-prob gives NaN with zero gradient (module doc).
    """
    value = _clipped_sum(divergence_terms(student_logp, teacher_logp, kind, beta), entry_clip)
    return nan_where(nan_rows(student_logp, teacher_logp), value)


def _clipped_sum(terms: torch.Tensor, entry_clip: float | None) -> torch.Tensor:
    return (terms if entry_clip is None else terms.clamp_max(entry_clip)).sum(-1)


def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest entries' ids ``[..., k]`` (the same at any temperature > 0)."""
    return logits.topk(k, dim=-1).indices


def support_logp(s: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, renormalize: str):
    """Student/teacher log-probs on the support ``ids [..., K]`` -> ``(s_K, t_K, ok)``.

    ``s``, ``t`` are floored scaled logits ``[..., V]``. A renormalized side is
    ``log π̂(v) = log π(v) − log Σ_{u∈S} π(u)`` (METHODS §6); an unrenormalized one keeps
    its full-vocabulary log-prob. ``ok [...]``: every renormalized side has mass on S.
    """
    s_K, t_K = s.gather(-1, ids), t.gather(-1, ids)
    ok = torch.ones_like(s_K[..., 0], dtype=torch.bool)
    if renormalize == "none":
        return s_K - s.logsumexp(-1, keepdim=True), t_K - t.logsumexp(-1, keepdim=True), ok
    ok = has_mass(t_K)
    t_K = F.log_softmax(t_K, dim=-1)
    if renormalize == "teacher":
        return s_K - s.logsumexp(-1, keepdim=True), t_K, ok
    return F.log_softmax(s_K, dim=-1), t_K, ok & has_mass(s_K)


def check_args(kind, beta, temperature, renormalize, entry_clip) -> None:
    """Validate the scalar arguments shared by the divergence functions."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    check_temperature(temperature)
    if renormalize not in RENORMALIZE:
        raise ValueError(f"renormalize must be one of {RENORMALIZE}, got {renormalize!r}")
    if entry_clip is not None and not isinstance(entry_clip, (int, float)):
        raise TypeError(f"entry_clip must be a number or None, got {type(entry_clip)}")
    if entry_clip is not None and math.isnan(entry_clip):
        raise ValueError("entry_clip must be a number or None, got nan")


def check_temperature(temperature: float) -> None:
    """``0 < τ < inf`` (NaN fails)."""
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def check_support(support, k, vocab: int) -> None:
    """Validate ``support`` and, for a top-K support, ``1 <= k <= V``."""
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    if support is not None and (k is None or not 1 <= k <= vocab):
        raise ValueError(f"support={support!r} needs 1 <= k <= V={vocab}, got k={k}")


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    support: str | None = None,
    k: int | None = None,
    renormalize: str = "both",
    entry_clip: float | None = None,
) -> torch.Tensor:
    """Per-position divergence ``D_t`` between student and teacher: ``[..., V]`` -> ``[...]``.

    ``D_t = Σ_{v∈S_t} min(ℓ_{t,v}, entry_clip)`` with ``ℓ`` of ``kind`` (module doc:
    fkl ``KL(T‖S)``, rkl ``KL(S‖T)``, jsd ``β·KL(T‖M) + (1−β)·KL(S‖M)``,
    ``M = βT + (1−β)S``, β=0 → fkl, β=1 → rkl exactly). Logits ``[B, T, V]`` (or
    ``[N, V]``, any leading shape) are divided by ``temperature`` before the softmax.

    Support ``S_t``: ``None`` the full vocabulary (``k``/``renormalize`` unused);
    ``"teacher_topk"`` / ``"student_topk"`` the ``k`` ids with the largest teacher /
    student logits at that position (ids are not differentiated). On S the formula
    for ``kind`` is applied, as written, to the vectors ``(Ŝ, T̂)`` where, by
    ``renormalize`` (METHODS §6 and rule 5):

    - ``"both"``: ``Ŝ = S/S(S_t)``, ``T̂ = T/T(S_t)``, both renormalized on S: a true
      divergence on S (≥ 0, 0 iff equal on S). Fu et al.'s top-K reverse KL (§6).
    - ``"teacher"``: ``T̂`` renormalized, ``Ŝ = S`` restricted (full-vocabulary
      log-probs): fkl is ``CE(T̂, S) − H(T̂) = KL(T̂‖S/S(S_t)) − log S(S_t) ≥ 0``, the
      usual top-K distillation target; rkl/jsd apply their formula to the
      sub-probability ``S``. (Entropy-aware OPD's ``FKL^K``, §9, in this reading.)
    - ``"none"``: ``Ŝ = S``, ``T̂ = T`` restricted, unnormalized: the full-vocabulary
      summand summed over S only (can be negative; ``M`` is the full mixture on S).

    With ``k = V`` every mode equals the full-vocabulary value.

    Source: paper/code (METHODS §3 GKD/TRL for jsd; §5 OPSD for entry_clip; §6 Fu et
    al. for top-K). Agrees with TRL ``generalized_jsd_loss(student_logits,
    teacher_logits, beta=β, temperature=τ, reduction="none").sum(-1)``.
    Deviations: none in the math; numerics per the module doc (floored logits; a
    position without a distribution gives 0, one with a NaN logit NaN, gradient 0).
    """
    check_args(kind, beta, temperature, renormalize, entry_clip)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)} (mismatched vocabularies are an error)"
        )
    check_support(support, k, student_logits.shape[-1])
    dtype = compute_dtype(student_logits, teacher_logits)
    s = floored_logits(student_logits, temperature, dtype)
    t = floored_logits(teacher_logits, temperature, dtype)
    ok = has_mass(s) & has_mass(t)
    if support is None:
        s_lp, t_lp = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    else:
        ids = topk_ids(t if support == "teacher_topk" else s, k)
        s_lp, t_lp, ok_S = support_logp(s, t, ids, renormalize)
        ok = ok & ok_S
    value = _clipped_sum(divergence_terms(s_lp, t_lp, kind, beta), entry_clip)  # s, t hold no NaN
    return nan_where(nan_rows(student_logits, teacher_logits), value.masked_fill(~ok, 0.0))
