"""When a method computes the same thing as another one on a run, and which knob to change.

A user who compares ``eopd`` with ``opd`` must be comparing two objectives. Each method's
``Method.degenerate(facts)`` (bound by its builder to its own knobs) returns a
:class:`Degenerate` when, on this run, the method reduces to another method (or to a zero
loss), else None. The run says it in one line naming the knob to change
(:func:`say`), and records it as the metric ``degenerate/<knob> = 1`` of the first step,
which ``opd compare`` marks in its table.

The facts come in two waves. At set-up (``opd.run.setup``) only the static ones are known:
the vocabulary size and ``max_new_tokens``. After the first training step
(:func:`first_step_record`, called by the loop) also the teacher's entropy on that step's
completion tokens and the step's own metrics (``rollout/truncated``,
``signal/drift_rate``, ...). A check reads only the facts it needs and returns None while
they are missing; the first-step record says a line only for what set-up could not.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Callable

import torch


@dataclass(frozen=True)
class RunFacts:
    """What a degeneracy check may look at (None: not known yet)."""

    vocab_size: int | None = None
    max_new_tokens: int | None = None
    teacher_entropy_N: torch.Tensor | None = None  # nats, the first step's completion tokens
    first_step: dict[str, float] | None = None  # the first step's metrics

    def metric(self, key: str) -> float | None:
        """A metric of the first step, or None (not known yet, or not logged)."""
        value = (self.first_step or {}).get(key)
        return None if value is None else float(value)


@dataclass(frozen=True)
class Degenerate:
    """``knob``: the knob to change; ``becomes``: what the method computes instead;
    ``why``: the fact that makes it so."""

    knob: str
    becomes: str
    why: str

    def line(self, method: str) -> str:
        return f"warning: method {method!r} reduces to {self.becomes} on this run: {self.why}; change {self.knob}"


Check = Callable[[RunFacts], "Degenerate | None"]


def never(facts: RunFacts) -> Degenerate | None:
    """The check of a method that never reduces to another one."""
    return None


def say(method: str, note: Degenerate) -> None:
    print(note.line(method), file=sys.stderr, flush=True)


def static_facts(env) -> RunFacts:
    """The facts known before any step: the vocabulary and the length cap."""
    return RunFacts(vocab_size=env.vocab_size or None, max_new_tokens=env.max_new_tokens)


def warn_at_setup(method, env) -> Degenerate | None:
    """Say (stderr) what the static facts already show; returns it."""
    note = method.degenerate(static_facts(env))
    if note is not None:
        say(method.name, note)
    return note


def first_step_facts(env, exp, scores, metrics: dict) -> RunFacts:
    """All the facts, after the first step: the teacher entropy on its completion tokens
    (None when the method asks no teacher) and the step's metrics."""
    entropy_N = None
    if scores is not None and tuple(scores.entropy_BT.shape) == tuple(exp.batch.completion_mask_BT.shape):
        mask_BT = exp.batch.completion_mask_BT.to(scores.entropy_BT.device)
        entropy_N = scores.entropy_BT[mask_BT].detach().float().cpu()
    return replace(static_facts(env), teacher_entropy_N=entropy_N, first_step=dict(metrics))


def first_step_record(method, env, exp, scores, metrics: dict) -> dict[str, float]:
    """``{"degenerate/<knob>": 1.0}`` when the method is degenerate on this run (else
    ``{}``); says the line unless set-up said it already."""
    note = method.degenerate(first_step_facts(env, exp, scores, metrics))
    if note is None:
        return {}
    if note != method.degenerate(static_facts(env)):
        say(method.name, note)
    return {f"degenerate/{note.knob}": 1.0}


def degenerate_knobs(rows: list[dict]) -> list[str]:
    """The knobs a run's metrics rows mark as degenerate (``degenerate/<knob>``)."""
    return sorted({k.split("/", 1)[1] for row in rows for k, v in row.items() if k.startswith("degenerate/") and v})


def budget_never_binds(facts: RunFacts, knob: str, budget: int | None) -> Degenerate | None:
    """Shared by the truncation methods: the budget reaches the cap, or no rollout of the
    first step was cut by it."""
    if budget is not None and facts.max_new_tokens is not None and budget >= facts.max_new_tokens:
        why = f"the budget ({budget} tokens) is not below max_new_tokens={facts.max_new_tokens}"
        return Degenerate(knob, "opd", why)
    if facts.metric("rollout/truncated") == 0.0:
        return Degenerate(knob, "opd", "no rollout of the first step reached the length budget (it never cut one)")
    return None
