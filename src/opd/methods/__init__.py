"""The method registry: one line per method; each module's ``build(**knobs) -> Method``."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from opd.methods import gkd, grpo, opd, sft
from opd.methods import dasd, minillm, opsd
from opd.methods import eopd, scope, tip, topk_lsm
from opd.methods import skd, trd
from opd.methods import gopd, srpo, stable_opd
from opd.methods import prune_opd, suffix_fade, truncation
from opd.methods.base import Method

METHODS: dict[str, Callable[..., Method]] = {
    # baselines
    "sft": sft.build,
    "grpo": grpo.build,
    "opd": opd.build,
    "gkd": gkd.build,
    "minillm": minillm.build,
    # local noise
    "topk_lsm": topk_lsm.build,
    "tip": tip.build,
    "scope": scope.build,
    "eopd": eopd.build,
    # horizon decay
    "trunc": truncation.build_trunc,
    "topd": truncation.build_topd,
    "popd": truncation.build_popd,
    "prune_opd": prune_opd.build,
    "suffix_fade": suffix_fade.build,
    "stable_opd": stable_opd.build,
    # myopic supervision (the trajectory itself changes)
    "skd": skd.build,
    "trd": trd.build,
    # beyond the teacher
    "srpo": srpo.build,
    "gopd": gopd.build,
    # self-distillation (no external teacher)
    "opsd": opsd.build,
    "dasd": dasd.build,
}


def method_knobs(name: str) -> dict[str, Any]:
    """The knobs a method takes, with their defaults (from its builder's signature)."""
    params = inspect.signature(METHODS[name]).parameters.values()
    return {p.name: p.default for p in params}


def method_recipe(name: str) -> dict[str, Any]:
    """Run settings the method's source uses (temperature, group size, ...), applied under
    the user's own settings by ``opd train``."""
    return dict(METHODS[name].info.recipe)


def methods_table() -> str:
    """The README's Markdown table of every registered method."""
    rows = ["| method | paper | fixes | source | run it on the testbed |", "|---|---|---|---|---|"]
    for name, build in METHODS.items():
        info = build.info
        rows.append(f"| `{name}` | {info.paper} | {info.fixes} | {info.source} | `opd train method={name}` |")
    return "\n".join(rows)


def build_method(name: str, settings: dict[str, Any]) -> Method:
    """Build ``name`` from the knobs it names, taken from a flat settings mapping."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    knobs = {k: settings[k] for k in method_knobs(name) if k in settings}
    return METHODS[name](**knobs)
