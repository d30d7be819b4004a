"""One rule for a teacher's zero and undefined probabilities, shared by every method.

A ``-inf`` teacher log-prob is a zero probability, and a NaN one is read the same way (an
undefined value carries no mass). Where the math lets the terms of a zero probability drop
out, they do: forward KL's ``π_T(v)(log π_T(v) − log π_θ(v))`` is 0 there, and a
renormalized support gives it no mass. Where the math does not (the sampled-token reward
``−(log π_θ(y_t) − log π_T(y_t))``, reverse KL's ``π_θ(v)(log π_θ(v) − log π_T(v))``, a
teacher perplexity), the log-prob is clipped from below at :data:`TEACHER_LOGP_FLOOR`
(−100 nats). ``e^{−100} ≈ 4e−44`` is below float32's smallest normal number, so the floor
changes nothing for a teacher with full support in practice, and every value and gradient
stays finite. No method returns NaN or inf on such scores
(``tests/test_teacher_zero_prob.py`` runs every method's loss on them).

Ties are ties: a teacher's "top-K" is every id at least as likely as its K-th most likely
one (within :data:`TIE_TOL`), so it never depends on the order in which ``topk`` breaks
ties (:func:`tied_topk_mask`). A program teacher ties a lot: the testbed's noise-free oracle
gives every word but the intended one the same log-prob, so there any top-K with K >= 2
holds every live word.

Pure torch.
"""

from __future__ import annotations

import torch

TEACHER_LOGP_FLOOR = -100.0  # nats: the log-prob a zero probability is clipped to
TIE_TOL = 1e-6  # nats: log-probs this close to the K-th largest are tied with it


def floor_logp(logp: torch.Tensor, floor: float = TEACHER_LOGP_FLOOR) -> torch.Tensor:
    """Teacher log-probs (sampled-token, top-K, any shape) under the rule: NaN and ``-inf``
    become ``floor``, everything is at least ``floor`` (``+inf``, never a log-prob, is 0)."""
    return logp.nan_to_num(nan=floor, posinf=0.0, neginf=floor).clamp_min(floor)


def floored_logp_V(logits_V: torch.Tensor, floor: float = TEACHER_LOGP_FLOOR) -> torch.Tensor:
    """``max(log softmax(logits), floor)`` over the last axis (float32, float64 kept), with
    NaN logits carrying no mass. A row without any finite logit has no distribution and stays
    all ``-inf`` (the divergences give such a position 0, :mod:`opd.losses.divergence`).
    Use it on a teacher's full logits before a divergence; as logits it describes the same
    distribution up to the floored entries."""
    x = logits_V if logits_V.dtype == torch.float64 else logits_V.float()
    x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max, neginf=float("-inf"))
    has_mass = (x > float("-inf")).any(-1, keepdim=True)
    return torch.where(has_mass, x.log_softmax(-1).clamp_min(floor), float("-inf"))


def tied_topk_mask(logp_V: torch.Tensor, k: int, tol: float = TIE_TOL) -> torch.Tensor:
    """bool ``[..., V]``: the top-``k`` ids with ties, ``logp ≥ (k-th largest) − tol`` (at
    least ``min(k, V)`` ids; more where ids tie at the k-th place). ``logp_V``: log-probs
    without NaN (:func:`floored_logp_V`)."""
    kth = logp_V.topk(min(k, logp_V.shape[-1]), dim=-1).values[..., -1:]
    return logp_V >= kth - tol


class Head:
    """An LM head ``(weight_VH, bias_V)`` (detached) carried in a signal or ``exp.extra``:
    not a per-row tensor, so the loop passes it to every micro-batch as it is (never sliced,
    trimmed or moved row by row)."""

    def __init__(self, weight_VH: torch.Tensor, bias_V: torch.Tensor | None):
        self.weight_VH, self.bias_V = weight_VH, bias_V


def full_teacher(scores) -> dict:
    """The signal entries of the teacher's full next-token distribution: its completion hidden
    states ``teacher_hidden_BTH`` and ``teacher_head`` (a model teacher: the loss makes the
    logits chunk by chunk, never ``[B, T, V]``), or ``teacher_logits_BTV`` (a program teacher,
    whose vocabulary is small)."""
    if getattr(scores, "hidden_BTH", None) is not None:
        return {"teacher_hidden_BTH": scores.hidden_BTH, "teacher_head": Head(*scores.head)}
    return {"teacher_logits_BTV": scores.logits_BTV}
