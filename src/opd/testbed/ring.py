"""A walk on a ring to a target (horizon = the distance: the optimal number of moves).

The testbed's *recoverable* task, the setting of DAgger. A move is ``+`` or ``-`` (one
place around the ring Z_m); a wrong move leaves the walk at a valid state from which the
target can still be reached, one move later and back. The oracle is DAgger's expert: from
whatever state the student's moves led to, it names the move toward the target (the other
move is a *legal* action, :func:`legal`, not a mistake). A state written wrong (an
arithmetic slip) is a mistake: the recovering oracle (the default) says ``wait`` and redoes
the step; the continuing oracle (``oracle_recovers=false``) trusts the written state and
walks on from it.

States are written with two digits; the modulus is in the prompt::

    prompt:  ring m1 m2 start s1 s2 ; t1 t2 =
    step:    op v1 v2 ;                 v = (v_prev ± 1) mod m,  v_0 = s
    answer:  ans t1 t2

Horizon 3 on Z_31, from 29 to 1 (the short way is up, through 0)::

    ring 3 1 start 2 9 ; 0 1 =
    + 3 0 ; + 0 0 ; + 0 1 ; ans 0 1

4 tokens per step, ``4h + 4`` with ``<eos>``. The modulus is drawn per problem from
``2h + 1 .. 99`` (the distance is at most ``(m - 1) / 2``, so the shorter way is unique), so
a horizon holds thousands of problems (horizon 8: about 9,600, about 960 of them in the
test split) and a wrap-around happens where the modulus says, not at a fixed number.

A completion is correct when its walk, replayed under the correction grammar of
:mod:`opd.testbed.steps`, writes every state right, reaches the target within
``h + slack`` moves (slack 2: one wrong move and the move back), and answers the target.
Only the *answer* copies the prompt, so the answer alone proves nothing: the walk is checked.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Sequence

from opd.testbed import steps
from opd.tasks.base import Problem
from opd.testbed.steps import fits, others
from opd.testbed.tokenizer import ANS, DIGITS, EOS, SEP, WAIT

KEYWORD = "ring"  # not in the shared vocabulary: this family's models get it as an extra word
WORDS = (KEYWORD,)
MOVES = ("+", "-")
STEP = ["op", "d", "d"]  # op v1 v2  (then ";")
SLACK = 2


@dataclass(frozen=True)
class RingSpec:
    m: int
    start: int
    target: int

    @property
    def horizon(self) -> int:
        d = (self.target - self.start) % self.m
        return min(d, self.m - d)


MAX_MODULUS = 99  # two digits


def moduli(horizon: int) -> range:
    """The moduli a problem of ``horizon`` is drawn from: ``2h + 1 .. 99``."""
    if not 1 <= horizon <= (MAX_MODULUS - 1) // 2:
        raise ValueError(f"the ring task needs 1 <= horizon <= {(MAX_MODULUS - 1) // 2}, got {horizon}")
    return range(2 * horizon + 1, MAX_MODULUS + 1)


def two(v: int) -> list[str]:
    return [str(v // 10), str(v % 10)]


def best_move(v: int, target: int, m: int) -> str | None:
    """The move toward ``target`` along the shorter arc (``None`` at the target)."""
    d = (target - v) % m
    return None if d == 0 else "+" if d <= m // 2 else "-"


def step_to(v: int, move: str, m: int) -> int:
    return (v + 1 if move == "+" else v - 1) % m


def random_spec(rng: random.Random, horizon: int) -> RingSpec:
    m = rng.choice(moduli(horizon))
    start = rng.randrange(m)
    return RingSpec(m, start, (start + rng.choice((1, -1)) * horizon) % m)


def prompt_text(spec: RingSpec) -> str:
    return " ".join([KEYWORD, *two(spec.m), "start", *two(spec.start), SEP, *two(spec.target), "="])


def number(words: Sequence[str]) -> int | None:
    """The value of a two-digit state word pair (``["0", "7"]`` -> 7), else ``None``."""
    if len(words) != 2 or any(w not in DIGITS for w in words):
        return None
    return 10 * int(words[0]) + int(words[1])


def parse_prompt(words: Sequence[str]) -> RingSpec | None:
    if len(words) != 10 or words[0] != KEYWORD or words[3] != "start" or words[6] != SEP or words[9] != "=":
        return None
    m, start, target = number(words[1:3]), number(words[4:6]), number(words[7:9])
    if m is None or m < 3 or start is None or target is None or max(start, target) >= m:
        return None
    return RingSpec(m, start, target)


def reference_steps(spec: RingSpec) -> list[list[str]]:
    out, v = [], spec.start
    while (move := best_move(v, spec.target, spec.m)) is not None:
        v = step_to(v, move, spec.m)
        out.append([move, *two(v)])
    return out


def answer_text(spec: RingSpec) -> str:
    return " ".join(two(spec.target))


def solution_text(spec: RingSpec) -> str:
    return steps.write_solution(reference_steps(spec), answer_text(spec))


def _state(spec: RingSpec, committed: Sequence[tuple[str, ...]]) -> int | None:
    """The state the written words say the walk is in (trusting them)."""
    if not committed:
        return spec.start
    last = committed[-1]
    v = number(last[1:]) if len(last) == 3 and last[0] in MOVES else None
    return v if v is not None and v < spec.m else None


def next_token(spec: RingSpec, committed: Sequence[tuple[str, ...]], cur: Sequence[str]):
    """The intended next word from the written state (see :mod:`opd.testbed.steps`): the
    best move toward the target, its result, and ``ans`` + the target once there."""
    v = _state(spec, committed)
    if v is None:
        return None, ()
    if cur and cur[0] == ANS:
        if not fits(cur, [ANS, "d", "d"]):
            return None, ()
        j = len(cur)
        if j == 3:
            return EOS, ()
        w = two(spec.target)[j - 1]
        return w, others(w, DIGITS)
    if not fits(cur, STEP + [SEP]):
        return None, ()
    j = len(cur)
    if j == 0:
        w = best_move(v, spec.target, spec.m) or ANS
        return w, others(w, (*MOVES, ANS))
    if j in (1, 2):
        w = two(step_to(v, cur[0], spec.m))[j - 1]
        return w, others(w, DIGITS)
    return SEP, ()


def legal(spec: RingSpec, committed: Sequence[tuple[str, ...]], cur: Sequence[str], word: str) -> bool:
    """The other move is a legal action (the walk goes on from where it leads), not a mistake."""
    return not cur and word in MOVES


GRAMMAR = steps.Grammar(KEYWORD, parse_prompt, next_token, legal)


def replay(words: Sequence[str]) -> list[list[str]]:
    """The closed steps and the segment in progress after the correction grammar: ``wait``
    drops the step in progress, or the step that a ``;`` right before it closed."""
    closed: list[list[str]] = []
    cur: list[str] = []
    prev = None
    for w in words:
        if w == WAIT:
            if cur:
                cur = []
            elif closed and prev == SEP:
                closed.pop()
        elif w == SEP:
            closed.append(cur)
            cur = []
        else:
            cur.append(w)
        prev = w
    return closed + [cur]


def walk(spec: RingSpec, completion: str) -> tuple[int, int | None, bool]:
    """``(moves, state, answered)`` of a completion under the correction grammar: how many
    moves it made, the state they reached (``None`` once a move or a written state is
    wrong), and whether it then answered."""
    words = [w for w in completion.split() if w not in ("<pad>", "<bos>")]
    words = words[: words.index(EOS)] if EOS in words else words
    *moves, tail = replay(words)
    v: int | None = spec.start
    for step in moves:
        if v is None or len(step) != 3 or step[0] not in MOVES:
            v = None
            break
        v = step_to(v, step[0], spec.m)
        v = v if step[1:] == two(v) else None
    return len(moves), v, bool(tail) and tail[0] == ANS


def walk_ok(spec: RingSpec, completion: str, slack: int = SLACK) -> bool:
    """Whether the completion's walk writes every state right, reaches the target within
    ``horizon + slack`` moves, and then answers (the answer itself is checked apart)."""
    moves, state, answered = walk(spec, completion)
    return answered and moves <= spec.horizon + slack and state == spec.target


def stops_short(spec: RingSpec, completion: str) -> bool:
    """Whether a walk with every state written right answers before it reaches the target
    (a student that counts ``horizon`` moves instead of looking at the state)."""
    _, state, answered = walk(spec, completion)
    return answered and state is not None and state != spec.target


@dataclass
class RingTask(steps.FamilyTask):
    """A walk of ``horizon`` moves on a ring; seeded, hash-split. Its models need the extra
    word ``ring`` (``words``): the testbed builder gives them the extended tokenizer."""

    horizon: int = 4
    slack: int = SLACK
    name: str = "ring"
    words: tuple[str, ...] = WORDS
    family = sys.modules[__name__]

    def __post_init__(self):
        moduli(self.horizon)

    @property
    def solution_tokens(self) -> int:
        """Length of a reference completion in tokens, ``<eos>`` included."""
        return 4 * self.horizon + 4

    def verify(self, problem: Problem, completion: str) -> bool:
        spec = problem.meta.get("spec") or parse_prompt(problem.prompt.split())
        return spec is not None and steps.verify(problem, completion) and walk_ok(spec, completion, self.slack)
