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
4,000 SFT steps; a curriculum over lengths 0.156): its first mistake fell at step 0 in
73-100% of rollouts, as if it located the operands by their offset from the prompt's end,
which a longer prompt moves (``opd.testbed.builder``). Here step ``i`` writes its label
(the successor of the previous step's, a constant offset back) and copies the two words
after the same label in the prompt (a content match, what attention does well). 7 tokens
per step, ``7h + 3`` with ``<eos>``; the labels are the family's extra words, so its models
get the extended tokenizer. Horizons 1 to :data:`MAX_HORIZON`.

Measured: the 4-layer base's SFT recipe did not learn it at horizon 16 either (0.172 greedy
validation accuracy after 4,000 steps, its loss flat at 0.15 from step 2,000), so the
labels alone are not what that recipe lacked.
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
