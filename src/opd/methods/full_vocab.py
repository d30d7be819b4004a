"""The full-vocabulary divergence of a student view against the teacher in a signal.

``D_t = D(π_θ(·|c_t) ‖ π_T(·|c_t))`` of :func:`opd.losses.divergence.divergence`, with the
teacher's log-probs floored (:func:`opd.signals.teacher_logp.floored_logp_V`), per token
``[B, T]``. From the student's hidden states and LM head and the teacher's hidden states and
head (or its logits, for a program teacher) it is computed chunk by chunk
(:func:`opd.losses.chunked.chunked_divergence`): neither side's ``[B, T, V]`` logits exist at
once. A student head that is not a plain ``nn.Linear`` (a quantized layer) falls back to the
full logits of the micro-batch. Both forms give the same values and gradients up to float
rounding (``tests/test_full_vocab.py``).
"""

from __future__ import annotations

import torch

from opd.losses import divergence
from opd.losses.chunked import chunked_divergence
from opd.methods.base import Signal, StudentView
from opd.signals.teacher_logp import TEACHER_LOGP_FLOOR, floored_logp_V


def teacher_of(signal: Signal):
    """The teacher as the chunked functions take it: logits, or ``(hidden, weight, bias)``."""
    if "teacher_hidden_BTH" in signal:
        head = signal["teacher_head"]
        return (signal["teacher_hidden_BTH"], head.weight_VH, head.bias_V)
    return signal["teacher_logits_BTV"]


def teacher_divergence_BT(view: StudentView, signal: Signal, kind: str, **kw) -> torch.Tensor:
    """``D_t`` per token (module doc); ``kw``: ``divergence``'s ``beta``, ``temperature``,
    ``entry_clip``, ``support``, ``k``, ``renormalize``."""
    teacher = teacher_of(signal)
    head = view.linear_head
    if head is None or view.hidden_BTH is None or view.has_logits:
        logits_BTV = teacher if isinstance(teacher, torch.Tensor) else torch.nn.functional.linear(*teacher).float()
        return divergence(view.logits_BTV, floored_logp_V(logits_BTV), kind, **kw)
    if not isinstance(teacher, torch.Tensor):
        teacher = (teacher[0].to(view.hidden_BTH.device), *(t if t is None else t.to(view.hidden_BTH.device) for t in teacher[1:]))
    return chunked_divergence(view.hidden_BTH, head[0], teacher, kind, bias_V=head[1], chunk_size=view.chunk_size,
                              teacher_floor=TEACHER_LOGP_FLOOR, **kw)
