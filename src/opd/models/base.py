"""What a teacher answers: the scores of a batch of sequences.

A teacher is anything with ``score(batch, topk=, full=, temperature=) -> Scores`` and a
``vocab_size``: a local Hugging Face model, a program (the testbed's oracle) or a server.
Scores may come back on any device (the teacher's own): the loop moves them to the
student's. All tensors are aligned to the completion columns of :class:`opd.batch.SeqBatch`:
index ``t`` holds the distribution that predicts completion token ``t`` given the prompt
and completion tokens ``< t``. Values at masked positions are finite but meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from opd.batch import SeqBatch


@dataclass
class Scores:
    token_logp_BT: torch.Tensor  # log pi(y_t | c_t) of the given tokens
    entropy_BT: torch.Tensor  # H(pi(. | c_t)) in nats
    topk_ids_BTK: torch.Tensor  # long, the K most likely ids, descending
    topk_logp_BTK: torch.Tensor  # their log-probs
    logits_BTV: torch.Tensor | None = None  # full next-token logits, only when asked (full=True)

    def to(self, device: torch.device) -> "Scores":
        """The scores on ``device`` (the loop moves them to the student's device once per step)."""
        return Scores(*(None if t is None else t.to(device) for t in
                        (self.token_logp_BT, self.entropy_BT, self.topk_ids_BTK, self.topk_logp_BTK, self.logits_BTV)))


class Teacher(Protocol):
    vocab_size: int

    def score(
        self, batch: SeqBatch, *, topk: int = 8, full: bool = False, temperature: float = 1.0
    ) -> Scores: ...
