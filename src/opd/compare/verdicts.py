"""Verdicts generated from the numbers, by one stated rule.

The rule (:data:`RULE`): for labels A and B run on the same seeds, take the per-seed
differences ``d_s = a_s − b_s`` of the final test metric (a sentence states the winner's
difference, so it is positive; ``mean_diff`` and ``interval`` in the record are of ``a − b``). "A beats B" only when the 95%
percentile bootstrap interval of the mean of ``d`` (:data:`RESAMPLES` resamples of the
seeds with replacement, a fixed generator) lies above 0; "B beats A" when it lies below 0;
otherwise "no difference measured". With one seed there is no interval and no verdict.

Sequences to a target: a run's first evaluation whose accuracy reaches ``target`` (a
fraction of the teacher's measured test accuracy) gives the sequences it used; a label's
number is the mean over its seeds when every seed reached it, else it did not reach it
(how many seeds did is shown). A ratio of two labels is given only when both reached it.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
RULE = (f"A beats B only when the {LEVEL:.0%} percentile bootstrap interval ({RESAMPLES:,} resamples of the "
        "seeds) of the mean per-seed difference of final test accuracy excludes 0; otherwise no difference measured "
        "(the same rule for every other metric named, on the metric's own scale)")


def bootstrap_interval(diffs: list[float], *, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The percentile interval of the mean of ``diffs`` at :data:`LEVEL`."""
    d = np.asarray(diffs, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(1)
    tail = (1 - LEVEL) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def verdict(a: str, b: str, a_by_seed: dict, b_by_seed: dict, beats: str = "beats") -> dict:
    """The rule applied to labels ``a`` and ``b`` (final metric per seed, seeds as keys);
    ``beats`` is the sentence's verb for "higher" (a metric that is not a score says "is above")."""
    seeds = sorted(set(a_by_seed) & set(b_by_seed), key=str)
    diffs = [a_by_seed[s] - b_by_seed[s] for s in seeds]
    out = {"a": a, "b": b, "seeds": seeds, "mean_diff": float(np.mean(diffs)) if diffs else math.nan}
    if len(diffs) < 2 or any(math.isnan(x) for x in diffs):
        return {**out, "interval": None, "verdict": "none",
                "sentence": f"{a} vs {b}: no verdict ({len(diffs)} paired seed(s); the rule needs at least 2)"}
    lo, hi = bootstrap_interval(diffs)
    span = lambda m, l, h: f"mean difference {m:+.3f}, {LEVEL:.0%} interval [{l:+.3f}, {h:+.3f}] over {len(diffs)} seeds"  # noqa: E731
    if lo > 0:
        kind, sentence = "a", f"{a} {beats} {b} ({span(out['mean_diff'], lo, hi)})"
    elif hi < 0:  # said of b − a, so that the winner's difference is positive
        kind, sentence = "b", f"{b} {beats} {a} ({span(-out['mean_diff'], -hi, -lo)})"
    else:
        kind, sentence = "none", f"no difference measured between {a} and {b} ({span(out['mean_diff'], lo, hi)})"
    return {**out, "interval": [lo, hi], "verdict": kind, "sentence": sentence}


def all_verdicts(finals: dict[str, dict], beats: str = "beats") -> list[dict]:
    """The rule for every pair of labels, in the spec's order."""
    labels = list(finals)
    return [verdict(a, b, finals[a], finals[b], beats) for i, a in enumerate(labels) for b in labels[i + 1:]]


def metric_verdicts(per_metric: dict[str, dict[str, dict]]) -> dict[str, list[dict]]:
    """:func:`all_verdicts` for each further metric: ``{metric: {label: {seed: value}}}``.
    Its sentences say "A is above B", not "beats": for some metrics (a false-alarm rate)
    lower is better, and the reader is told which."""
    return {metric: all_verdicts(finals, "is above") for metric, finals in per_metric.items()}


def at_budget(labels: dict, budget: float) -> dict[str, dict]:
    """``{label: {seed: accuracy}}`` read off each run's curve (``results.json``'s
    ``labels[*]["curves"]``: ``[sequences, accuracy]`` pairs) at the evaluation that used
    exactly ``budget`` sequences; a run without one is left out (so its label gets no
    verdict at that budget). With a constant learning rate a run's state at ``budget`` is
    that of a run stopped there, so these are the finals of a run at that budget, with the
    learning rate tuned at the full one."""
    out = {}
    for label, entry in labels.items():
        at = {seed: acc for seed, curve in entry["curves"].items() for seqs, acc in curve if seqs == budget}
        if len(at) == len(entry["curves"]):
            out[label] = at
    return out


def sequences_to(history: list[dict], threshold: float) -> float | None:
    """The sequences used at the first evaluation whose accuracy reaches ``threshold``."""
    for row in history:
        if row.get("eval/accuracy", -math.inf) >= threshold:
            return float(row["usage/sequences"])
    return None


def target_summary(histories: dict, threshold: float) -> dict:
    """``{"per_seed", "reached", "mean"}``: sequences to ``threshold`` for each seed's run."""
    per_seed = {seed: sequences_to(h, threshold) for seed, h in histories.items()}
    reached = sum(v is not None for v in per_seed.values())
    mean = float(np.mean(list(per_seed.values()))) if reached == len(per_seed) and per_seed else None
    return {"per_seed": per_seed, "reached": reached, "mean": mean}
