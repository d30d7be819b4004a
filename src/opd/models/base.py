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
from opd.losses.teacher_dist import TeacherDist


@dataclass
class Scores:
    token_logp_BT: torch.Tensor  # log pi(y_t | c_t) of the given tokens
    entropy_BT: torch.Tensor  # H(pi(. | c_t)) in nats
    topk_ids_BTK: torch.Tensor  # long, the K most likely ids, descending
    topk_logp_BTK: torch.Tensor  # their log-probs
    logits_BTV: torch.Tensor | None = None  # full next-token logits (full=True, a program teacher: V small)
    # full=True, a model teacher: its completion hidden states and LM head (weight_VH, bias_V),
    # from which any consumer makes the logits chunk by chunk (never [B, T, V] at once): see `dist`
    hidden_BTH: torch.Tensor | None = None
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def to(self, device: torch.device) -> "Scores":
        """The scores on ``device`` (the loop moves them to the student's device once per step)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Scores(*(move(t) for t in (self.token_logp_BT, self.entropy_BT, self.topk_ids_BTK, self.topk_logp_BTK,
                                          self.logits_BTV, self.hidden_BTH)),
                      head=None if self.head is None else tuple(move(t) for t in self.head))

    @property
    def has_full(self) -> bool:
        return self.logits_BTV is not None or self.hidden_BTH is not None

    @property
    def dist(self) -> TeacherDist | None:
        """The full distribution (``full=True``) as a :class:`TeacherDist`: the hidden states
        and head of a model teacher, or a program teacher's logits; None without ``full``."""
        if self.hidden_BTH is not None:
            return TeacherDist(hidden=self.hidden_BTH, weight_VH=self.head[0], bias_V=self.head[1])
        return None if self.logits_BTV is None else TeacherDist(logits=self.logits_BTV)

    def full_logits_BTV(self) -> torch.Tensor:
        """The full next-token logits (float32), made from the hidden states and the head when
        the teacher gave those: a ``[B, T, V]`` tensor, for tests and the consumers that need
        a few positions' worth (never a training step's whole batch at a real vocabulary)."""
        if self.logits_BTV is not None or self.hidden_BTH is None:
            return self.logits_BTV
        return self.dist.full_logits().float()


class Teacher(Protocol):
    vocab_size: int

    def score(
        self, batch: SeqBatch, *, topk: int = 8, full: bool = False, temperature: float = 1.0
    ) -> Scores: ...
