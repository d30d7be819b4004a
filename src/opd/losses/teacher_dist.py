"""A teacher's full next-token distribution, in a form that is never ``[B, T, V]``.

At ``N`` positions (any leading shape, ``[B, T]`` in a step) the teacher's logits are

    z_n = h_n W^T + b        (a model teacher: final hidden states h [..., H], LM head W [V, H], b [V])
    z_n given                (a program teacher, such as the testbed's oracle: logits [..., V], V small)

:class:`TeacherDist` holds either form. Its consumers make the logits of a chunk of flat
positions ``lo:hi`` at a time (:meth:`TeacherDist.logits_into`, :meth:`TeacherDist.chunks`):
``[C, V]`` with ``C`` about ``2^24 / V`` positions, so a model teacher's ``[N, V]`` logits never
exist at once. The matmul runs in the hidden states' dtype (the head is cast once per
:meth:`TeacherDist.flat`); the chunk's softmax math is the consumer's (float32, float64 kept).

Vocabulary restriction: :meth:`TeacherDist.restricted` keeps the first ``n`` ids (``W[:n]``,
``b[:n]``, or ``logits[..., :n]``), e.g. a head padded past its tokenizer. Nothing here reads a
model's ``config.vocab_size``: the vocabulary is the head's (or the logits') rows as given.
Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


def logits_into(h_CH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None, out_CV: torch.Tensor) -> torch.Tensor:
    """``out ← h W^T + b`` in ``out``'s dtype (the matmul in ``h``'s; no temporary when they agree)."""
    if h_CH.dtype != out_CV.dtype:
        return out_CV.copy_(torch.nn.functional.linear(h_CH, weight_VH, bias_V))
    if bias_V is None:
        return torch.mm(h_CH, weight_VH.t(), out=out_CV)
    return torch.addmm(bias_V, h_CH, weight_VH.t(), out=out_CV)


def head_in_dtype(weight_VH: torch.Tensor, bias_V: torch.Tensor | None, dtype: torch.dtype):
    """``(W, b)`` cast to ``dtype`` (the hidden states'), not differentiably: made once per call."""
    if weight_VH.dtype == dtype:
        return weight_VH.detach(), None if bias_V is None else bias_V.detach()
    return weight_VH.detach().to(dtype), None if bias_V is None else bias_V.detach().to(dtype)


def float_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax math's dtype: float64 kept, anything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class TeacherDist:
    """The teacher's full distribution at every position: ``logits [..., V]``, or ``hidden
    [..., H]`` with the LM head ``weight_VH [V, H]`` and ``bias_V [V]`` (module doc). Constant:
    its tensors are detached by :meth:`flat` (no gradient reaches a teacher)."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight_VH: torch.Tensor | None = None
    bias_V: torch.Tensor | None = None

    def __post_init__(self):
        if (self.logits is None) == (self.hidden is None) or (self.hidden is None) != (self.weight_VH is None):
            raise ValueError("a TeacherDist holds logits, or hidden states with a head weight (not both)")
        if self.hidden is not None:
            if self.weight_VH.dim() != 2 or self.hidden.shape[-1] != self.weight_VH.shape[1]:
                raise ValueError(f"teacher hidden {tuple(self.hidden.shape)} and head {tuple(self.weight_VH.shape)} disagree in H")
            if self.bias_V is not None and self.bias_V.shape != self.weight_VH.shape[:1]:
                raise ValueError(f"teacher bias must be [V={self.weight_VH.shape[0]}], got {tuple(self.bias_V.shape)}")

    @classmethod
    def of(cls, teacher) -> "TeacherDist":
        """From a ``TeacherDist``, logits ``[..., V]``, or ``(hidden, weight[, bias])``."""
        if isinstance(teacher, TeacherDist):
            return teacher
        if isinstance(teacher, torch.Tensor):
            return cls(logits=teacher)
        if len(teacher) not in (2, 3):
            raise ValueError("teacher must be logits or (hidden, weight[, bias])")
        hidden, weight, bias = (*teacher, None)[:3]
        return cls(hidden=hidden, weight_VH=weight, bias_V=bias)

    @property
    def vocab(self) -> int:
        return self.logits.shape[-1] if self.logits is not None else self.weight_VH.shape[0]

    @property
    def lead_shape(self) -> torch.Size:
        """The positions' shape (``[B, T]`` in a step)."""
        return (self.logits if self.logits is not None else self.hidden).shape[:-1]

    @property
    def positions(self) -> int:
        return self.lead_shape.numel()

    @property
    def device(self) -> torch.device:
        return (self.logits if self.logits is not None else self.hidden).device

    def restricted(self, n: int) -> "TeacherDist":
        """The distribution over the first ``n`` ids only (a head padded past its tokenizer's
        ``n`` ids: its padding rows dropped). ``n`` above the vocabulary is an error."""
        if not 1 <= n <= self.vocab:
            raise ValueError(f"cannot restrict a {self.vocab}-id distribution to {n} ids")
        if self.logits is not None:
            return TeacherDist(logits=self.logits[..., :n])
        return TeacherDist(hidden=self.hidden, weight_VH=self.weight_VH[:n], bias_V=None if self.bias_V is None else self.bias_V[:n])

    def flat(self) -> "TeacherDist":
        """Leading dims flattened to ``N``, detached, the head cast to the hidden states' dtype
        (once: every chunk's matmul then runs in that dtype)."""
        if self.logits is not None:
            return TeacherDist(logits=self.logits.detach().reshape(-1, self.vocab))
        weight, bias = head_in_dtype(self.weight_VH, self.bias_V, self.hidden.dtype)
        return TeacherDist(hidden=self.hidden.detach().reshape(-1, self.hidden.shape[-1]), weight_VH=weight, bias_V=bias)

    def logits_into(self, lo: int, hi: int, out_CV: torch.Tensor) -> torch.Tensor:
        """The logits of flat positions ``lo:hi`` written into ``out_CV`` (of a :meth:`flat` dist)."""
        if self.logits is not None:
            return out_CV.copy_(self.logits[lo:hi])
        return logits_into(self.hidden[lo:hi], self.weight_VH, self.bias_V, out_CV)

    def raw_logits(self, lo: int, hi: int) -> torch.Tensor:
        """The logits of flat positions ``lo:hi`` in their own dtype (the matmul's: bf16 under
        autocast): a view of given logits, else one new ``[hi - lo, V]`` tensor."""
        if self.logits is not None:
            return self.logits[lo:hi]
        return torch.nn.functional.linear(self.hidden[lo:hi], self.weight_VH, self.bias_V)

    def chunk_logits(self, lo: int, hi: int) -> torch.Tensor:
        """The logits ``[hi - lo, V]`` of flat positions ``lo:hi`` (of a :meth:`flat` dist),
        float32 (float64 kept)."""
        src = self.logits if self.logits is not None else self.hidden
        out = torch.empty(hi - lo, self.vocab, dtype=float_dtype(src.dtype), device=src.device)
        return self.logits_into(lo, hi, out)

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(lo, hi, logits_CV)`` over every flat position, ``chunk_size`` at a time."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        flat = self.flat()
        for lo in range(0, flat.positions, chunk_size):
            hi = min(lo + chunk_size, flat.positions)
            yield lo, hi, flat.chunk_logits(lo, hi)

    def full_logits(self) -> torch.Tensor:
        """All the logits ``[..., V]`` at once (float32, float64 kept): for a program teacher's
        small vocabulary and for tests, never inside a training step at a real vocabulary."""
        flat = self.flat()
        return flat.chunk_logits(0, flat.positions).view(*self.lead_shape, self.vocab)

    def to(self, device) -> "TeacherDist":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TeacherDist(move(self.logits), move(self.hidden), move(self.weight_VH), move(self.bias_V))
