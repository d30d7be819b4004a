"""Chained modular arithmetic on single digits (horizon = number of operations).

A start value is pushed through ``h`` operations modulo a prime ``m`` (5 or 7 by default).
With a prime modulus every operation (``+ d``, ``- d``, ``* d`` with ``1 <= d < m``) is a
bijection, so one wrong step makes every later value, and the answer, wrong. Each step
copies the running value and the operation, then writes the result (a table lookup)::

    prompt:   mod m start v_0 o_1 d_1 .. o_h d_h =
    step i:   v_{i-1} o_i d_i = v_i ;          v_i = (v_{i-1} o_i d_i) mod m
    answer:   ans v_h

Horizon 4::

    mod 7 start 3 + 4 * 2 - 5 * 3 =
    3 + 4 = 0 ; 0 * 2 = 0 ; 0 - 5 = 2 ; 2 * 3 = 6 ; ans 6

6 tokens per step, ``6h + 3`` tokens with ``<eos>``. A correction redoes the step:
``3 + 4 = 1 wait 3 + 4 = 0 ;``.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Sequence

from opd.testbed import steps
from opd.testbed.steps import at, digit, fits, others
from opd.testbed.tokenizer import DIGITS, EQ, OPS, SEP

KEYWORD = "mod"
STEP = ["d", "op", "d", EQ, "d"]  # v o d = r  (then ";")


@dataclass(frozen=True)
class ModChainSpec:
    m: int
    start: int
    ops: tuple[tuple[str, int], ...]  # (operator, operand) per step

    @property
    def horizon(self) -> int:
        return len(self.ops)


def apply(v: int, op: str, d: int, m: int) -> int:
    return (v + d if op == "+" else v - d if op == "-" else v * d) % m


def random_spec(rng: random.Random, horizon: int, moduli: Sequence[int] = (5, 7)) -> ModChainSpec:
    m = rng.choice(list(moduli))
    ops = tuple((rng.choice(OPS), rng.randrange(1, m)) for _ in range(horizon))
    return ModChainSpec(m, rng.randrange(m), ops)


def prompt_text(spec: ModChainSpec) -> str:
    body = [w for op, d in spec.ops for w in (op, str(d))]
    return " ".join([KEYWORD, str(spec.m), "start", str(spec.start), *body, EQ])


def parse_prompt(words: Sequence[str]) -> ModChainSpec | None:
    if len(words) < 7 or len(words) % 2 == 0 or words[0] != KEYWORD or words[-1] != EQ:
        return None
    m, start = digit(words[1]), digit(words[3])
    pairs = list(zip(words[4:-1:2], words[5:-1:2]))
    if m is None or m < 2 or words[2] != "start" or start is None:
        return None
    if any(op not in OPS or digit(d) is None for op, d in pairs):
        return None
    return ModChainSpec(m, start, tuple((op, int(d)) for op, d in pairs))


def reference_steps(spec: ModChainSpec) -> list[list[str]]:
    out, v = [], spec.start
    for op, d in spec.ops:
        r = apply(v, op, d, spec.m)
        out.append([str(v), op, str(d), EQ, str(r)])
        v = r
    return out


def answer_text(spec: ModChainSpec) -> str:
    return reference_steps(spec)[-1][4]


def solution_text(spec: ModChainSpec) -> str:
    return steps.write_solution(reference_steps(spec), answer_text(spec))


def next_token(spec: ModChainSpec, committed: Sequence[tuple[str, ...]], cur: Sequence[str]):
    """The intended next word, trusting the written words (see :mod:`opd.testbed.steps`)."""
    h, k, m = spec.horizon, len(committed), spec.m
    values = DIGITS[:m]
    if k == h:
        return steps.answer_token(committed, cur, [(h - 1, 4)], [values])
    if k > h or not fits(cur, STEP + [SEP]):
        return None, ()
    j = len(cur)
    if j == 0:
        w = str(spec.start) if k == 0 else at(committed[k - 1], 4)
        return (w, others(w, values)) if w in DIGITS else (None, ())
    if j == 1:
        return spec.ops[k][0], others(spec.ops[k][0], OPS)
    if j == 2:
        w = str(spec.ops[k][1])
        return w, others(w, DIGITS[1:m])
    if j == 3:
        return EQ, ()
    if j == 4:
        w = str(apply(digit(cur[0]), cur[1], digit(cur[2]), m))
        return w, others(w, values)
    return SEP, ()


GRAMMAR = steps.Grammar(KEYWORD, parse_prompt, next_token)


@dataclass
class ModChainTask(steps.FamilyTask):
    """``horizon`` chained operations modulo a prime from ``moduli``; seeded, hash-split."""

    horizon: int = 4
    moduli: tuple[int, ...] = (5, 7)
    name: str = "modchain"
    family = sys.modules[__name__]

    def draw_spec(self, rng: random.Random) -> ModChainSpec:
        return random_spec(rng, self.horizon, self.moduli)

    def split_key(self, seed: int) -> str:
        return f"{self.name}:{self.horizon}:{','.join(map(str, self.moduli))}:{seed}"

    @property
    def solution_tokens(self) -> int:
        """Length of a reference completion in tokens, ``<eos>`` included."""
        return 6 * self.horizon + 3
