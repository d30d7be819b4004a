"""One chunk's share of the LM head's gradients, for the memory-lean losses
(:mod:`opd.losses.chunked`, :mod:`opd.losses.selective`): ``g_h = G W``, ``g_W += G^T h``,
``g_b += Σ G`` from the chunk's ``G = ∂L/∂z`` ``[C, V]``."""

from __future__ import annotations

import torch


def add_chunk_grads(grad_CV, h_CH, w_VH, g_h_CH, g_w_VH, g_b_V) -> None:
    """One chunk's share of the gradients from ``G = ∂L/∂z`` ``[C, V]``: ``g_h ← G W``
    (written), ``g_W += G^T h``, ``g_b += Σ_c G`` (accumulated, float32+); each None is skipped.
    ``G`` may come in float32 (the eager passes) or already in the head's dtype (the compiled
    chunk, :mod:`opd.losses.fused_chunk`).

    ``G`` enters the matmuls in the head's dtype ``w_VH`` (bf16 under autocast). On a GPU the
    ``G^T h`` product of 16-bit inputs is made in float32 by the tensor cores (``out_dtype``),
    not by casting ``h`` up to a float32 matmul (which took a third of the JSD's time at
    V=151,936 on an H200); elsewhere, or on a torch without ``out_dtype``, ``h`` is cast up."""
    g_lp = grad_CV.to(w_VH.dtype)
    if g_h_CH is not None:
        torch.mm(g_lp, w_VH, out=g_h_CH)
    if g_w_VH is not None and not _add_mixed_product(g_w_VH, g_lp.t(), h_CH):
        g_w_VH.addmm_(grad_CV.t().to(g_w_VH.dtype), h_CH.to(g_w_VH.dtype))
    if g_b_V is not None:
        g_b_V.add_(grad_CV.sum(0, dtype=g_b_V.dtype))


_MIXED_MM = {"ok": True}  # False once this torch has refused out_dtype


def _add_mixed_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """``acc += a @ b`` for 16-bit ``a``, ``b`` and a float32 ``acc`` on CUDA, the product in
    float32; False (nothing done) where that does not apply."""
    if not (_MIXED_MM["ok"] and acc.is_cuda and acc.dtype == torch.float32 and a.dtype == b.dtype
            and a.dtype in (torch.bfloat16, torch.float16)):  # fmt: skip
        return False
    try:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        _MIXED_MM["ok"] = False
        return False
    return True
