"""The method registry: one line per method; each module's ``build(**knobs) -> Method``."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from opd.methods import gkd, grpo, opd, sft
from opd.methods.base import Method

METHODS: dict[str, Callable[..., Method]] = {
    "sft": sft.build,
    "grpo": grpo.build,
    "opd": opd.build,
    "gkd": gkd.build,
}


def method_knobs(name: str) -> dict[str, Any]:
    """The knobs a method takes, with their defaults (from its builder's signature)."""
    params = inspect.signature(METHODS[name]).parameters.values()
    return {p.name: p.default for p in params}


def build_method(name: str, settings: dict[str, Any]) -> Method:
    """Build ``name`` from the knobs it names, taken from a flat settings mapping."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    knobs = {k: settings[k] for k in method_knobs(name) if k in settings}
    return METHODS[name](**knobs)
