"""The testbed's task families, by name (tasks) and by prompt keyword (oracle grammars)."""

from __future__ import annotations

from opd.testbed import addition, modchain, modchain_labeled, ring
from opd.testbed.steps import Grammar

TASKS = {
    "addition": addition.AdditionTask,
    "addition_swapped": addition.SwappedAdditionTask,
    "addition_mixed": addition.MixedAdditionTask,
    "modchain": modchain.ModChainTask,
    "modchain_labeled": modchain_labeled.LabeledModChainTask,
    "ring": ring.RingTask,
}

GRAMMARS: dict[str, Grammar] = {g.keyword: g for g in (addition.GRAMMAR, modchain.GRAMMAR, modchain_labeled.GRAMMAR, ring.GRAMMAR)}


def make_task(name: str, horizon: int = 4, **kw):
    """A testbed task by name, e.g. ``make_task("modchain", 6, moduli=(7,))``."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](horizon=horizon, **kw)
