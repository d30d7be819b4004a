"""``modchain`` with a label on every operation, so a step can find its operands by content.

The same problems as :mod:`opd.testbed.modchain` (a start value pushed through ``h``
operations modulo a prime), written with the label ``s<i>`` before operation ``i`` in the
prompt and at the start of step ``i``::

    prompt:   chain m start v_0 s1 o_1 d_1 .. s<h> o_h d_h =
    step i:   v_{i-1} s<i> o_i d_i = v_i ;
    answer:   ans v_h

Horizon 4::

    chain 7 start 3 s1 + 4 s2 * 2 s3 - 5 s4 * 3 =
    3 s1 + 4 = 0 ; 0 s2 * 2 = 0 ; 0 s3 - 5 = 2 ; 2 s4 * 3 = 6 ; ans 6

Why: in plain ``modchain`` step ``i`` reads operation ``i`` from the prompt by position
alone, and the testbed's 4-layer student did not learn that at horizon 16 (0.180 after
4,000 SFT steps; a curriculum over lengths 0.156). Teacher-forced, that base writes every
word right but the operation from step 7 on (0.27-0.98 by step) and two results that follow
it (``docs/results/step_tokens.md``). Here step ``i`` writes its label (the successor of the
previous step's, a constant offset back) right before its operation, so the operation and
operand are the words that follow the same label in the prompt: an induction-head copy, what
attention does well. 7 tokens per step, ``7h + 3`` with ``<eos>``; the labels are the
family's extra words, so its models get the extended tokenizer. Horizons 1 to
:data:`MAX_HORIZON`.

Measured (the 4-layer base, 4,000 SFT steps, seed 0, greedy validation accuracy): 1.000 at
horizon 8; 0.316 at horizon 16, where teacher-forced every word is right but the operation
and operand of step 9 (0.43, 0.73) and the operand of step 16 (0.77); seed 1: 0.152, so
that recipe does not learn horizon 16 reliably; at lr 1e-3 over 1,200 steps it does (1.000
and 0.980 with seeds 0 and 1; ``opd.testbed.builder.LONG_WARMUP``). Format 1 wrote the
label first (``s1 3 + 4 = 0 ;``, the operation two words after it): 0.172 at horizon 16,
the operation of steps 6 on wrong as in plain ``modchain`` (:data:`FORMAT` keys the bases).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from opd.testbed import modchain, steps
from opd.testbed.modchain import ModChainSpec, random_spec  # noqa: F401 (the family's spec and draw)
from opd.testbed.tokenizer import EQ

KEYWORD = "chain"
MAX_HORIZON = 32
# 2: the label after the step's first word (``3 s1 + 4 = 0 ;``), so the operation is copied
# from after the same label in the prompt; 1 wrote it first (``s1 3 + 4 = 0 ;``)
FORMAT = 2
LABELS = tuple(f"s{i}" for i in range(1, MAX_HORIZON + 1))
WORDS = (KEYWORD, *LABELS)


def prompt_text(spec: ModChainSpec) -> str:
    body = [w for label, (op, d) in zip(LABELS, spec.ops) for w in (label, op, str(d))]
    return " ".join([KEYWORD, str(spec.m), "start", str(spec.start), *body, EQ])


def parse_prompt(words: Sequence[str]) -> ModChainSpec | None:
    """The spec, or ``None`` when the words are not this family's prompt (labels in order)."""
    if len(words) < 8 or (len(words) - 5) % 3 or words[0] != KEYWORD or words[-1] != EQ:
        return None
    triples = [words[i:i + 3] for i in range(4, len(words) - 1, 3)]
    if len(triples) > MAX_HORIZON or any(t[0] != label for t, label in zip(triples, LABELS)):
        return None
    return modchain.parse_prompt([modchain.KEYWORD, *words[1:4], *[w for t in triples for w in t[1:]], EQ])


def reference_steps(spec: ModChainSpec) -> list[list[str]]:
    return [[step[0], label, *step[1:]] for label, step in zip(LABELS, modchain.reference_steps(spec))]


answer_text = modchain.answer_text


def solution_text(spec: ModChainSpec) -> str:
    return steps.write_solution(reference_steps(spec), answer_text(spec))


def _unlabeled(words: Sequence[str]) -> list[str]:
    return [*words[:1], *words[2:]]


def next_token(spec: ModChainSpec, committed: Sequence[tuple[str, ...]], cur: Sequence[str]):
    """The intended next word (see :mod:`opd.testbed.steps`): the step of
    :func:`opd.testbed.modchain.next_token` on the words without the labels, with step
    ``i``'s label after its first word. Labels have no plausible wrong words (like ``=``):
    the oracle's noise never writes another label."""
    k, unlabeled = len(committed), [_unlabeled(step) for step in committed]
    if k >= spec.horizon:
        return modchain.next_token(spec, unlabeled, cur)
    if len(cur) == 1:
        return (LABELS[k], ()) if modchain.next_token(spec, unlabeled, cur)[0] is not None else (None, ())
    if len(cur) > 1 and cur[1] != LABELS[k]:
        return None, ()
    return modchain.next_token(spec, unlabeled, _unlabeled(cur))


GRAMMAR = steps.Grammar(KEYWORD, parse_prompt, next_token)


@dataclass
class LabeledModChainTask(modchain.ModChainTask):
    """:class:`~opd.testbed.modchain.ModChainTask` written with labels (``task=modchain_labeled``)."""

    name: str = "modchain_labeled"
    words: tuple[str, ...] = WORDS
    family = sys.modules[__name__]

    def __post_init__(self):
        if not 1 <= self.horizon <= MAX_HORIZON:
            raise ValueError(f"modchain_labeled has labels for horizons 1 to {MAX_HORIZON}, not {self.horizon}")

    @property
    def solution_tokens(self) -> int:
        """Length of a reference completion in tokens, ``<eos>`` included."""
        return 7 * self.horizon + 3
