"""Checks of the ``opd compare`` spec keys that name metrics and pairs (``judge``,
``tune_metric``, ``planned``): each returns the parsed value or raises a
:class:`~opd.errors.UserError` that names the key, the problem and the fix."""

from __future__ import annotations

import re

from opd.config.train import TrainConfig
from opd.errors import UserError

JUDGEABLE = re.compile(r"^pass@[1-9]\d*$")  # further final metrics a spec may ask verdicts on (pass@1: sampled accuracy)


def _error(spec_path: str, where: str, msg: str) -> UserError:
    return UserError(f"spec '{spec_path}', {where}: {msg}")


def _measured_pass(path: str, key: str, name, base: dict) -> str:
    """``name`` when it is pass@k at the runs' ``eval_k`` (``base``: the spec's base and command line)."""
    eval_k = int(base.get("eval_k", TrainConfig.model_fields["eval_k"].default))
    if not isinstance(name, str) or not JUDGEABLE.match(name):
        raise _error(path, key, f"takes pass@k at the runs' eval_k (e.g. pass@8, or pass@1: accuracy sampled at eval_temperature); got {name!r}")
    if int(name[5:]) != eval_k:
        raise _error(path, key, f"{name} is not measured: the runs evaluate pass@{eval_k} (set `eval_k: {name[5:]}` under `base:`)")
    return name


def _judge(path: str, raw, base: dict) -> list[str]:
    if raw is None:
        return []
    return [_measured_pass(path, "judge", name, base) for name in (raw if isinstance(raw, list) else [raw])]


def _tune_metric(path: str, raw, base: dict, grid: list[float]) -> str:
    """``accuracy`` (greedy, the default) or pass@k at the runs' eval_k; only with an lr grid."""
    if raw is None or raw == "accuracy":
        return "accuracy"
    if not grid:
        raise _error(path, "tune_metric", "says how lr_grid is judged, and there is no lr_grid: add one or drop tune_metric")
    return _measured_pass(path, "tune_metric", raw, base)


def _planned(path: str, raw, methods: dict) -> list[tuple[str, str]] | None:
    """``planned:`` as pairs of labels: each ``a:b`` (or ``[a, b]``) of two distinct labels of
    ``methods:``, none twice."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise _error(path, "planned", f"lists the pairs of labels to correct over, e.g. [opd:grpo, opd:sft]; got {raw!r}")
    pairs, seen = [], set()
    for item in raw:
        pair = tuple(item.split(":")) if isinstance(item, str) else tuple(item) if isinstance(item, list) else ()
        if len(pair) != 2 or pair[0] == pair[1]:
            raise _error(path, "planned", f"{item!r} is not a pair of two labels: write it as a:b (e.g. opd:grpo)")
        unknown = [label for label in pair if label not in methods]
        if unknown:
            raise _error(path, "planned", f"{item!r} names {unknown[0]!r}, not a label under methods: "
                         f"(labels: {', '.join(methods)})")
        if frozenset(pair) in seen:
            raise _error(path, "planned", f"{item!r} is listed twice; list each pair once")
        seen.add(frozenset(pair))
        pairs.append(pair)
    return pairs
