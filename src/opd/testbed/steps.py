"""What the testbed's task families share: the solution grammar, splits, answer checking.

Solution grammar (every family)::

    solution := step* answer
    step     := <family-specific tokens> ";"
    answer   := "ans" <answer tokens>            (the completion then ends with <eos>)
    correction: "wait" may follow any token; it discards the step in progress and the
                step is then written again from its first token (the *redone step*).
                A "wait" right after ";" redoes the step that ";" just closed.
    legal action: a family may name written words that differ from the intended one but
                are not mistakes (:attr:`Grammar.legal`; the ring walk's other move):
                the solution goes on from them.

The oracle that recovers emits ``wait`` immediately after the first wrong token of a step
(the correction onset), then the step in full. Reference solutions never contain ``wait``.
Only the final answer counts: :func:`extract_answer` reads the words after the *last*
``ans``, so corrected solutions verify like clean ones.

A family plugs into the oracle through a :class:`Grammar`: ``parse_prompt(words)`` returns
the problem's spec (or ``None`` if the prompt is not this family's), and
``next_token(spec, committed, cur)`` says which word comes next when the closed steps are
``committed`` (tuples of words, without ";") and the step in progress holds ``cur``,
trusting what was written. It returns ``(word, plausible_wrong_words)``, or ``(None, ())``
when the written words do not fit the grammar. Step ``len(committed) == horizon`` is the
answer.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from opd.tasks.base import Problem
from opd.testbed.tokenizer import ANS, BOS, DIGITS, EOS, OPS, PAD, SEP, WAIT

SPLITS = ("train", "val", "test")
NextToken = tuple[str | None, tuple[str, ...]]


@dataclass(frozen=True)
class Grammar:
    keyword: str  # the prompt's first word, which tells the family
    parse_prompt: Callable[[Sequence[str]], Any]
    next_token: Callable[[Any, Sequence[tuple[str, ...]], Sequence[str]], NextToken]
    # ``legal(spec, committed, cur, word)``: whether ``word``, written where another was
    # intended, is a legal action the solution goes on from (the ring walk's other move),
    # not a mistake; the recovering oracle then continues from it instead of saying ``wait``.
    legal: Callable[[Any, Sequence[tuple[str, ...]], Sequence[str], str], bool] | None = None


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a hash of its text: 80% train, 10% val, 10% test."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    return "train" if h < 80 else "val" if h < 90 else "test"


def sample_split(
    draw: Callable[[random.Random], Problem], split: str, n: int, key: str
) -> list[Problem]:
    """``n`` problems from ``draw`` whose prompt hashes into ``split`` (seeded by ``key``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{key}:{split}")
    out: list[Problem] = []
    for _ in range(1000 * max(n, 1)):
        if len(out) == n:
            break
        p = draw(rng)
        if split_of(p.prompt) == split:
            out.append(p)
    if len(out) < n:
        raise RuntimeError(f"could not draw {n} {split} problems ({key})")
    return out


def corrected_solution(spec, reference: list[list[str]], answer: str, next_token, rng: random.Random) -> str:
    """A reference solution with one corrected step: in a random step, at a random position
    where the grammar names plausible wrong words, one of them, then ``wait`` and the whole
    step again (``... 3 + 4 = 1 wait 3 + 4 = 0 ; ...``). It verifies like the reference
    (the answer is after the last ``ans``)."""
    k = rng.randrange(len(reference))
    committed = [tuple(step) for step in reference[:k]]
    spots = [(j, wrong) for j in range(len(reference[k])) if (wrong := next_token(spec, committed, reference[k][:j])[1])]
    j, wrong = rng.choice(spots)
    words = [w for step in reference[:k] for w in step + [SEP]]
    words += reference[k][:j] + [rng.choice(wrong), WAIT] + reference[k] + [SEP]
    words += [w for step in reference[k + 1:] for w in step + [SEP]]
    return " ".join(words + [ANS, answer])


class FamilyTask:
    """What the testbed's task classes share. A subclass (a dataclass with ``horizon`` and
    ``name``) sets ``family`` to its module, whose ``random_spec``, ``prompt_text``,
    ``answer_text``, ``solution_text``, ``reference_steps`` and ``next_token`` it uses; it may
    override :meth:`draw_spec` and :meth:`split_key` (the seed of its problem streams)."""

    family: Any

    def draw_spec(self, rng: random.Random):
        return self.family.random_spec(rng, self.horizon)

    def split_key(self, seed: int) -> str:
        return f"{self.name}:{self.horizon}:{seed}"

    def make_problem(self, spec) -> Problem:
        meta = {"task": self.name, "horizon": spec.horizon, "spec": spec}
        f = self.family
        return Problem(f.prompt_text(spec), f.answer_text(spec), f.solution_text(spec), meta)

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        return sample_split(lambda rng: self.make_problem(self.draw_spec(rng)), split, n, self.split_key(seed))

    def draw_mixed(self, rng: random.Random, shorter_rate: float = 0.0):
        """A spec of ``horizon`` steps; with probability ``shorter_rate``, one of a horizon drawn
        uniformly from ``1 .. horizon - 1`` instead (a curriculum over lengths). At rate 0 the
        stream is :meth:`draw_spec`'s, draw for draw."""
        if shorter_rate <= 0 or self.horizon == 1 or rng.random() >= shorter_rate:
            return self.draw_spec(rng)
        return replace(self, horizon=rng.randint(1, self.horizon - 1)).draw_spec(rng)

    def pool(self, split: str, n: int, seed: int, correction_rate: float = 0.0, shorter_rate: float = 0.0) -> "SplitPool":
        """``n`` problems of ``split`` drawn on demand (:class:`SplitPool`), ``correction_rate``
        of them with one corrected step in their solution, ``shorter_rate`` of them of a
        shorter horizon (:meth:`draw_mixed`)."""
        f = self.family

        def correct(problem: Problem, rng: random.Random) -> str:
            spec = problem.meta["spec"]
            return corrected_solution(spec, f.reference_steps(spec), f.answer_text(spec), f.next_token, rng)

        return SplitPool(lambda rng: self.make_problem(self.draw_mixed(rng, shorter_rate)), split, n, self.split_key(seed),
                         correct=correct, correction_rate=correction_rate)

    def extract_answer(self, completion: str) -> str | None:
        return extract_answer(completion)

    def verify(self, problem: Problem, completion: str) -> bool:
        return verify(problem, completion)


class SplitPool(Sequence):
    """``n`` problems of ``split`` drawn on demand: problem ``i`` is the first draw of its own
    stream (seeded ``key:split:i``) whose prompt hashes into ``split``. A training pool far
    larger than a step's draw costs nothing at set-up; the same ``i`` is always the same
    problem."""

    def __init__(self, draw: Callable[[random.Random], Problem], split: str, n: int, key: str,
                 correct: Callable[[Problem, random.Random], str] | None = None, correction_rate: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.draw, self.split, self.n, self.key = draw, split, n, key
        self.correct, self.correction_rate = correct, correction_rate

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(f"problem {i} of a pool of {self.n}")
        rng = random.Random(f"{self.key}:{self.split}:{i % self.n}")
        for _ in range(1000):
            p = self.draw(rng)
            if split_of(p.prompt) == self.split:
                return self._maybe_corrected(p, i % self.n)
        raise RuntimeError(f"could not draw a {self.split} problem ({self.key}, {i})")


    def _maybe_corrected(self, problem: Problem, i: int) -> Problem:
        """With probability ``correction_rate`` (its own stream per problem), the problem with
        a corrected solution (:func:`corrected_solution`)."""
        if self.correct is None or self.correction_rate <= 0:
            return problem
        rng = random.Random(f"{self.key}:{self.split}:{i}:correction")
        if rng.random() >= self.correction_rate:
            return problem
        return Problem(problem.prompt, problem.answer, self.correct(problem, rng), problem.meta)


def write_solution(reference: Sequence[Sequence[str]], answer: str) -> str:
    """A solution's text: each step's words and ``;``, then ``ans`` and the answer."""
    return " ".join([w for step in reference for w in [*step, SEP]] + [ANS, answer])


def extract_answer(completion: str) -> str | None:
    """The digits after the last ``ans`` (up to ``<eos>``), space-separated; else ``None``."""
    words = [w for w in completion.split() if w not in (PAD, BOS)]
    if EOS in words:
        words = words[: words.index(EOS)]
    if ANS not in words:
        return None
    tail = words[len(words) - 1 - words[::-1].index(ANS) + 1 :]
    if not tail or any(w not in DIGITS for w in tail):
        return None
    return " ".join(tail)


def verify(problem: Problem, completion: str) -> bool:
    """Exact match of the extracted final answer."""
    return extract_answer(completion) == problem.answer


def digit(word: str | None) -> int | None:
    return int(word) if word in DIGITS else None


def at(seq: Sequence, i: int):
    """``seq[i]`` or ``None`` when out of range."""
    return seq[i] if 0 <= i < len(seq) else None


def fits(words: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether ``words`` is a prefix of ``pattern`` ("d": any digit, "op": an operator)."""
    if len(words) > len(pattern):
        return False
    for w, p in zip(words, pattern):
        ok = w in DIGITS if p == "d" else w in OPS if p == "op" else w == p
        if not ok:
            return False
    return True


def others(word: str, pool: Sequence[str]) -> tuple[str, ...]:
    """The plausible-but-wrong alternatives to ``word``: the rest of its pool."""
    return tuple(w for w in pool if w != word)


def answer_token(committed: Sequence[tuple[str, ...]], cur: Sequence[str], sources, pools):
    """Next word of the answer segment ``ans w_1 .. w_n <eos>``.

    ``sources[j] = (step, slot)`` says where answer word ``j`` is copied from among the
    committed steps; ``pools[j]`` its plausible alternatives.
    """
    j = len(cur)
    if not fits(cur, [ANS] + ["d"] * len(sources)):
        return None, ()
    if j == 0:
        return ANS, ()
    if j == len(sources) + 1:
        return EOS, ()
    step, slot = sources[j - 1]
    w = at(committed[step], slot) if step < len(committed) else None
    if w not in DIGITS:
        return None, ()
    return w, others(w, pools[j - 1])
