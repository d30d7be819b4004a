"""One chunk of the lean divergences as one pure function, for ``torch.compile`` to fuse.

:mod:`opd.losses.chunked` makes each chunk's values and closed-form gradient with about thirty
in-place passes over ``[C, V]`` float32 buffers (log-softmaxes, then the divergence's terms).
On a GPU those passes, not the matmuls, set the loss's time: at V=151,936 on an H200 the
elementwise kernels and their launches took most of the JSD's 212 ms
(docs/performance/gpu_loss_probe_h200_after.txt). :func:`closed_form` is the same math written
without in-place updates, taking the logits in the matmul's dtype (bf16 under autocast), so
that a compiler can make it a few kernels, each reading ``[C, V]`` once; the gradient comes out
in the dtype the head's matmuls take.

``kernel="compiled"`` in :func:`opd.losses.chunked.chunked_divergence` (or the environment's
``OPD_LOSS_KERNEL=compiled``; the default on a GPU) runs :func:`compiled_closed_form`;
``"eager"`` (the default elsewhere) the in-place passes. Both give the same values and gradients up to float rounding (tests/test_fused_chunk.py
on the CPU, tests/test_cuda.py on a GPU). The closed forms, with ``x = z/τ``, ``S = softmax x``,
``T`` the teacher's, ``c_v = 1[ℓ_v ≤ clip]``, ``u_v = c_v S_v ∂ℓ_v/∂S_v``, ``∂D/∂x = u − S·Σu``:

- rkl: ``ℓ = S(log S − log T)``, ``u = c·(ℓ + S)``  (no clip: ``∂D/∂x = ℓ − S·D``)
- fkl: ``ℓ = T(log T − log S)``, ``u = −c·T``       (no clip: ``∂D/∂x = S − T``)
- jsd: ``ℓ = β·T(log T − log M) + (1−β)·S(log S − log M)``, ``u = c·(1−β)·S(log S − log M)``,
  ``log M = logaddexp(log T + log β, log S + log(1−β))``.

Numerics as the eager passes: a NaN logit in a row makes its value NaN and its gradient 0; a
row whose logits are all ``-inf`` (no mass) has value 0 and gradient 0.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Optional

import torch

KERNELS = ("eager", "compiled")
_RUN_KERNEL: dict = {"kernel": None}  # set by default_kernel (a run's loss_kernel)


@contextlib.contextmanager
def default_kernel(kernel: str):
    """Inside, every lean loss that names no kernel uses ``kernel`` (a run's ``loss_kernel``;
    ``"auto"``: as outside). ``opd train`` wraps each step in it."""
    if kernel != "auto":
        kernel_choice(kernel)
    previous, _RUN_KERNEL["kernel"] = _RUN_KERNEL["kernel"], None if kernel == "auto" else kernel
    try:
        yield
    finally:
        _RUN_KERNEL["kernel"] = previous


def kernel_choice(kernel: Optional[str], device: torch.device | str | None = None) -> str:
    """``kernel``, else the run's (:func:`default_kernel`), else ``$OPD_LOSS_KERNEL``, else
    ``"compiled"`` on a GPU and ``"eager"`` elsewhere (on the CPU a compile costs seconds per
    variant and gains little); an unknown name is an error."""
    default = "compiled" if device is not None and torch.device(device).type == "cuda" else "eager"
    choice = kernel or _RUN_KERNEL["kernel"] or os.environ.get("OPD_LOSS_KERNEL") or default
    if choice not in KERNELS:
        raise ValueError(f"loss kernel must be one of {KERNELS}, got {choice!r} (argument kernel= or OPD_LOSS_KERNEL)")
    return choice


def _log_softmax(x_CV: torch.Tensor):
    """``(log softmax(x), has_mass [C], nan [C])`` with NaN and ``-inf`` logits read as the
    dtype's lowest finite value (as the eager ``_log_softmax_``)."""
    low = torch.finfo(x_CV.dtype).min
    nan_C = x_CV.isnan().any(-1)
    x_CV = torch.nan_to_num(x_CV, nan=low, neginf=low, posinf=math.inf)
    m_C1 = x_CV.amax(-1, keepdim=True)
    shifted = x_CV - m_C1
    lp_CV = shifted - shifted.exp().sum(-1, keepdim=True).log()
    return lp_CV, m_C1.squeeze(-1) > low, nan_C


def _clipped_sum(ell_CV, clip):
    return (ell_CV if clip is None else ell_CV.clamp_max(clip)).sum(-1)


def _value_and_u(kind, lpS, lpT, beta, clip):
    """``(D [C], u [C, V] or None, S, extra)``. For rkl and fkl without a clip ``u`` is None
    and the caller uses the shortcut forms (``∂D/∂x`` of the module doc), with ``extra`` =
    ``ℓ`` (rkl) or ``T`` (fkl); jsd always gives ``u``."""
    S = lpS.exp()
    if kind == "rkl":
        ell = S * (lpS - lpT)
        u = None if clip is None else torch.where(ell > clip, 0.0, ell + S)
        return _clipped_sum(ell, clip), u, S, ell
    if kind == "fkl":
        T = lpT.exp()
        ell = T * (lpT - lpS)
        u = None if clip is None else -torch.where(ell > clip, 0.0, T)
        return _clipped_sum(ell, clip), u, S, T
    log_m = torch.logaddexp(lpT + math.log(beta), lpS + math.log1p(-beta))
    u = (1.0 - beta) * S * (lpS - log_m)
    ell = beta * lpT.exp() * (lpT - log_m) + u
    if clip is not None:
        u = torch.where(ell > clip, 0.0, u)
    return _clipped_sum(ell, clip), u, S, None


def closed_form(s_CV, t_CV, scale_C, kind: str, beta: float, temperature: float,
                clip: Optional[float], floor: Optional[float], grad_dtype: torch.dtype):  # fmt: skip
    """``(D [C], scale·∂D/∂z [C, V] in grad_dtype or None)`` from raw student and teacher logits
    (any float dtype; the math in float32, float64 kept). ``kind`` is rkl, fkl or jsd with
    ``0 < β < 1`` (the endpoints are rkl and fkl); ``floor``: the teacher's log-probs are
    ``max(log softmax(t), floor)`` first; ``scale_C`` None: values only."""
    f = torch.float64 if torch.float64 in (s_CV.dtype, t_CV.dtype) else torch.float32
    s, t = s_CV.to(f), t_CV.to(f)
    ok_C = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    if floor is not None:
        t, ok_C, _ = _log_softmax(t)
        t = t.clamp_min(floor)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    lpT, ok_t, nan_C = _log_softmax(t)
    lpS, ok_s, nan_s = _log_softmax(s)
    nan_C = nan_C | nan_s
    ok_C = ok_C & ok_t & ok_s & ~nan_C
    raw_C, u, S, extra = _value_and_u(kind, lpS, lpT, beta, clip)
    value_C = torch.where(nan_C, math.nan, torch.where(ok_C, raw_C, 0.0))
    if scale_C is None:
        return value_C, None
    if u is not None:
        grad = u - S * u.sum(-1, keepdim=True)
    elif kind == "rkl":
        grad = extra - S * raw_C[:, None]
    else:
        grad = S - extra
    grad = torch.where(ok_C[:, None], grad * (scale_C.to(f) / temperature)[:, None], 0.0)
    return value_C, grad.to(grad_dtype)


_COMPILED: dict = {}
RECOMPILE_LIMIT = 64


def compiled_closed_form(*args, **kwargs):
    """:func:`closed_form` through ``torch.compile`` (made once per process). The chunk's row
    count is dynamic, so chunks of other sizes (a ragged last chunk, another chunk size) share
    one compiled graph per divergence and setting (a one-row chunk gets its own); up to
    ``RECOMPILE_LIMIT`` graphs (dynamo's default of 8 is reached by a process that trains
    several methods). Where the compiler fails (no backend, or that limit), it warns once and
    runs :func:`closed_form` uncompiled: the same numbers, slower."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(closed_form, fullgraph=True)
    s_CV, t_CV, scale_C = args[:3]
    if s_CV.shape[0] > 1:
        for x in (s_CV, t_CV, scale_C):
            if x is not None:
                torch._dynamo.mark_dynamic(x, 0)
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return _COMPILED["fn"](*args, **kwargs)
    except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.FailOnRecompileLimitHit) as e:
        warnings.warn(f"opd: the compiled loss kernel failed ({type(e).__name__}); running it uncompiled "
                      f"(same values, slower; OPD_LOSS_KERNEL=eager chooses the in-place kernel)", stacklevel=2)  # fmt: skip
        _COMPILED["fn"] = closed_form
        return closed_form(*args, **kwargs)
