"""Memory-lean divergences straight from hidden states and the LM head.

``D_n`` is :func:`opd.losses.divergence.divergence` of the student logits
``z_n = h_n W^T + b`` against the teacher, per token ``n``. The student logits are made
``chunk_size`` tokens at a time (``hidden[chunk] @ W.T``) and never held as ``[N, V]``;
neither are the teacher's when it is given as hidden states and an LM head. Each chunk's
gradient w.r.t. its logits is closed-form (below), and goes straight into the ``[N, H]``
and ``[V, H]`` gradients: peak extra memory is 3 (rkl) or 4 (fkl, jsd) ``[chunk_size, V]``
buffers plus the gradients themselves (Liger-Kernel's fused-linear-JSD idea; source:
third-party code).

Two entry points, one sweep:

- :func:`chunked_divergence_loss` returns the scalar ``Σ_n w_n D_n`` (mask and
  normalizer folded into ``weights_N``) and the detached ``D_N`` for logging. Gradients
  are computed *during the forward* (3 matmuls per chunk, as the naive
  forward+backward); backward only scales them by the upstream scalar. Fastest.
- :func:`chunked_divergence` returns ``D_N`` itself, differentiable for *any* upstream
  gradient ``g_N`` (so the caller reduces however it likes). ``dL/dW = Σ_n g_n
  (∂D_n/∂z_n)^T h_n`` cannot be pre-reduced without ``g``, so its backward recomputes
  each chunk's logits (4 student matmuls per chunk instead of 3).

Closed-form gradients w.r.t. the scaled student logits ``x = z/τ`` (``S = softmax x``),
with ``c_v = 1[ℓ_v ≤ entry_clip]`` (all ones without a clip), ``u_v = c_v S_v ∂ℓ_v/∂S_v``
and ``∂D/∂x = u − S·Σ_v u_v``:

- rkl: ``u = c·S(log S − log T + 1)``   (no clip: ``∂D/∂x = S(log S − log T − D)``)
- fkl: ``u = −c·T``                     (no clip: ``∂D/∂x = S − T``)
- jsd: ``u = c·(1−β)·S(log S − log M)``
  (since ``∂ℓ/∂S_v = (1−β)(log S_v − log M_v)``).

``support`` (top-K) is handled by running :func:`~opd.losses.divergence.divergence`
with autograd on each chunk (same values, slower). The teacher is a constant (``sg``):
no gradient reaches it; it is a :class:`~opd.losses.teacher_dist.TeacherDist` (logits, or
hidden states and a head, whose logits are made one chunk at a time too). Numerics as in
:mod:`opd.losses.divergence` (a token with a NaN logit on either side: value NaN, gradient
0). Precision: the matmuls run in the hidden states' dtype (the head is cast once per call:
under bf16 autocast the hidden states are bf16 and the master weight float32), the softmax
math in float32 (float64 if hidden or W is float64); the gradients of W and b accumulate in
float32 and come back in W's and b's dtype, the hidden's in the hidden's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch.autograd.function import once_differentiable

from opd.losses.divergence import check_args, check_support, compute_dtype, divergence
from opd.losses.fused_chunk import compiled_closed_form, kernel_choice
from opd.losses.head_grads import _MIXED_MM, add_chunk_grads  # noqa: F401 (_MIXED_MM: tests read it here)
from opd.losses.teacher_dist import TeacherDist, head_in_dtype, logits_into

#: a :class:`TeacherDist`, logits ``[N, V]``, or ``(hidden_NH, weight_VH)`` / ``(hidden_NH, weight_VH, bias_V)``.
Teacher = Union[TeacherDist, torch.Tensor, tuple]

CHUNK_ELEMENTS = 2**24  # default chunk: about this many logits (64 MiB in float32)
CHUNK_ELEMENTS_CUDA = 2**26  # on a GPU, 4x: 441 positions at V=151,936 (bench/gpu_loss_probe.py)


def default_chunk_size(vocab: int, device: torch.device | str | None = None) -> int:
    """Tokens per chunk so that one ``[chunk, V]`` buffer holds about ``CHUNK_ELEMENTS``
    (``CHUNK_ELEMENTS_CUDA`` on a GPU, where small chunks leave the matmuls and the per-chunk
    kernel launches slow: at V=151,936 on an H200 the JSD took 1.4x as long at 110 positions
    as at 441)."""
    on_gpu = device is not None and torch.device(device).type == "cuda"
    return max(1, (CHUNK_ELEMENTS_CUDA if on_gpu else CHUNK_ELEMENTS) // vocab)


@dataclass(frozen=True)
class _Spec:
    kind: str
    beta: float
    temperature: float
    entry_clip: Optional[float]
    support: Optional[str]
    k: Optional[int]
    renormalize: str
    chunk_size: Optional[int]
    teacher_floor: Optional[float] = None
    kernel: Optional[str] = None  # "eager" | "compiled" (None: kernel_choice's default)


# ---------------------------------------------------------------- per-chunk kernels


def _log_softmax_(x_CV: torch.Tensor, p_CV: torch.Tensor, normalize_p: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: ``x ← log softmax(max(x, floor))`` (NaN entries → floor), ``p ← exp(x)``
    (if ``normalize_p``).

    Returns ``(has_mass [C], nan [C])``: some logit above the floor; the row held a NaN.
    No temporaries of size V.
    """
    floor = torch.finfo(x_CV.dtype).min
    nan_C = x_CV.amax(-1).isnan()
    m_C1 = x_CV.nan_to_num_(nan=floor, neginf=floor, posinf=math.inf).amax(-1, keepdim=True)
    x_CV.sub_(m_C1)
    z_C1 = torch.exp(x_CV, out=p_CV).sum(-1, keepdim=True)
    if normalize_p:
        p_CV.div_(z_C1)
    x_CV.sub_(z_C1.log_())
    return m_C1.squeeze(-1) > floor, nan_C


def _clipped_sum(ell_CV: torch.Tensor, clip: Optional[float]) -> torch.Tensor:
    return (ell_CV if clip is None else ell_CV.clamp_max(clip)).sum(-1)


def _rkl(lpS, pS, lpT, clip, need_grad):
    """``ℓ = S(log S − log T)``; gradient ``u − S·Σu`` with ``u = c·(ℓ + S)``."""
    ell = torch.sub(lpS, lpT, out=lpT).mul_(pS)
    value = _clipped_sum(ell, clip)
    if not need_grad:
        return value, None
    if clip is None:
        return value, ell.addcmul_(pS, value[:, None], value=-1.0)
    over = ell > clip
    u = ell.add_(pS).masked_fill_(over, 0.0)
    return value, u.addcmul_(pS, u.sum(-1, keepdim=True), value=-1.0)


def _fkl(lpS, pS, lpT, pT, clip, need_grad):
    """``ℓ = T(log T − log S)``; gradient ``S·Σ(c·T) − c·T``."""
    ell = lpT.sub_(lpS).mul_(pT)
    value = _clipped_sum(ell, clip)
    if not need_grad:
        return value, None
    if clip is not None:
        pT.masked_fill_(ell > clip, 0.0)
    return value, pS.mul_(pT.sum(-1, keepdim=True)).sub_(pT)


def _jsd(lpS, lpT, a, b, beta, clip, need_grad):
    """``ℓ = β·T(log T − log M) + (1−β)·S(log S − log M)``; ``u = c·(1−β)·S(log S − log M)``

    with ``log M = logaddexp(log T + log β, log S + log(1−β))``; ``a``, ``b`` are scratch.
    """
    torch.add(lpT, math.log(beta), out=a)
    torch.logaddexp(a, torch.add(lpS, math.log1p(-beta), out=b), out=a)  # a = log M
    torch.exp(lpT, out=b)  # b = T
    ell = lpT.sub_(a).mul_(b).mul_(beta)
    torch.exp(lpS, out=b)  # b = S
    u = torch.mul(b, lpS.sub_(a), out=a).mul_(1.0 - beta)
    ell.add_(u)
    value = _clipped_sum(ell, clip)
    if not need_grad:
        return value, None
    if clip is not None:
        u.masked_fill_(ell > clip, 0.0)
    return value, u.addcmul_(b, u.sum(-1, keepdim=True), value=-1.0)


def _base_kind(spec: _Spec) -> str:
    """``"rkl"``/``"fkl"`` for the JSD endpoints (β = 1 / 0), else ``spec.kind``."""
    if spec.kind == "jsd" and spec.beta in (0.0, 1.0):
        return "fkl" if spec.beta == 0.0 else "rkl"
    return spec.kind


def _n_buffers(spec: _Spec) -> int:
    """``[C, V]`` buffers a chunk needs: rkl 3, fkl/jsd 4, the autograd path 2."""
    if spec.support is not None:
        return 2
    return 3 if _base_kind(spec) == "rkl" else 4


def _floor_teacher_(t_CV: torch.Tensor, scratch_CV: torch.Tensor, floor: float) -> torch.Tensor:
    """In place: ``t ← max(log softmax(t), floor)`` (NaN logits carry no mass), as
    :func:`opd.signals.teacher_logp.floored_logp_V`; returns ``has_mass [C]``."""
    has_mass, _ = _log_softmax_(t_CV, scratch_CV, normalize_p=False)
    t_CV.clamp_min_(floor)
    return has_mass


def _closed_form(s, t, scratch, spec: _Spec, scale_C):
    """Values ``[C]`` and ``scale·∂D/∂z`` ``[C, V]`` (or None) from raw logits, in place."""
    a, b = scratch[0], scratch[-1]  # rkl has one scratch buffer: T's p is not needed
    floored = None if spec.teacher_floor is None else _floor_teacher_(t, b, spec.teacher_floor)
    if spec.temperature != 1.0:
        s.div_(spec.temperature), t.div_(spec.temperature)
    kind, need_grad, clip = _base_kind(spec), scale_C is not None, spec.entry_clip
    ok, nan = _log_softmax_(t, b, normalize_p=kind == "fkl")
    if floored is not None:
        ok &= floored
    ok_s, nan_s = _log_softmax_(s, a, normalize_p=kind != "jsd")
    nan |= nan_s
    ok &= ok_s & ~nan
    if kind == "rkl":
        value, grad = _rkl(s, a, t, clip, need_grad)
    elif kind == "fkl":
        value, grad = _fkl(s, a, t, b, clip, need_grad)
    else:
        value, grad = _jsd(s, t, a, b, spec.beta, clip, need_grad)
    if grad is not None:
        grad.mul_((scale_C * ok / spec.temperature)[:, None])
    return value.masked_fill_(~ok, 0.0).masked_fill_(nan, math.nan), grad


def _with_autograd(s, t, spec: _Spec, scale_C):
    """Same contract as ``_closed_form``, via ``divergence`` and autograd on the chunk."""
    if spec.teacher_floor is not None:
        t = _floored_logp(t, spec.teacher_floor)
    with torch.enable_grad():
        x = s.detach().requires_grad_(scale_C is not None)
        value = divergence(
            x, t, spec.kind, beta=spec.beta, temperature=spec.temperature,
            support=spec.support, k=spec.k, renormalize=spec.renormalize,
            entry_clip=spec.entry_clip,
        )  # fmt: skip
        if scale_C is None:
            return value.detach(), None
        (grad,) = torch.autograd.grad(value, x, grad_outputs=scale_C.to(value.dtype))
    return value.detach(), grad


def _floored_logp(t_CV: torch.Tensor, floor: float) -> torch.Tensor:
    """``max(log softmax(t), floor)``, rows without mass all ``-inf`` (``floored_logp_V``)."""
    x = torch.nan_to_num(t_CV, nan=float("-inf"), posinf=torch.finfo(t_CV.dtype).max, neginf=float("-inf"))
    has_mass = (x > float("-inf")).any(-1, keepdim=True)
    return torch.where(has_mass, x.log_softmax(-1).clamp_min(floor), float("-inf"))


# ---------------------------------------------------------------- the sweep


def _accumulate(grad_CV, h_CH, w_VH, grads, lo, hi):
    """:func:`add_chunk_grads` into rows ``lo:hi`` of ``g_h`` (``W`` in the hidden's dtype)."""
    g_h, g_w, g_b = grads
    add_chunk_grads(grad_CV, h_CH, w_VH, None if g_h is None else g_h[lo:hi], g_w, g_b)


def _sweep(hidden, weight, bias, teacher: TeacherDist, spec: _Spec, scale_N, need):
    """Values ``[N]`` and, where ``need``, ``(g_hidden, g_weight, g_bias)`` of ``Σ scale·D``:
    ``g_hidden`` in the hidden's dtype, the others float32 (float64) accumulators.

    The head is cast to the hidden's dtype once (bf16 autocast over a float32 master weight:
    the matmuls in bf16, the softmax math and the accumulators in float32)."""
    (n, _), vocab, dtype = hidden.shape, weight.shape[0], compute_dtype(hidden, weight)
    w_mm, b_mm = head_in_dtype(weight, bias, hidden.dtype)
    closed = spec.support is None
    # the autograd path holds ~8 [C, V] temporaries of divergence(), against 3-4 buffers here
    c = max(1, min(spec.chunk_size if closed else spec.chunk_size // 4, n))
    compiled = closed and spec.kernel == "compiled"
    bufs = [] if compiled else [hidden.new_empty(c, vocab, dtype=dtype) for _ in range(_n_buffers(spec))]
    values = hidden.new_empty(n, dtype=dtype)
    grads = (
        hidden.new_empty(hidden.shape) if need[0] else None,
        weight.new_zeros(weight.shape, dtype=dtype) if need[1] else None,
        weight.new_zeros(vocab, dtype=dtype) if need[2] else None,
    )
    for lo in range(0, n, c):
        hi = min(lo + c, n)
        scale_C = None if scale_N is None else scale_N[lo:hi].to(dtype)
        if compiled:
            grad_dtype = w_mm.dtype if grads[2] is None else dtype  # a bias sums G in float32
            s_CV = torch.nn.functional.linear(hidden[lo:hi], w_mm, b_mm)
            values[lo:hi], grad = compiled_closed_form(
                s_CV, teacher.raw_logits(lo, hi), scale_C, _base_kind(spec), spec.beta, spec.temperature,
                spec.entry_clip, spec.teacher_floor, grad_dtype,
            )  # fmt: skip
        else:
            values[lo:hi], grad = _eager_chunk(hidden[lo:hi], w_mm, b_mm, teacher, lo, bufs, spec, scale_C)
        if grad is not None:
            _accumulate(grad, hidden[lo:hi], w_mm, grads, lo, hi)
    return values, grads


def _eager_chunk(h_CH, w_mm, b_mm, teacher: TeacherDist, lo: int, bufs, spec: _Spec, scale_C):
    """One chunk's values and ``scale·∂D/∂z`` in the ``[C, V]`` buffers ``bufs`` (in place)."""
    s, t, *scratch = (buf[: h_CH.shape[0]] for buf in bufs)
    logits_into(h_CH, w_mm, b_mm, s)
    teacher.logits_into(lo, lo + h_CH.shape[0], t)
    if spec.support is None:
        return _closed_form(s, t, scratch, spec, scale_C)
    return _with_autograd(s, t, spec, scale_C)


def _dtypes(*inputs) -> list:
    return [None if x is None else x.dtype for x in inputs]


def _in_dtypes(grads, dtypes, scale=None):
    """Each gradient scaled by ``scale`` (a scalar tensor, or None), in its input's dtype
    (a float32 master weight gets a float32 gradient, whatever the hidden's dtype)."""
    out = []
    for g, dtype in zip(grads, dtypes):
        if g is not None and scale is not None and not bool(scale == 1):
            g = g * scale.to(g.dtype)
        out.append(None if g is None or dtype is None else g.to(dtype))
    return out


class _FusedLoss(torch.autograd.Function):
    """``Σ_n w_n D_n`` with all gradients made in the forward (no recompute)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, weights_N, teacher, spec, grad_enabled):
        need = [n and grad_enabled for n in ctx.needs_input_grad]
        scale_N = weights_N if any(need[:3]) else None
        values, grads = _sweep(hidden, weight, bias, teacher, spec, scale_N, need)
        ctx.save_for_backward(*grads, values if need[3] else None)
        ctx.dtypes = _dtypes(hidden, weight, bias, weights_N)
        ctx.mark_non_differentiable(values)
        kept_N = weights_N != 0  # a 0 weight is a masked position: its value (even NaN) is selected away
        return torch.where(kept_N, weights_N.to(values.dtype) * values, 0.0).sum(), values

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, _g_values):
        return (*_in_dtypes(ctx.saved_tensors, ctx.dtypes, g_loss), None, None, None)


class _RecomputedValues(torch.autograd.Function):
    """``D_N``; backward recomputes each chunk with the upstream ``g_N``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, spec):
        values, _ = _sweep(hidden, weight, bias, teacher, spec, None, (False, False, False))
        ctx.save_for_backward(hidden, weight, bias)
        ctx.teacher, ctx.spec = teacher, spec  # constants (detached), not inputs
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, g_N):
        inputs = ctx.saved_tensors
        _, grads = _sweep(*inputs, ctx.teacher, ctx.spec, g_N, ctx.needs_input_grad[:3])
        return (*_in_dtypes(grads, _dtypes(*inputs)), None, None)


class _ValuesWithExpectedGrad(torch.autograd.Function):
    """``D_N`` whose gradients are made during the forward for an upstream gradient
    proportional to ``expected_N`` (``g_N = c·expected_N``, what a masked token mean gives):
    backward checks that ``g_N`` has that shape and scales them by ``c`` (no recompute);
    any other ``g_N`` is handled by recomputing each chunk, as :class:`_RecomputedValues`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, expected_N, teacher, spec):
        need = ctx.needs_input_grad[:3]
        values, grads = _sweep(hidden, weight, bias, teacher, spec, expected_N.to(hidden.dtype), need)
        ctx.save_for_backward(hidden, weight, bias, expected_N, *grads)
        ctx.teacher, ctx.spec = teacher, spec
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, g_N):
        hidden, weight, bias, expected_N, *grads = ctx.saved_tensors
        inputs = (hidden, weight, bias)
        kept = expected_N != 0
        c = g_N[kept][:1] if bool(kept.any()) else g_N.new_zeros(1)
        if torch.equal(g_N, torch.where(kept, c.to(g_N.dtype) * expected_N.to(g_N.dtype), 0.0)):
            out = _in_dtypes(grads, _dtypes(*inputs), c.squeeze())
        else:
            _, fresh = _sweep(*inputs, ctx.teacher, ctx.spec, g_N, ctx.needs_input_grad[:3])
            out = _in_dtypes(fresh, _dtypes(*inputs))
        return (*out, None, None, None)


# ---------------------------------------------------------------- public API


def _split_teacher(teacher: Teacher, n: int, vocab: int) -> TeacherDist:
    """The teacher as a flat :class:`TeacherDist` ``[N, ·]``, validated against the student."""
    dist = TeacherDist.of(teacher)
    if dist.positions != n or dist.vocab != vocab:
        what = "logits" if dist.logits is not None else f"hidden {tuple(dist.hidden.shape)} / weight"
        raise ValueError(
            f"teacher {what} {tuple((dist.logits if dist.logits is not None else dist.weight_VH).shape)} do not fit "
            f"N={n}, V={vocab} (mismatched vocabularies are an error)"
        )
    return dist.flat()


def _prepare(hidden, weight, bias, teacher, spec: _Spec):
    """Validate; flatten hidden to ``[N, H]``; split the teacher; fill the chunk size."""
    check_args(spec.kind, spec.beta, spec.temperature, spec.renormalize, spec.entry_clip)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(
            f"hidden [..., H] and lm_head_weight [V, H] must be floating and agree in H, got "
            f"{tuple(hidden.shape)} {hidden.dtype} and {tuple(weight.shape)} {weight.dtype}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    check_support(spec.support, spec.k, weight.shape[0])
    chunk = default_chunk_size(weight.shape[0], weight.device) if spec.chunk_size is None else spec.chunk_size
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {spec.chunk_size}")
    h_NH = hidden.reshape(-1, hidden.shape[-1])
    teacher = _split_teacher(teacher, h_NH.shape[0], weight.shape[0])
    return h_NH, teacher, replace(spec, chunk_size=int(chunk), kernel=kernel_choice(spec.kernel, weight.device))


def chunked_divergence(
    hidden_NH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    teacher: Teacher,
    kind: str,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    bias_V: torch.Tensor | None = None,
    entry_clip: float | None = None,
    support: str | None = None,
    k: int | None = None,
    renormalize: str = "both",
    teacher_floor: float | None = None,
    expected_grad: torch.Tensor | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """Per-token divergence ``D_n`` of the student ``z = h W^T + b`` vs the teacher -> ``[N]``.

    Equals ``divergence(hidden @ W.T + b, teacher_logits, kind, ...)`` (same keyword
    arguments and meaning; see :func:`opd.losses.divergence.divergence`) without ever
    holding ``[N, V]``. ``hidden_NH`` may have leading dims ``[..., H]``; the result then
    has shape ``[...]``. ``teacher`` is the teacher's logits ``[..., V]`` or
    ``(hidden, weight[, bias])`` of its LM head (made chunk by chunk too); it gets no
    gradient. ``chunk_size`` tokens per chunk (default ``default_chunk_size(V, device)``).

    Differentiable w.r.t. ``hidden_NH``, ``lm_head_weight_VH`` and ``bias_V`` for any
    upstream gradient ``g_N`` (mask/weights applied by the caller afterwards); backward
    recomputes each chunk's logits. Cheapest for logging under ``torch.no_grad()``. For
    training, :func:`chunked_divergence_loss` saves that recompute, and so does
    ``expected_grad`` (``[...]``, e.g. the loss mask): the gradients for an upstream gradient
    ``c·expected_grad`` (what the loop's masked token mean sends) are made during the
    forward and scaled by ``c`` in backward (held meanwhile: ``[N, H]``, ``[V, H]``, ``[V]``);
    an upstream gradient of another shape falls back to the recompute.
    ``teacher_floor``: the teacher's log-probs are ``max(log softmax(z_t), floor)`` before the
    divergence (as :func:`opd.signals.teacher_logp.floored_logp_V` gives them to the full
    form), applied per chunk. ``kernel``: ``"eager"`` (in-place passes) or ``"compiled"`` (each
    chunk's math through ``torch.compile``, :mod:`opd.losses.fused_chunk`; not for ``support``);
    default: the run's ``loss_kernel``, else ``$OPD_LOSS_KERNEL``, else compiled on a GPU and
    eager elsewhere (:func:`~opd.losses.fused_chunk.kernel_choice`). Hidden states in another
    dtype than the head's weight
    (bf16 autocast over float32 master weights): the matmul runs in the hidden's dtype, the
    weight's gradient comes back in its own dtype (module doc).
    Source: see the module doc. Deviations: none (values and gradients equal the
    unchunked form up to float rounding).
    """
    spec = _Spec(kind, beta, temperature, entry_clip, support, k, renormalize, chunk_size, teacher_floor, kernel)
    h_NH, teacher, spec = _prepare(hidden_NH, lm_head_weight_VH, bias_V, teacher, spec)
    if expected_grad is not None and torch.is_grad_enabled():
        values = _ValuesWithExpectedGrad.apply(h_NH, lm_head_weight_VH, bias_V, expected_grad.reshape(-1), teacher, spec)
    else:
        values = _RecomputedValues.apply(h_NH, lm_head_weight_VH, bias_V, teacher, spec)
    return values.reshape(hidden_NH.shape[:-1])


def chunked_divergence_loss(
    hidden_NH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    teacher: Teacher,
    kind: str,
    weights_N: torch.Tensor,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    bias_V: torch.Tensor | None = None,
    entry_clip: float | None = None,
    support: str | None = None,
    k: int | None = None,
    renormalize: str = "both",
    teacher_floor: float | None = None,
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_n w_n D_n, D_N)``: the weighted divergence sum and the detached per-token values.

    ``D_n`` as :func:`chunked_divergence` (same arguments). ``weights_N [...]`` (shaped
    like ``hidden_NH[..., 0]``) carries the mask and the normalizer, e.g.
    ``mask / num_kept_tokens`` for METHODS rule 4's token mean. The gradients w.r.t.
    hidden, weight and bias are computed during this forward, chunk by chunk (the same
    3 matmuls as a naive forward+backward, no recompute), and stored (``[N, H]``,
    ``[V, H]``, ``[V]``); backward scales them by the upstream scalar. ``weights_N`` gets
    the gradient ``D_N`` if it requires grad. Backward runs once (no double backward).
    A 0 weight masks its token: the token's value is selected away (``torch.where``), so a
    NaN there (e.g. a NaN teacher logit on padding) reaches neither the loss nor a gradient;
    a NaN at a weighted token makes the loss NaN, with zero gradient from that token.
    ``kernel`` as :func:`chunked_divergence`.
    Source: Liger-Kernel fused linear JSD (third-party code), generalized.
    """
    spec = _Spec(kind, beta, temperature, entry_clip, support, k, renormalize, chunk_size, teacher_floor, kernel)
    h_NH, teacher, spec = _prepare(hidden_NH, lm_head_weight_VH, bias_V, teacher, spec)
    w_N = weights_N.reshape(-1)
    if w_N.shape != h_NH.shape[:1]:
        raise ValueError(f"weights must match hidden's leading shape, got {tuple(weights_N.shape)}")
    args = (h_NH, lm_head_weight_VH, bias_V, w_N, teacher, spec, torch.is_grad_enabled())
    loss, values = _FusedLoss.apply(*args)
    return loss, values.reshape(hidden_NH.shape[:-1])
