"""What a method is: a composition of rollout, teacher request, signal and loss.

The loop (``opd.run.loop``) calls these four in order and never looks at a method's name:

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
from pydantic import validate_call

from opd.batch import SeqBatch
from opd.losses.selective import token_logp, token_logp_and_stats
from opd.methods.degeneracy import Check, never
from opd.models.base import Scores, Teacher
from opd.models.head import head_params
from opd.rollouts.base import Experience, RolloutEnv  # noqa: F401  (part of the method contract)
from opd.tasks.base import Problem


class StudentView:
    """The student's differentiable outputs on one micro-batch.

    - ``logp_BT``: ``log pi_theta(y_t | c_t)`` of the batch's tokens;
    - ``logits_BTV``: the full next-token logits ``lm_head(h_t)`` (float32), for losses
      over the whole vocabulary.

    Lean form (:meth:`from_hidden`, what the loop builds): it holds the completion hidden
    states ``hidden_BTH``, the LM head and the token ids, and makes each output on first
    access, then caches it. ``logp_BT`` is made chunk by chunk over tokens
    (:mod:`opd.losses.selective`, never ``[B, T, V]``), or gathered from the logits when
    those exist already; ``logits_BTV`` is ``lm_head(hidden_BTH).float()``, the same
    differentiable tensor as a full forward gives. A method that reads only ``logp_BT``
    thus never materializes the full logits; one that reads both pays one extra chunked
    LM-head pass (the gradients add up correctly either way). With ``stats_topk = K``,
    the chunked sweep also keeps each token's entropy and top-``K`` ids (detached) in
    ``side_stats`` for the loop's ``diag/`` metrics, at no extra LM-head matmul.

    Eager form: ``StudentView(logits_BTV, logp_BT)`` as given (either may be None).
    """

    def __init__(
        self,
        logits_BTV: torch.Tensor | None = None,
        logp_BT: torch.Tensor | None = None,
        *,
        hidden_BTH: torch.Tensor | None = None,
        lm_head: torch.nn.Module | None = None,
        ids_BT: torch.Tensor | None = None,
        chunk_size: int | None = None,
        stats_topk: int | None = None,
    ):
        self._logits_BTV, self._logp_BT = logits_BTV, logp_BT
        self.hidden_BTH, self.lm_head, self.ids_BT = hidden_BTH, lm_head, ids_BT
        self.chunk_size, self.stats_topk = chunk_size, stats_topk
        self.side_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (entropy_BT, topk_ids_BTk)

    @classmethod
    def from_hidden(cls, hidden_BTH: torch.Tensor, lm_head: torch.nn.Module, ids_BT: torch.Tensor, **kw) -> "StudentView":
        """The lean view; ``ids_BT`` are the tokens ``logp_BT`` scores; ``kw``:
        ``chunk_size`` (tokens per chunk), ``stats_topk``."""
        return cls(hidden_BTH=hidden_BTH, lm_head=lm_head, ids_BT=ids_BT, **kw)

    @property
    def has_logits(self) -> bool:
        """Whether the full logits exist already (given, or made by an access)."""
        return self._logits_BTV is not None

    @property
    def linear_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight_VH, bias_V)`` when the LM head is exactly ``torch.nn.Linear`` (not a
        subclass such as a quantized layer, whose weight is no plain matrix), else None:
        then ``logp_BT`` falls back to the full logits."""
        if type(self.lm_head) is not torch.nn.Linear:
            return None
        return head_params(self.lm_head)  # cut to the tokenizer's ids (opd.models.head)

    @property
    def logits_BTV(self) -> torch.Tensor | None:
        if self._logits_BTV is None and self.hidden_BTH is not None:
            self._logits_BTV = self.lm_head(self.hidden_BTH).float()
        return self._logits_BTV

    @property
    def logp_BT(self) -> torch.Tensor | None:
        if self._logp_BT is None and self.ids_BT is not None:
            head = self.linear_head
            if self.has_logits or head is None or self.hidden_BTH is None:
                logp_BTV = torch.log_softmax(self.logits_BTV, -1)
                self._logp_BT = logp_BTV.gather(-1, self.ids_BT[..., None]).squeeze(-1)
            elif self.stats_topk is None:
                self._logp_BT = token_logp(self.hidden_BTH, head[0], self.ids_BT, bias_V=head[1], chunk_size=self.chunk_size)
            else:
                self._logp_BT, *stats = token_logp_and_stats(
                    self.hidden_BTH, head[0], self.ids_BT, topk=self.stats_topk, bias_V=head[1], chunk_size=self.chunk_size
                )
                self.side_stats = tuple(stats)
        return self._logp_BT


@dataclass(frozen=True)
class TeacherRequest:
    topk: int = 8
    full: bool = False  # the full next-token logits (a top-K-only teacher gives top-K to a method that takes it)


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
    ``setup.check_needs`` turns an unmet need into an error at start. ``degenerate``: when
    the method, under its knobs, reduces to another method on a run
    (:mod:`opd.methods.degeneracy`)."""

    name: str
    rollout: Callable[[RolloutEnv, list[Problem], torch.Generator], Experience]
    signal: Callable[[Experience, Scores | None], Signal]
    loss: Callable[[StudentView, Signal], LossOut]
    teacher_request: TeacherRequest | None = None
    needs: tuple[str, ...] = field(default=())
    min_group_size: int = 1  # rollouts per prompt the signal needs (GRPO: 2)
    context: Context = plain_context
    state: MethodState | None = None
    degenerate: Check = never


@dataclass(frozen=True)
class MethodInfo:
    """What ``opd methods`` and the README table say about a method."""

    paper: str  # "Gu et al., 2306.08543"
    fixes: str  # the pitfall it addresses: "baseline", "local noise", "horizon decay", "myopic supervision", ...
    source: str  # METHODS.md's label: paper / code / third-party / reconstruction
    recipe: dict[str, Any] = field(default_factory=dict)  # run settings the method's source uses


def method_info(**info) -> Callable:
    """Decorator for a builder: ``@method_info(paper=..., fixes=..., source=..., recipe=...)``.

    The builder's arguments are validated against its knob declarations (type and range,
    :mod:`opd.methods.knobs`) on every call, from the config or from code."""

    def mark(build: Callable[..., Method]) -> Callable[..., Method]:
        build = validate_call(build)
        build.info = MethodInfo(**info)
        return build

    return mark
