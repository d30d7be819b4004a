"""Verdicts generated from the numbers, by one stated rule.

The rule (:data:`RULE`): for labels A and B run on the same seeds, take the per-seed
differences ``d_s = a_s − b_s`` of the final test metric (a sentence states the winner's
difference, so it is positive; ``mean_diff`` and ``interval`` in the record are of ``a − b``). "A beats B" only when the 95%
percentile bootstrap interval of the mean of ``d`` (:data:`RESAMPLES` resamples of the
seeds with replacement, a fixed generator) lies above 0; "B beats A" when it lies below 0;
otherwise "no difference measured". With one seed there is no interval and no verdict.

Many pairs in one comparison: :func:`all_verdicts` also gives each pair its bootstrap p-value
(``p``: twice the smaller share of resampled means on either side of 0, from the same
resamples as the interval) and applies Holm's step-down correction over the comparison's
pairs at the same level (``holm``: True where a "beats" verdict stays, False where it goes,
None for a pair without one). The report states how many stay; the verdicts themselves keep
the one rule above. With 5 seeds no paired sign-flip (permutation) test can go below
p = 2/2^5 = 0.0625: the bootstrap rule is the more liberal of the two, and says so.

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


def _resampled_means(diffs: list[float], resamples: int, seed: int) -> np.ndarray:
    d = np.asarray(diffs, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    return d[idx].mean(1)


def bootstrap_interval(diffs: list[float], *, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The percentile interval of the mean of ``diffs`` at :data:`LEVEL`."""
    means = _resampled_means(diffs, resamples, seed)
    tail = (1 - LEVEL) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def bootstrap_p(diffs: list[float], *, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """``min(1, 2·min(P*(mean ≤ 0), P*(mean ≥ 0)))`` over the same resamples as
    :func:`bootstrap_interval`: below ``1 − LEVEL`` about when that interval excludes 0."""
    means = _resampled_means(diffs, resamples, seed)
    return float(min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean())))


def holm(p_values: list[float], alpha: float = 1 - LEVEL) -> list[bool]:
    """Holm's step-down test: sorted ascending, ``p_(i)`` is rejected while
    ``p_(i) ≤ alpha / (m − i)`` (i from 0) holds for it and every smaller one."""
    order, rejected = sorted(range(len(p_values)), key=lambda i: p_values[i]), [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


def sign_flip_p(diffs: list[float]) -> float:
    """The exact two-sided paired sign-flip test of mean 0: the share of the ``2^n`` sign
    patterns whose mean is at least as far from 0 as the observed one."""
    d = np.asarray(diffs, dtype=float)
    signs = np.array(np.meshgrid(*[[1.0, -1.0]] * len(d))).reshape(len(d), -1).T
    return float((np.abs(signs @ d) >= abs(d.sum()) - 1e-12).mean())


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
    out["p"] = bootstrap_p(diffs)
    span = lambda m, l, h: f"mean difference {m:+.3f}, {LEVEL:.0%} interval [{l:+.3f}, {h:+.3f}] over {len(diffs)} seeds"  # noqa: E731
    if lo > 0:
        kind, sentence = "a", f"{a} {beats} {b} ({span(out['mean_diff'], lo, hi)})"
    elif hi < 0:  # said of b − a, so that the winner's difference is positive
        kind, sentence = "b", f"{b} {beats} {a} ({span(-out['mean_diff'], -hi, -lo)})"
    else:
        kind, sentence = "none", f"no difference measured between {a} and {b} ({span(out['mean_diff'], lo, hi)})"
    return {**out, "interval": [lo, hi], "verdict": kind, "sentence": sentence}


def all_verdicts(finals: dict[str, dict], beats: str = "beats") -> list[dict]:
    """The rule for every pair of labels, in the spec's order, each with ``holm``: whether a
    "beats" verdict stays under Holm's correction over the pairs that have a p-value."""
    labels = list(finals)
    found = [verdict(a, b, finals[a], finals[b], beats) for i, a in enumerate(labels) for b in labels[i + 1:]]
    tested = [v for v in found if "p" in v]
    for v, stays in zip(tested, holm([v["p"] for v in tested])):
        v["holm"] = stays if v["verdict"] != "none" else None
    return found


def holm_summary(found: list[dict]) -> dict:
    """``{"pairs", "beats", "stay", "go"}``: how many "beats" verdicts Holm's correction keeps
    (``go``: the sentences of those it does not)."""
    decided = [v for v in found if v["verdict"] != "none"]
    gone = [v["sentence"] for v in decided if v.get("holm") is False]
    return {"pairs": sum("p" in v for v in found), "beats": len(decided), "stay": len(decided) - len(gone), "go": gone}


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
