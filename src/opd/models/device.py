"""Where models run and in what precision.

Placement rule (every stage follows it): a model is moved to its device once, at set-up;
batches are built on the host (:func:`opd.batch.make_batch`) and moved once to the device of
the model that reads them (:meth:`opd.batch.SeqBatch.to`); every other tensor is created on
the device of the tensor or model it is combined with (``device=x.device``, ``x.new_*``,
``*_like``), and host bookkeeping says ``device="cpu"`` explicitly.
``tests/test_devices.py`` runs every method's training step with the default device set to
``meta``, so a factory call that names no device fails there.

Precision (``dtype``): ``float32``; or ``bfloat16``: the teacher and the frozen reference
hold bf16 weights, and the student keeps float32 master weights and AdamW states while its
forward passes run under ``torch.autocast(dtype=bfloat16)`` (:func:`student_precision`).
Autocast was chosen over bf16 parameters with float32 copies: the optimizer, gradient
clipping and checkpoints see plain float32 parameters with no copy to keep in sync, and it
is what FSDP2's mixed-precision policy does per shard. Log-probabilities, entropies and
divergences are computed in float32 from bf16 logits (the chunked losses upcast per chunk).
The sampler's direct decoder casts the weights once per rollout, not per token
(:class:`opd.models.fast_decode.FastDecoder`). ``float16`` is refused at config time.
"""

from __future__ import annotations

import os

import contextlib

import torch

from opd.errors import UserError

EXAMPLES = "auto, cpu, cuda, cuda:1 or mps"


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto``: CUDA when available, else the CPU; any other name must exist here. Under
    ``torchrun`` (``LOCAL_RANK`` set), ``auto`` and ``cuda`` are this rank's GPU."""
    if name in ("auto", "cuda") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{key}={name!r} is not a device name; use {EXAMPLES}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{key}={name} but this machine has no CUDA device (torch {torch.__version__}); "
                            f"use {key}=cpu or {key}=auto")
        if device.index is not None and device.index >= count:
            raise UserError(f"{key}={name} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key}={name} but MPS is not available here; use {key}=cpu or {key}=auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{key}={name!r}: opd runs on {EXAMPLES}")
    return device


def autocast_dtype(dtype: str) -> torch.dtype | None:
    """The student's autocast dtype for the config's ``dtype`` (None: plain float32)."""
    return torch.bfloat16 if dtype == "bfloat16" else None


def model_device(model) -> torch.device:
    """The device of a model's parameters (the CPU for a program without any)."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return torch.device("cpu") if param is None else param.device


def student_precision(model, dtype: torch.dtype | None):
    """The context the student's forward passes run in: bf16 autocast on its device, or nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=dtype)
