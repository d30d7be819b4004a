"""A model's LM head restricted to its tokenizer's ids.

A checkpoint often holds more output rows than its tokenizer has ids: the embedding
matrix is padded to a multiple of 64 or 128 for fast matmuls. The Qwen2.5 family shares
one tokenizer of 151,665 ids; its 0.5B-3B models have 151,936 rows, its 7B-72B models
152,064. Padding rows were never trained on: they must never be sampled nor carry mass,
and a student and a teacher of one family must be compared on the tokenizer's ids.

:func:`restrict_head` cuts the head to its first ``n`` rows without touching the weights:

- every call of the head module returns ``logits[..., :n]`` (a forward hook), so the
  sampler, the decoders and the teacher's scoring see ``V = n``;
- :func:`head_params` returns ``(weight[:n], bias[:n])`` (views, differentiable: padding
  rows get zero gradient) for the code that reads the head's matrix directly (the chunked
  losses and scores).

The saved model is unchanged (a hook is not part of the state dict).
"""

from __future__ import annotations

import torch

_ROWS = "opd_rows"  # attribute on the head module: the rows in use
_HOOK = "opd_rows_hook"


def head_rows(head: torch.nn.Module) -> int:
    """The output ids of ``head`` in use: its restriction, else its weight's rows."""
    return getattr(head, _ROWS, None) or head.weight.shape[0]


def head_params(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight_VH, bias_V)`` of ``head`` cut to :func:`head_rows` (views)."""
    n, bias = head_rows(head), getattr(head, "bias", None)
    weight = head.weight
    if n == weight.shape[0]:
        return weight, bias
    return weight[:n], None if bias is None else bias[:n]


def restrict_head(model: torch.nn.Module, n: int) -> None:
    """Make ``model``'s output head produce only its first ``n`` ids (module doc).

    No-op when the head has exactly ``n`` rows; calling it again replaces the restriction.
    Fewer rows than ``n`` is an error: those ids would have no logit."""
    head = model.get_output_embeddings()
    rows = head.weight.shape[0]
    if rows < n:
        raise ValueError(f"the output head has {rows} rows, fewer than the {n} ids asked for")
    old = getattr(head, _HOOK, None)
    if old is not None:
        old.remove()
    setattr(head, _HOOK, None)
    setattr(head, _ROWS, None)
    if rows == n:
        return
    setattr(head, _ROWS, n)
    setattr(head, _HOOK, head.register_forward_hook(lambda _mod, _inp, out: out[..., :n]))
