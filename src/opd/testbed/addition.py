"""Multi-digit addition, written digit by digit with carries (horizon = number of digits).

Numbers are written least-significant digit first, so each carry is local. Step ``i``
copies the two operand digits and the carry in, then writes the two-digit sum (tens,
units)::

    prompt:   add a_1 .. a_h + b_1 .. b_h =
    step i:   a_i b_i c_i = t_i u_i ;        c_1 = 0, c_i = t_{i-1}, t_i u_i = a_i+b_i+c_i
    answer:   ans u_1 .. u_h t_h              (the sum, least-significant digit first)

Horizon 4 (5472 + 8915 = 14387)::

    add 2 7 4 5 + 5 1 9 8 =
    2 5 0 = 0 7 ; 7 1 0 = 0 8 ; 4 9 0 = 1 3 ; 5 8 1 = 1 4 ; ans 7 8 3 4 1

7 tokens per step, ``8h + 3`` tokens with ``<eos>``. A correction redoes the step:
``2 5 0 = 0 8 wait 2 5 0 = 0 7 ;``. Any wrong step makes the answer wrong.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Sequence

from opd.testbed import steps
from opd.tasks.base import Problem
from opd.testbed.steps import at, digit, fits, others
from opd.testbed.tokenizer import DIGITS, EQ, SEP

KEYWORD = "add"
STEP = ["d", "d", "d", EQ, "d", "d"]  # a b c = t u  (then ";")
CARRIES = ["0", "1"]


@dataclass(frozen=True)
class AdditionSpec:
    a: tuple[int, ...]  # least-significant digit first
    b: tuple[int, ...]

    @property
    def horizon(self) -> int:
        return len(self.a)


def random_spec(rng: random.Random, horizon: int) -> AdditionSpec:
    a = tuple(rng.randrange(10) for _ in range(horizon))
    return AdditionSpec(a, tuple(rng.randrange(10) for _ in range(horizon)))


def prompt_text(spec: AdditionSpec) -> str:
    return " ".join([KEYWORD, *map(str, spec.a), "+", *map(str, spec.b), EQ])


def parse_prompt(words: Sequence[str]) -> AdditionSpec | None:
    if len(words) < 5 or len(words) % 2 == 0 or words[0] != KEYWORD or words[-1] != EQ:
        return None
    h = (len(words) - 3) // 2
    a, plus, b = words[1 : 1 + h], words[1 + h], words[2 + h : 2 + 2 * h]
    if plus != "+" or any(w not in DIGITS for w in (*a, *b)):
        return None
    return AdditionSpec(tuple(map(int, a)), tuple(map(int, b)))


def reference_steps(spec: AdditionSpec) -> list[list[str]]:
    out, carry = [], 0
    for x, y in zip(spec.a, spec.b):
        s = x + y + carry
        out.append([str(x), str(y), str(carry), EQ, str(s // 10), str(s % 10)])
        carry = s // 10
    return out


def answer_text(spec: AdditionSpec) -> str:
    st = reference_steps(spec)
    return " ".join([s[5] for s in st] + [st[-1][4]])


def solution_text(spec: AdditionSpec) -> str:
    return steps.write_solution(reference_steps(spec), answer_text(spec))


def next_token(spec: AdditionSpec, committed: Sequence[tuple[str, ...]], cur: Sequence[str]):
    """The intended next word, trusting the written words (see :mod:`opd.testbed.steps`)."""
    h, k = spec.horizon, len(committed)
    if k == h:
        sources = [(i, 5) for i in range(h)] + [(h - 1, 4)]
        return steps.answer_token(committed, cur, sources, [DIGITS] * h + [CARRIES])
    if k > h or not fits(cur, STEP + [SEP]):
        return None, ()
    j = len(cur)
    if j in (0, 1):
        w = str((spec.a, spec.b)[j][k])
        return w, others(w, DIGITS)
    if j == 2:
        w = "0" if k == 0 else at(committed[k - 1], 4)
        return (w, others(w, CARRIES)) if w in DIGITS else (None, ())
    if j == 3:
        return EQ, ()
    if j in (4, 5):
        s = sum(digit(w) for w in cur[:3])
        w = str(s // 10) if j == 4 else str(s % 10)
        return w, others(w, CARRIES if j == 4 else DIGITS)
    return SEP, ()


GRAMMAR = steps.Grammar(KEYWORD, parse_prompt, next_token)


def carry_chain(spec: AdditionSpec) -> int:
    """The most carries in a row in the reference solution (steps whose carry out is 1)."""
    longest = run = 0
    for step in reference_steps(spec):
        run = run + 1 if step[4] == "1" else 0
        longest = max(longest, run)
    return longest


def in_blind_spot(problem: Problem, min_chain: int) -> bool:
    """Whether ``problem`` is an addition problem with ``min_chain`` or more carries in a row."""
    spec = problem.meta.get("spec")
    return isinstance(spec, AdditionSpec) and carry_chain(spec) >= min_chain


def blind_spot_grammar(min_chain: int) -> steps.Grammar:
    """The grammar of a teacher with a verifiable blind spot: on problems with a carry chain
    of at least ``min_chain`` carries it drops every carry that comes in, intending carry
    out 0 after carry in 1 (so its answer there is wrong); elsewhere it is :data:`GRAMMAR`."""
    def blind_next_token(spec: AdditionSpec, committed, cur):
        word, plausible = next_token(spec, committed, cur)
        if len(cur) == 4 and len(committed) < spec.horizon and cur[2] == "1" and carry_chain(spec) >= min_chain:
            return "0", others("0", CARRIES)
        return word, plausible

    return steps.Grammar(KEYWORD, parse_prompt, blind_next_token)


def two_orders_grammar(base: steps.Grammar = GRAMMAR) -> steps.Grammar:
    """The grammar of a teacher for which a step may write its two operand digits in either
    order (``a b c = t u`` or ``b a c = t u``: a + b = b + a, and the sum is checked, not the
    order). At a step's first slot both digits are intended, so the teacher's entropy there is
    legitimately about log 2 (where a != b); the second slot is then the other one. Reference
    solutions keep the order ``a b``; elsewhere it is ``base``."""
    def two_orders_next_token(spec: AdditionSpec, committed, cur):
        word, plausible = base.next_token(spec, committed, cur)
        k, j = len(committed), len(cur)
        if k < spec.horizon and j < 2 and fits(cur, STEP) and spec.a[k] != spec.b[k]:
            a, b = str(spec.a[k]), str(spec.b[k])
            if j == 0:
                return (a, b), others(a, DIGITS)
            if cur[0] == b:
                return a, others(a, DIGITS)
        return word, plausible

    return steps.Grammar(KEYWORD, parse_prompt, two_orders_next_token)


@dataclass
class AdditionTask(steps.FamilyTask):
    """``horizon``-digit addition; problems are seeded and split by a hash of the prompt."""

    horizon: int = 4
    name: str = "addition"
    family = sys.modules[__name__]

    @property
    def solution_tokens(self) -> int:
        """Length of a reference completion in tokens, ``<eos>`` included."""
        return 8 * self.horizon + 3


def swapped_solution_text(spec: AdditionSpec) -> str:
    """The reference solution in the other style: each step writes its operands ``b a``."""
    body = " ".join(" ".join([s[1], s[0], *s[2:], SEP]) for s in reference_steps(spec))
    return f"{body} ans {answer_text(spec)}"


@dataclass
class SwappedAdditionTask(AdditionTask):
    """``task=addition_swapped``: the problems of ``addition`` (same splits), with reference
    solutions in another style, each step's operand digits written ``b a`` (the answer and
    its verification are unchanged). The style of the learned teacher
    ``teacher=testbed-swapped``, a teacher that writes differently from the student.
    Corrected solutions (``correction_rate``) keep the ``a b`` order."""

    name: str = "addition_swapped"
    write = staticmethod(swapped_solution_text)  # the reference solution of a spec in this style

    def split_key(self, seed: int) -> str:
        return f"addition:{self.horizon}:{seed}"

    def make_problem(self, spec) -> Problem:
        problem = super().make_problem(spec)
        return Problem(problem.prompt, problem.answer, self.write(spec), {**problem.meta, "task": self.name})


def mixed_solution_text(spec: AdditionSpec) -> str:
    """The reference solution with each step's operands in an order drawn for it: ``b a``
    with probability 1/2 (a generator seeded by the prompt, so a problem always reads the
    same), else ``a b``."""
    rng = random.Random(prompt_text(spec))
    rows = [[s[1], s[0], *s[2:]] if rng.random() < 0.5 else s for s in reference_steps(spec)]
    return steps.write_solution(rows, answer_text(spec))


@dataclass
class MixedAdditionTask(SwappedAdditionTask):
    """``task=addition_mixed``: the problems of ``addition`` (same splits), with reference
    solutions whose steps write their operands in either order, each with probability 1/2
    (:func:`mixed_solution_text`). A student trained on them can finish a step it opens
    either way, which the two-order oracle (``oracle_two_orders``) allows; a student trained
    on ``addition`` opens with ``a`` and cannot finish a step opened with ``b`` (the order
    probe of its base: ``docs/results/eopd_orders_tune2/base_probe.json``)."""

    name: str = "addition_mixed"
    write = staticmethod(mixed_solution_text)
