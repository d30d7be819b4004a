"""What a rollout produces (:class:`Experience`) and what it may use (:class:`RolloutEnv`).

They live in the rollout layer so that rollouts never import the methods above them;
:mod:`opd.methods.base` re-exports both as part of the method contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from opd.batch import SeqBatch
from opd.models.base import Teacher
from opd.tasks.base import Problem


@dataclass
class Experience:
    """One step's sequences, with what the rollout knows about them."""

    batch: SeqBatch
    problems: list[Problem]  # one per row
    group_B: torch.Tensor  # long, index of the prompt each row answers (GRPO groups)
    sampler_logp_BT: torch.Tensor | None = None  # student log-probs at sampling time
    rewards_B: torch.Tensor | None = None  # verifier outcomes in {0, 1}
    on_policy: bool = True  # sampled by the student (False: dataset or teacher data)
    teacher_tokens: int = 0  # tokens the teacher generated to build this experience
    truncated_B: torch.Tensor | None = None  # hit the length cap without EOS
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row tensors for the signal (or a shared Head)
    sampled_B: torch.Tensor | None = None  # bool, the rows rollout/* metrics describe (None: all)

    def to(self, device: torch.device) -> "Experience":
        """Every tensor on ``device`` (the loop moves a rollout to the student's device once)."""
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return replace(
            self, batch=self.batch.to(device), group_B=move(self.group_B), sampler_logp_BT=move(self.sampler_logp_BT),
            rewards_B=move(self.rewards_B), truncated_B=move(self.truncated_B), sampled_B=move(self.sampled_B),
            extra={k: move(v) for k, v in self.extra.items()},
        )


@dataclass
class RolloutEnv:
    """Everything a rollout may use; built once by the trainer from the config."""

    student: torch.nn.Module
    teacher: Teacher | None
    encode_prompt: Callable[[Problem], list[int]]
    encode_solution: Callable[[Problem], list[int]]  # reference solution ids, EOS included
    verify: Callable[[Problem, list[int]], bool]  # completion ids -> correct?
    eos_id: int
    pad_id: int
    max_new_tokens: int
    temperature: float
    top_p: float
    group_size: int
    # contexts a method may put the teacher in (see opd.run.setup for the formats)
    encode_privileged: Callable[[Problem], list[int]] | None = None  # x with y* shown (OPSD)
    encode_refine: Callable[[Problem, list[int]], list[int]] | None = None  # x and a draft (TRD)
    reference: torch.nn.Module | None = None  # frozen initial student (when a method needs it)
    special_ids: tuple[int, ...] = ()  # ids a loss may mask (pad, bos, eos, template tokens)
    boundary_ids: tuple[int, ...] = ()  # ids that end a sentence/line/step (set when needs has "boundaries")
    vocab_size: int = 0
    step: int = 0  # index of the step being taken (set by the loop)
    autocast: torch.dtype | None = None  # the student's forward dtype under autocast (None: its own)
