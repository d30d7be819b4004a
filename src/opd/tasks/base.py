"""The task contract shared by the synthetic testbed and real datasets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Problem:
    prompt: str  # what the model is given
    answer: str  # the final answer, as the verifier compares it
    solution: str = ""  # a reference completion (chain of thought and answer), may be empty
    meta: dict = field(default_factory=dict, compare=False, hash=False)  # task-specific data


class Task(Protocol):
    name: str

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """``n`` seeded problems from ``split`` ("train", "val" or "test"); splits are disjoint."""
        ...

    def extract_answer(self, completion: str) -> str | None: ...

    def verify(self, problem: Problem, completion: str) -> bool: ...
