"""What a method is: a composition of rollout, teacher request, signal and loss.

The loop (``opd.train``) calls these four in order and never looks at a method's name:

    exp     = method.rollout(env, problems, generator)        # whose tokens
    scores  = env.teacher.score(exp.batch, **teacher_request) # if the method asks
    signal  = method.signal(exp, scores)                      # row-aligned tensors, detached
    loss_BT = method.loss(student, signal_rows)               # per token, the loop reduces

``signal`` must hold ``mask_BT`` (the tokens that count, the loop's token-mean normalizer)
and may hold anything else the loss reads (advantages, teacher logits, sampler log-probs).
Every tensor in it has the batch as its first dimension, so the loop can cut micro-batches.
Keys with a ``/`` (``"signal/drift_rate"``, ``"monitor/repetition"``) are metrics, not loss
inputs: the loop logs their mean (a scalar, or a ``[B]``/``[B, T]`` tensor averaged over
rows / kept tokens) and does not pass them to the loss.

Which teacher scores which sequences is part of the method (``Method.context``): by
default ``env.teacher`` on the rollout's own batch; OPSD's frozen self-teacher scores the
same completions behind a privileged prompt, TRD's teacher behind its refine prompt. A
context returns a batch whose completion columns equal the rollout's, so the scores stay
aligned with ``exp.batch``. Extra per-row tensors a rollout computes (reference-model
log-probs, SKD's acceptance flags) travel in ``Experience.extra``.

A method with state across steps (POPD's horizon schedule, Prune-OPD's adaptive budget)
keeps it in ``Method.state``: an object with ``state_dict()`` / ``load_state_dict()``,
saved with every checkpoint so that a resumed run continues exactly. ``env.step`` is the
index of the step being taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from opd.batch import SeqBatch
from opd.models.base import Scores, Teacher
from opd.rollouts.base import Experience, RolloutEnv  # noqa: F401  (part of the method contract)
from opd.tasks.base import Problem


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


class MethodState(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


Context = Callable[[RolloutEnv, Experience], tuple[Teacher, SeqBatch]]


def plain_context(env: RolloutEnv, exp: Experience) -> tuple[Teacher, SeqBatch]:
    """The teacher scores the rollout's own sequences (prompt x, completion y)."""
    return env.teacher, exp.batch


@dataclass(frozen=True)
class Method:
    """``needs``: "teacher", "verifier", "solutions", "reference" (frozen initial student),
    "full_teacher" (full-vocabulary teacher logits), "teacher_generate" (a teacher that
    samples), "boundaries" (``env.boundary_ids`` filled from the tokenizer).
    ``setup.check_needs`` turns an unmet need into an error at start."""

    name: str
    rollout: Callable[[RolloutEnv, list[Problem], torch.Generator], Experience]
    signal: Callable[[Experience, Scores | None], Signal]
    loss: Callable[[StudentView, Signal], LossOut]
    teacher_request: TeacherRequest | None = None
    needs: tuple[str, ...] = field(default=())
    min_group_size: int = 1  # rollouts per prompt the signal needs (GRPO: 2)
    context: Context = plain_context
    state: MethodState | None = None


@dataclass(frozen=True)
class MethodInfo:
    """What ``opd methods`` and the README table say about a method."""

    paper: str  # "Gu et al., 2306.08543"
    fixes: str  # the pitfall it addresses: "baseline", "local noise", "horizon decay", "myopic supervision", ...
    source: str  # METHODS.md's label: paper / code / third-party / reconstruction
    recipe: dict[str, Any] = field(default_factory=dict)  # run settings the method's source uses


def method_info(**info) -> Callable:
    """Decorator for a builder: ``@method_info(paper=..., fixes=..., source=..., recipe=...)``."""

    def mark(build: Callable[..., Method]) -> Callable[..., Method]:
        build.info = MethodInfo(**info)
        return build

    return mark
