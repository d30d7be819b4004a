"""Log-probabilities of given tokens straight from hidden states and the LM head.

For tokens ``y_n`` with hidden states ``h_n`` and the LM head ``z_n = h_n W^T + b``:

    ℓ_n = log softmax(z_n)[y_n] = z_n[y_n] − lse_n,   lse_n = logsumexp_v z_n[v]

made ``chunk_size`` tokens at a time, so that ``[N, V]`` is never held: peak extra memory
is one ``[chunk, V]`` buffer (two with the side statistics below), reused across chunks.
The result is differentiable for any upstream gradient ``g_N``. Backward recomputes each
chunk's logits from the saved ``h`` and ``lse``, with ``p_n = exp(z_n − lse_n)``:

    ∂L/∂z_n = g_n (e_{y_n} − p_n),  ∂L/∂h_n = (∂L/∂z_n) W,
    ∂L/∂W = Σ_n (∂L/∂z_n)^T h_n,    ∂L/∂b = Σ_n ∂L/∂z_n

so forward+backward costs 4 LM-head matmuls per chunk instead of the naive 3, and never
holds ``log_softmax(z)``. Side statistics from the same forward sweep, detached (no extra
matmul): the entropy ``H_n = −Σ_v p_n(v) log p_n(v)`` and the ids of the ``k`` largest
logits (:func:`token_logp_and_stats`).

Numerics as the full-logits path (``log_softmax(lm_head(h).float())``): the matmul in the
hidden states' dtype (the head cast once per call: bf16 autocast over a float32 master
weight), the softmax math in float32 (float64 for float64 inputs); the gradients of W and b
accumulate in float32 (float64) and come back in their own dtype, the hidden's in its dtype.
Logits are floored at the dtype's lowest finite value (as :func:`opd.losses.entropy`); an LM
head's are finite anyway.
Source: the fused linear cross-entropy idea (Liger-Kernel, third-party code), here for an
arbitrary upstream gradient rather than a fixed mean. Deviations: none (values and
gradients equal the unchunked form up to float rounding).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from opd.losses.chunked import default_chunk_size
from opd.losses.head_grads import add_chunk_grads
from opd.losses.divergence import compute_dtype
from opd.losses.teacher_dist import head_in_dtype, logits_into


def _normalize_(z_CV: torch.Tensor, p_CV: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(lse [C], H [C] or None)``. Without ``p``: ``z ← exp(z − max)`` in place. With
    ``p`` (a second buffer): ``z ← log softmax z``, ``p ← softmax z``, and the entropy."""
    z_CV.clamp_min_(torch.finfo(z_CV.dtype).min)
    m_C1 = z_CV.amax(-1, keepdim=True)
    z_CV.sub_(m_C1)
    if p_CV is None:
        return z_CV.exp_().sum(-1).log_().add_(m_C1.squeeze(-1)), None
    s_C1 = torch.exp(z_CV, out=p_CV).sum(-1, keepdim=True)
    z_CV.sub_(s_C1.log())
    entropy_C = -p_CV.div_(s_C1).mul_(z_CV).sum(-1)
    return s_C1.log_().add_(m_C1).squeeze(-1), entropy_C


def _forward(h_NH, weight_VH, bias_V, ids_N, chunk: int, dtype, k: int):
    """``(ℓ_N, lse_N, H_N, topk_ids_Nk)`` chunk by chunk (``H``, ids empty when ``k < 0``)."""
    n, V = h_NH.shape[0], weight_VH.shape[0]
    weight_VH, bias_V = head_in_dtype(weight_VH, bias_V, h_NH.dtype)
    c = max(1, min(chunk, n))
    z_buf = h_NH.new_empty(c, V, dtype=dtype)
    p_buf = h_NH.new_empty(c, V, dtype=dtype) if k >= 0 else None
    logp_N, lse_N = h_NH.new_empty(n, dtype=dtype), h_NH.new_empty(n, dtype=dtype)
    ent_N = h_NH.new_empty(n if k >= 0 else 0, dtype=dtype)
    top_Nk = torch.empty(n, max(k, 0), dtype=torch.long, device=h_NH.device)
    for lo in range(0, n, c):
        hi = min(lo + c, n)
        z_CV = logits_into(h_NH[lo:hi], weight_VH, bias_V, z_buf[: hi - lo])
        z_y_C = z_CV.gather(-1, ids_N[lo:hi, None]).squeeze(-1)
        if k > 0:
            top_Nk[lo:hi] = z_CV.topk(k, dim=-1).indices
        lse_C, ent_C = _normalize_(z_CV, None if p_buf is None else p_buf[: hi - lo])
        lse_N[lo:hi], logp_N[lo:hi] = lse_C, z_y_C - lse_C
        if ent_C is not None:
            ent_N[lo:hi] = ent_C
    return logp_N, lse_N, ent_N, top_Nk


def _backward(h_NH, weight_VH, bias_V, ids_N, lse_N, g_N, chunk: int, need):
    """``(g_h, g_W, g_b)`` of ``Σ_n g_n ℓ_n`` (None where not ``need``)."""
    (n, _), V, dtype = h_NH.shape, weight_VH.shape[0], lse_N.dtype
    c = max(1, min(chunk, n))
    z_buf = h_NH.new_empty(c, V, dtype=dtype)
    g_h = h_NH.new_empty(h_NH.shape) if need[0] else None
    g_w = weight_VH.new_zeros(weight_VH.shape, dtype=dtype) if need[1] else None
    g_b = weight_VH.new_zeros(V, dtype=dtype) if need[2] else None
    weight_VH, bias_V = head_in_dtype(weight_VH, bias_V, h_NH.dtype)
    g_N = g_N.to(dtype)
    for lo in range(0, n, c):
        hi = min(lo + c, n)
        g_C = g_N[lo:hi]
        z_CV = logits_into(h_NH[lo:hi], weight_VH, bias_V, z_buf[: hi - lo])
        z_CV.clamp_min_(torch.finfo(dtype).min)
        grad_CV = z_CV.sub_(lse_N[lo:hi, None]).exp_().mul_(-g_C[:, None])  # −g p
        grad_CV.scatter_add_(-1, ids_N[lo:hi, None], g_C[:, None])  # + g e_y
        add_chunk_grads(grad_CV, h_NH[lo:hi], weight_VH, None if g_h is None else g_h[lo:hi], g_w, g_b)
    return g_h, g_w, g_b


class _TokenLogp(torch.autograd.Function):
    """``(ℓ_N, H_N, topk_ids_Nk)``; backward (of ``ℓ`` only) recomputes each chunk."""

    @staticmethod
    def forward(ctx, h_NH, weight_VH, bias_V, ids_N, chunk, k):
        dtype = compute_dtype(h_NH, weight_VH)
        logp_N, lse_N, ent_N, top_Nk = _forward(h_NH, weight_VH, bias_V, ids_N, chunk, dtype, k)
        ctx.save_for_backward(h_NH, weight_VH, bias_V, ids_N, lse_N)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(ent_N, top_Nk)
        return logp_N, ent_N, top_Nk

    @staticmethod
    @once_differentiable
    def backward(ctx, g_N, _g_ent, _g_top):
        h_NH, weight_VH, bias_V, ids_N, lse_N = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        grads = _backward(h_NH, weight_VH, bias_V, ids_N, lse_N, g_N, ctx.chunk, need)
        inputs = (h_NH, weight_VH, bias_V)
        grads = [None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs)]
        return (*grads, None, None, None)


def _apply(hidden_NH, weight_VH, ids_N, bias_V, chunk_size, k):
    V, H = weight_VH.shape
    if hidden_NH.shape[-1] != H or hidden_NH.shape[:-1] != ids_N.shape:
        raise ValueError(
            f"hidden [..., H={H}] and ids [...] must share leading dims, got "
            f"{tuple(hidden_NH.shape)} and {tuple(ids_N.shape)}"
        )
    if bias_V is not None and bias_V.shape != (V,):
        raise ValueError(f"bias must be [V={V}], got {tuple(bias_V.shape)}")
    chunk = default_chunk_size(V, weight_VH.device) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h_NH = hidden_NH.reshape(-1, H)
    logp_N, ent_N, top_Nk = _TokenLogp.apply(h_NH, weight_VH, bias_V, ids_N.reshape(-1).long(), chunk, k)
    lead = tuple(ids_N.shape)
    return logp_N.reshape(lead), ent_N, top_Nk


def token_logp(
    hidden_NH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    ids_N: torch.Tensor,
    *,
    bias_V: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``log softmax(h W^T + b)[y]`` per token (module doc), without holding ``[N, V]``.

    ``hidden_NH [..., H]`` and ``ids_N [...]`` (long, in ``[0, V)``) share leading dims;
    the result has them too, float32 (float64 for float64 inputs). Differentiable w.r.t.
    ``hidden_NH``, ``lm_head_weight_VH`` and ``bias_V``; backward recomputes the logits.
    ``chunk_size`` tokens per chunk (default ``default_chunk_size(V, device)``: about 64 MiB of
    logits, 256 MiB on a GPU).
    """
    return _apply(hidden_NH, lm_head_weight_VH, ids_N, bias_V, chunk_size, -1)[0]


def token_logp_and_stats(
    hidden_NH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    ids_N: torch.Tensor,
    *,
    topk: int,
    bias_V: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ℓ [...], H [...], topk_ids [..., k])``: :func:`token_logp` (differentiable) plus,
    from the same sweep and detached, each token's entropy ``H = −Σ_v p(v) log p(v)`` and
    the ids of its ``k = min(topk, V)`` largest logits (``torch.topk`` order and ties;
    ``topk = 0``: none). One more ``[chunk, V]`` buffer than :func:`token_logp`."""
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")
    k = min(topk, lm_head_weight_VH.shape[0])
    logp, ent_N, top_Nk = _apply(hidden_NH, lm_head_weight_VH, ids_N, bias_V, chunk_size, k)
    return logp, ent_N.reshape(logp.shape), top_Nk.reshape(*logp.shape, k)


ROWS_ELEMENTS = 2**24  # rows per chunk of logits_at_ids: [rows, K, H] stays under this many elements


class _LogitsAtIds(torch.autograd.Function):
    """``z[n, k] = h_n · W[ids[n, k]] + b[ids[n, k]]`` (backward in closed form, no ``[N, V]``)."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, ids_NK):
        N, K = ids_NK.shape
        rows = max(1, ROWS_ELEMENTS // max(1, K * hidden_NH.shape[1]))
        acc = compute_dtype(hidden_NH, weight_VH)
        out_NK = hidden_NH.new_empty(N, K, dtype=acc)
        for lo in range(0, N, rows):
            ids_CK = ids_NK[lo : lo + rows]
            w_CKH = weight_VH[ids_CK].to(hidden_NH.dtype)  # the matmul in the hidden's dtype
            z_CK = torch.einsum("ch,ckh->ck", hidden_NH[lo : lo + rows], w_CKH)
            out_NK[lo : lo + rows] = z_CK if bias_V is None else z_CK + bias_V[ids_CK].to(z_CK.dtype)
        ctx.save_for_backward(hidden_NH, weight_VH, ids_NK)
        ctx.rows, ctx.bias_dtype = rows, None if bias_V is None else bias_V.dtype
        return out_NK

    @staticmethod
    @once_differentiable
    def backward(ctx, g_NK):
        hidden_NH, weight_VH, ids_NK = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_h = torch.zeros_like(hidden_NH) if need_h else None
        acc = compute_dtype(hidden_NH, weight_VH)
        g_w = torch.zeros(weight_VH.shape, dtype=acc, device=weight_VH.device) if need_w else None
        g_b = torch.zeros(weight_VH.shape[0], dtype=acc, device=weight_VH.device) if need_b and ctx.bias_dtype else None
        H = hidden_NH.shape[1]
        for lo in range(0, ids_NK.shape[0], ctx.rows):
            ids_CK, g_CK = ids_NK[lo : lo + ctx.rows], g_NK[lo : lo + ctx.rows]
            if g_h is not None:
                w_CKH = weight_VH[ids_CK].to(hidden_NH.dtype)
                g_h[lo : lo + ctx.rows] = torch.einsum("ck,ckh->ch", g_CK.to(hidden_NH.dtype), w_CKH)
            if g_w is not None:
                outer_CKH = g_CK.to(acc)[..., None] * hidden_NH[lo : lo + ctx.rows].to(acc)[:, None, :]
                g_w.index_add_(0, ids_CK.reshape(-1), outer_CKH.reshape(-1, H))
            if g_b is not None:
                g_b.index_add_(0, ids_CK.reshape(-1), g_CK.to(acc).reshape(-1))
        g_w = None if g_w is None else g_w.to(weight_VH.dtype)
        g_b = None if g_b is None else g_b.to(ctx.bias_dtype)
        return g_h, g_w, g_b, None


def logits_at_ids(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, ids_NK: torch.Tensor, *, bias_V: torch.Tensor | None = None) -> torch.Tensor:
    """The logits ``z[n, k] = h_n · W_{ids[n, k]} + b_{ids[n, k]}`` (float32; float64 kept) of
    a few ids per position, differentiable, without ever making a position's ``V`` logits:
    the ``K`` rows of ``W`` are gathered per chunk of positions (and cast to the hidden's
    dtype), and the backward pass scatters ``g ⊗ h`` into ``W``'s gradient (``index_add``,
    float32, returned in W's dtype). Equals ``(hidden @ W.T + b).gather(-1, ids)`` up to
    float rounding."""
    return _LogitsAtIds.apply(hidden_NH, weight_VH, bias_V, ids_NK)


# ---------------------------------------------------------------- log-normalizers


def _floored_chunk(h_CH, w_VH, b_V, temperature: float, out_CV):
    """``x = max(z/τ, floor)`` (NaN → floor) in place in ``out``; returns ``(x, nan_C)``."""
    x = logits_into(h_CH, w_VH, b_V, out_CV)
    nan_C = x.amax(-1).isnan()
    if temperature != 1.0:
        x.div_(temperature)
    floor = torch.finfo(x.dtype).min
    return x.nan_to_num_(nan=floor, neginf=floor, posinf=torch.finfo(x.dtype).max), nan_C


class _LogSumExp(torch.autograd.Function):
    """``(lse_N, outside_N, nan_N)`` of the floored scaled logits (``outside``: the excluded ids
    at the floor; empty without them), one sweep; backward recomputes each chunk:
    ``∂/∂z = (g·softmax(x) + g_out·softmax(x_out))/τ`` (a position without mass gets 0)."""

    @staticmethod
    def forward(ctx, h_NH, weight_VH, bias_V, exclude_NK, temperature, chunk):
        dtype = compute_dtype(h_NH, weight_VH)
        w_mm, b_mm = head_in_dtype(weight_VH, bias_V, h_NH.dtype)
        n, floor = h_NH.shape[0], torch.finfo(dtype).min
        c = max(1, min(chunk, n))
        buf = h_NH.new_empty(c, weight_VH.shape[0], dtype=dtype)
        lse_N, nan_N = h_NH.new_empty(n, dtype=dtype), torch.zeros(n, dtype=torch.bool, device=h_NH.device)
        out_N = h_NH.new_empty(n if exclude_NK is not None else 0, dtype=dtype)
        for lo in range(0, n, c):
            hi = min(lo + c, n)
            x, nan_N[lo:hi] = _floored_chunk(h_NH[lo:hi], w_mm, b_mm, temperature, buf[: hi - lo])
            lse_N[lo:hi] = torch.logsumexp(x, -1)
            if exclude_NK is not None:
                out_N[lo:hi] = torch.logsumexp(x.scatter_(-1, exclude_NK[lo:hi], floor), -1)
        ctx.save_for_backward(h_NH, weight_VH, bias_V, exclude_NK, lse_N, out_N)
        ctx.temperature, ctx.chunk = temperature, c
        ctx.mark_non_differentiable(nan_N)
        return lse_N, out_N, nan_N

    @staticmethod
    @once_differentiable
    def backward(ctx, g_N, g_out_N, _g_nan):
        h_NH, weight_VH, bias_V, exclude_NK, lse_N, out_N = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        (n, _), V, dtype = h_NH.shape, weight_VH.shape[0], lse_N.dtype
        floor, outside = torch.finfo(dtype).min, exclude_NK is not None
        w_mm, b_mm = head_in_dtype(weight_VH, bias_V, h_NH.dtype)
        bufs = [h_NH.new_empty(ctx.chunk, V, dtype=dtype) for _ in range(1 + outside)]
        g_h = h_NH.new_empty(h_NH.shape) if need[0] else None
        g_w = weight_VH.new_zeros(weight_VH.shape, dtype=dtype) if need[1] else None
        g_b = weight_VH.new_zeros(V, dtype=dtype) if need[2] else None
        scale_N = (g_N.to(dtype) / ctx.temperature) * (lse_N > floor)  # some mass: floored entries get exp(floor − lse) = 0
        if outside:
            scale_out_N = (g_out_N.to(dtype) / ctx.temperature) * (out_N > floor)
        for lo in range(0, n, ctx.chunk):
            hi = min(lo + ctx.chunk, n)
            x, _ = _floored_chunk(h_NH[lo:hi], w_mm, b_mm, ctx.temperature, bufs[0][: hi - lo])
            if outside:
                p = torch.sub(x, lse_N[lo:hi, None], out=bufs[1][: hi - lo]).exp_().mul_(scale_N[lo:hi, None])
                x.scatter_(-1, exclude_NK[lo:hi], floor)
                grad_CV = x.sub_(out_N[lo:hi, None]).exp_().mul_(scale_out_N[lo:hi, None]).add_(p)
            else:
                grad_CV = x.sub_(lse_N[lo:hi, None]).exp_().mul_(scale_N[lo:hi, None])  # g p / τ
            add_chunk_grads(grad_CV, h_NH[lo:hi], w_mm, None if g_h is None else g_h[lo:hi], g_w, g_b)
        inputs = (h_NH, weight_VH, bias_V)
        grads = [None if g is None else g.to(t.dtype) for g, t in zip((g_h, g_w, g_b), inputs)]
        return (*grads, None, None, None)


def chunked_logsumexp(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    *,
    bias_V: torch.Tensor | None = None,
    temperature: float = 1.0,
    exclude_ids_NK: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(lse [...], outside [...] or None, nan [...])`` of the floored scaled logits
    ``x_n = max((h_n W^T + b)/τ, finfo.min)`` (NaN entries at the floor, as
    :func:`opd.losses.divergence.floored_logits`):

        lse_n = log Σ_v exp(x_n[v]),   outside_n = log Σ_{v ∉ E_n} exp(x_n[v])

    with ``E_n = exclude_ids_NK[n]`` (``outside`` is None without them; each its own max, so
    exact however small); ``nan_n``: the position's logits held a NaN (detached). One sweep
    chunk by chunk, never ``[N, V]``; differentiable w.r.t. hidden, weight and bias (backward
    recomputes each chunk: ``∂lse_n/∂z_n[v] = softmax(x_n)[v]/τ``, likewise ``outside`` off
    ``E_n``). A position without mass (every id excluded) gets the floor and zero gradient."""
    V, H = weight_VH.shape
    if hidden_NH.shape[-1] != H:
        raise ValueError(f"hidden [..., H={H}] must match the head, got {tuple(hidden_NH.shape)}")
    lead = hidden_NH.shape[:-1]
    if exclude_ids_NK is not None and exclude_ids_NK.shape[:-1] != lead:
        raise ValueError(f"exclude_ids [..., K] must share hidden's leading dims, got {tuple(exclude_ids_NK.shape)}")
    chunk = default_chunk_size(V, weight_VH.device) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ex = None if exclude_ids_NK is None else exclude_ids_NK.reshape(-1, exclude_ids_NK.shape[-1]).long()
    lse_N, out_N, nan_N = _LogSumExp.apply(hidden_NH.reshape(-1, H), weight_VH, bias_V, ex, float(temperature), chunk)
    return lse_N.reshape(lead), None if ex is None else out_N.reshape(lead), nan_N.reshape(lead)
