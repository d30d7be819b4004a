"""The method registry: one line per method; each module's ``build(**knobs) -> Method``."""

from __future__ import annotations

import inspect
import sys
import typing
from typing import Annotated, Any, Callable

from pydantic import Field
from pydantic.fields import FieldInfo

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


def _is_knob(annotation: Any) -> bool:
    return typing.get_origin(annotation) is Annotated and any(isinstance(m, FieldInfo) for m in annotation.__metadata__)


def _parameters(name: str, methods: dict[str, Callable[..., Method]] | None = None) -> list[tuple[str, Any, Any]]:
    """(parameter, annotation, default) of every parameter of the method's builder."""
    build = (methods or METHODS)[name]
    hints = typing.get_type_hints(build, include_extras=True)
    return [(p.name, hints[p.name], p.default) for p in inspect.signature(build).parameters.values()]


def method_knobs(name: str) -> dict[str, Any]:
    """The knobs a method takes, with their defaults (its builder's knob parameters)."""
    return {p: default for p, annotation, default in _parameters(name) if _is_knob(annotation)}


def method_settings(name: str, methods: dict[str, Callable[..., Method]] | None = None) -> list[str]:
    """The run settings a method's builder reads besides its knobs (e.g. ``max_new_tokens``)."""
    return [p for p, annotation, _ in _parameters(name, methods) if not _is_knob(annotation)]


def knob_fields(methods: dict[str, Callable[..., Method]] | None = None) -> dict[str, tuple[Any, Any]]:
    """Every method's knobs as config fields, ``name -> (annotation, default)``, in registry
    order; the help text names the methods that take the knob. A knob several methods take
    must agree on its annotation and default (declare it once in :mod:`opd.methods.knobs`)."""
    found: dict[str, tuple[Any, Any, list[str]]] = {}
    for name in methods or METHODS:
        for knob_name, annotation, default in _parameters(name, methods):
            if not _is_knob(annotation):
                continue
            if knob_name in found and found[knob_name][:2] != (annotation, default):
                other = found[knob_name][2][0]
                raise TypeError(
                    f"knob {knob_name!r} is declared differently by methods {other!r} and {name!r} "
                    f"({found[knob_name][:2]} vs {(annotation, default)}); declare it once in opd.methods.knobs"
                )
            found.setdefault(knob_name, (annotation, default, []))[2].append(name)
    return {k: (a, Field(default, description=f"{', '.join(owners)}: {_help(a)}")) for k, (a, default, owners) in found.items()}


def _help(annotation: Any) -> str:
    return next(m.description for m in annotation.__metadata__ if isinstance(m, FieldInfo))


def method_recipe(name: str) -> dict[str, Any]:
    """Run settings the method's source uses (temperature, group size, ...), applied under
    the user's own settings by ``opd train``."""
    return dict(METHODS[name].info.recipe)


def teacher_kind(name: str) -> str:
    """What teacher a method needs at its defaults: ``full`` (the whole next-token distribution:
    a local model), ``top-K`` (log-probs a server returns), ``self`` (the student in another
    context) or ``none``."""
    method = build_method(name, {})
    if "full_teacher" in method.needs:
        return "full"
    if "teacher" in method.needs:
        return "top-K"
    return "self" if method.teacher_request is not None else "none"


def methods_table() -> str:
    """The README's Markdown table of every registered method."""
    rows = ["| method | paper | fixes | source | teacher | run it on the testbed |", "|---|---|---|---|---|---|"]
    for name, build in METHODS.items():
        info = build.info
        rows.append(f"| `{name}` | {info.paper} | {info.fixes} | {info.source} | {teacher_kind(name)} | `opd train method={name}` |")
    return "\n".join(rows)


def describe_methods() -> str:
    """``opd methods``: each method with its summary, the pitfall it fixes, its knobs and recipe."""
    lines = []
    for name, build in METHODS.items():
        info = build.info
        doc = (sys.modules[build.__module__].__doc__ or "").strip().splitlines()[0]
        knobs = ", ".join(f"{k}={v!r}" for k, v in method_knobs(name).items())
        recipe = " ".join(f"{k}={v}" for k, v in info.recipe.items())
        lines += [f"{name}: {doc}", f"    fixes: {info.fixes} | source: {info.source} | {info.paper} | teacher: {teacher_kind(name)}",
                  f"    knobs: {knobs or '(none)'}"]
        lines += [f"    recipe: {recipe}"] if recipe else []
    return "\n".join(lines)


def build_method(name: str, settings: dict[str, Any], methods: dict[str, Callable[..., Method]] | None = None) -> Method:
    """Build ``name`` from the knobs and run settings its builder names, taken from a flat
    settings mapping."""
    methods = methods or METHODS
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(methods))}")
    args = {p: settings[p] for p, _, _ in _parameters(name, methods) if p in settings}
    return methods[name](**args)
