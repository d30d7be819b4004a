"""What a method is: a composition of rollout, teacher request, signal and loss.

The loop (``opd.train``) calls these four in order and never looks at a method's name:

    exp     = method.rollout(env, problems, generator)        # whose tokens
    scores  = env.teacher.score(exp.batch, **teacher_request) # if the method asks
    signal  = method.signal(exp, scores)                      # row-aligned tensors, detached
    loss_BT = method.loss(student, signal_rows)               # per token, the loop reduces

``signal`` must hold ``mask_BT`` (the tokens that count, the loop's token-mean normalizer)
and may hold anything else the loss reads (advantages, teacher logits, sampler log-probs).
Every tensor in it has the batch as its first dimension, so the loop can cut micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from opd.batch import SeqBatch
from opd.models.base import Scores, Teacher
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


@dataclass
class StudentView:
    """The student's differentiable outputs on one micro-batch."""

    logits_BTV: torch.Tensor
    logp_BT: torch.Tensor  # log pi_theta(y_t | c_t) of the batch's tokens


@dataclass(frozen=True)
class TeacherRequest:
    topk: int = 8
    full: bool = False  # the loss needs the teacher's full next-token logits


Signal = dict[str, torch.Tensor]
LossOut = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    name: str
    rollout: Callable[[RolloutEnv, list[Problem], torch.Generator], Experience]
    signal: Callable[[Experience, Scores | None], Signal]
    loss: Callable[[StudentView, Signal], LossOut]
    teacher_request: TeacherRequest | None = None
    needs: tuple[str, ...] = field(default=())  # "teacher", "verifier", "solutions"
    min_group_size: int = 1  # rollouts per prompt the signal needs (GRPO: 2)
