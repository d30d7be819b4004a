"""Verdicts generated from the numbers, by one stated rule.

The rule (:data:`RULE`): for labels A and B run on the same seeds, take the per-seed
differences ``d_s = a_s − b_s`` of the final test metric (a sentence states the winner's
difference, so it is positive; ``mean_diff`` and ``interval`` in the record are of ``a − b``).
"A beats B" only when the 95% paired Student t interval of the mean of ``d``,

    mean(d) ± t_{0.975, n−1} · sd(d) / √n      (sd with n − 1 in its denominator),

lies above 0; "B beats A" when it lies below 0; otherwise "no difference measured". With one
seed there is no interval and no verdict. Its level is 5% when the differences are normal;
measured at 5 seeds (``docs/results/rule_level.md``) 3.7–6.4% for normal, heavy-tailed and
uniform differences, and 11.5% for skewed ones (a centred exponential).

The rule before (:data:`BOOTSTRAP_RULE`, ``rule="bootstrap"``; the reports published before
it changed state it): the 95% percentile bootstrap interval of the mean (:data:`RESAMPLES`
resamples of the seeds, a fixed generator). At 5 seeds that interval is about
``mean ± 1.75 · sd/√5`` against the t interval's ``± 2.78 · sd/√5``, and it excludes 0 in about
16% of comparisons where nothing differs: it said 95% and held about 84%. It stays here so
that those reports can be recomputed and checked.

Many pairs in one comparison: :func:`all_verdicts` also gives each pair the p-value of its
rule (``p``: the two-sided paired t-test's; the bootstrap's is twice the smaller share of
resampled means on either side of 0) and applies Holm's step-down correction over the
comparison's pairs at the same level (``holm``: True where a "beats" verdict stays, False
where it goes, None for a pair without one). A spec may name its ``planned`` pairs, the
questions it was written to answer, before its runs: the correction then runs over those
alone, and the other pairs' verdicts are marked exploratory (no correction claimed for
them), so that pairs nobody asked about (across horizons, say) do not dilute it. The report
states how many stay; the verdicts themselves keep the one rule above. With 5 seeds no
paired sign-flip (permutation) test can go below p = 2/2^5 = 0.0625; the t-test reaches
below it by assuming normal differences.

Sequences to a target: a run's first evaluation whose accuracy reaches ``target`` (a
fraction of the teacher's measured test accuracy) gives the sequences it used; a label's
number is the mean over its seeds when every seed reached it, else it did not reach it
(how many seeds did is shown). A ratio of two labels (:func:`sequences_ratio`) is given only
when every seed of both reached it (else, where one label's seeds all did, a lower bound
with the other's unreached seeds counted at the budget): the ratio of their means, and the geometric mean of the
per-seed ratios with the rule's t interval taken on their logarithms (paired by seed),

    exp(mean(l) ± t_{0.975, n−1} · sd(l) / √n),      l_s = ln(a_s / b_s),

so that a "5×" comes with the range the seeds allow.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
_METRIC = ("of the mean per-seed difference of final test accuracy excludes 0; otherwise no difference measured "
           "(the same rule for every other metric named, on the metric's own scale)")
RULE = f"A beats B only when the {LEVEL:.0%} paired Student t interval (n − 1 degrees of freedom) {_METRIC}"
BOOTSTRAP_RULE = (f"A beats B only when the {LEVEL:.0%} percentile bootstrap interval ({RESAMPLES:,} resamples of the "
                  f"seeds) {_METRIC}")


def t_within(t: float, df: int) -> float:
    """``P(|T| ≤ t)`` for Student's T with integer ``df`` ≥ 1, in closed form (Abramowitz and
    Stegun 26.7.3–4): with ``θ = atan(t/√df)`` and ``c = cos²θ``,
    odd df: ``(2/π)(θ + sinθ cosθ Σ_{k<(df−1)/2} c^k (2·4···2k)/(3·5···(2k+1)))`` (the sum empty at df = 1);
    even df: ``sinθ Σ_{k<df/2} c^k (1·3···(2k−1))/(2·4···2k)``."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c, total, term = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c
            total += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    for k in range(1, df // 2):
        term *= (2 * k - 1) / (2 * k) * c
        total += term
    return math.sin(theta) * total


def t_quantile(level: float, df: int) -> float:
    """The ``t`` with ``P(|T| ≤ t) = level`` (so ``t_{(1+level)/2, df}``), by bisection to 1e-12."""
    lo, hi = 0.0, 1.0
    while t_within(hi, df) < level:
        hi *= 2
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_within(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def _t_stats(diffs: list[float]) -> tuple[float, float, int]:
    d = np.asarray(diffs, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), len(d) - 1


def t_interval(diffs: list[float]) -> tuple[float, float]:
    """``mean ± t_{(1+LEVEL)/2, n−1} · sd/√n`` (a point when every difference is the same)."""
    mean, se, df = _t_stats(diffs)
    half = t_quantile(LEVEL, df) * se
    return mean - half, mean + half


def t_p(diffs: list[float]) -> float:
    """The two-sided paired t-test's p-value, ``1 − P(|T| ≤ |mean|/se)``; with ``se = 0`` it is
    0 for a non-zero mean and 1 for a zero one."""
    mean, se, df = _t_stats(diffs)
    if se == 0:
        return 1.0 if mean == 0 else 0.0
    return max(0.0, 1.0 - t_within(mean / se, df))


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


RULES = {"t": (t_interval, t_p), "bootstrap": (bootstrap_interval, bootstrap_p)}  # name: (interval, p-value)


def verdict(a: str, b: str, a_by_seed: dict, b_by_seed: dict, beats: str = "beats", rule: str = "t") -> dict:
    """The rule applied to labels ``a`` and ``b`` (final metric per seed, seeds as keys);
    ``beats`` is the sentence's verb for "higher" (a metric that is not a score says "is above");
    ``rule``: a key of :data:`RULES` (``"bootstrap"`` only to recompute reports made under it)."""
    seeds = sorted(set(a_by_seed) & set(b_by_seed), key=str)
    diffs = [a_by_seed[s] - b_by_seed[s] for s in seeds]
    out = {"a": a, "b": b, "seeds": seeds, "mean_diff": float(np.mean(diffs)) if diffs else math.nan}
    if len(diffs) < 2 or any(math.isnan(x) for x in diffs):
        return {**out, "interval": None, "verdict": "none",
                "sentence": f"{a} vs {b}: no verdict ({len(diffs)} paired seed(s); the rule needs at least 2)"}
    interval, p_value = RULES[rule]
    lo, hi = interval(diffs)
    out["p"] = p_value(diffs)
    span = lambda m, l, h: (f"mean difference {m:+.3f}, {LEVEL:.0%} interval [{_bound(l)}, {_bound(h)}] "  # noqa: E731
                            f"over {len(diffs)} seeds")
    if lo > 0:
        kind, sentence = "a", f"{a} {beats} {b} ({span(out['mean_diff'], lo, hi)})"
    elif hi < 0:  # said of b − a, so that the winner's difference is positive
        kind, sentence = "b", f"{b} {beats} {a} ({span(-out['mean_diff'], -hi, -lo)})"
    elif not any(diffs):
        kind, sentence = "none", f"no difference measured between {a} and {b} (equal in each of {len(diffs)} seeds)"
    else:
        kind, sentence = "none", f"no difference measured between {a} and {b} ({span(out['mean_diff'], lo, hi)})"
    return {**out, "interval": [lo, hi], "verdict": kind, "sentence": sentence}


def _bound(x: float) -> str:
    """An interval bound to 3 decimals, or to 2 significant digits where 3 decimals would
    print a bound that excludes 0 as ±0.000 (0.00025 is not 0: it decides the verdict)."""
    return f"{x:+.2g}" if x != 0 and round(x, 3) == 0 else f"{x:+.3f}"


def all_verdicts(finals: dict[str, dict], beats: str = "beats", rule: str = "t",
                 planned: list[tuple[str, str]] | None = None) -> list[dict]:
    """The rule for every pair of labels, in the spec's order, each with ``holm``: whether a
    "beats" verdict stays under Holm's correction over the pairs that have a p-value.
    ``planned`` (the spec's ``planned:``, either order within a pair): the correction runs
    over those pairs alone, each verdict records ``planned``, and an unplanned pair's
    ``holm`` is None (exploratory: no correction is claimed for it)."""
    labels = list(finals)
    found = [verdict(a, b, finals[a], finals[b], beats, rule) for i, a in enumerate(labels) for b in labels[i + 1:]]
    wanted = None if planned is None else {frozenset(pair) for pair in planned}
    for v in found:
        v["planned"] = wanted is None or frozenset((v["a"], v["b"])) in wanted
    tested = [v for v in found if "p" in v and v["planned"]]
    for v in found:
        v["holm"] = None
    for v, stays in zip(tested, holm([v["p"] for v in tested])):
        v["holm"] = stays if v["verdict"] != "none" else None
    return found


def holm_summary(found: list[dict]) -> dict:
    """``{"pairs", "beats", "stay", "go"}`` over the planned pairs (all of them when the spec
    plans none): how many "beats" verdicts Holm's correction keeps (``go``: the sentences of
    those it does not)."""
    family = [v for v in found if v.get("planned", True)]
    decided = [v for v in family if v["verdict"] != "none"]
    gone = [v["sentence"] for v in decided if v.get("holm") is False]
    return {"pairs": sum("p" in v for v in family), "beats": len(decided), "stay": len(decided) - len(gone), "go": gone}


def metric_verdicts(per_metric: dict[str, dict[str, dict]], planned: list[tuple[str, str]] | None = None) -> dict[str, list[dict]]:
    """:func:`all_verdicts` for each further metric: ``{metric: {label: {seed: value}}}``.
    Its sentences say "A is above B", not "beats": for some metrics (a false-alarm rate)
    lower is better, and the reader is told which."""
    return {metric: all_verdicts(finals, "is above", planned=planned) for metric, finals in per_metric.items()}


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


def sequences_ratio(a: str, b: str, a_reach: dict, b_reach: dict, budget: float | None = None) -> dict:
    """How many times the sequences label ``a`` needed to reach the target are ``b``'s
    (``a_reach``, ``b_reach``: :func:`target_summary` records), oriented so that the slower
    label comes first: ``{"slower", "faster", "ratio_of_means", "geometric_mean",
    "interval", "lower_bound", "sentence"}``; ``None`` ratios, and a sentence that says why,
    when a seed of either did not reach it. Then, when every seed of one label reached it
    and ``budget`` (the runs' budget in sequences) is given, ``lower_bound`` is the ratio
    with the other's unreached seeds counted at the budget, where each needed more: the
    ratio of means is at least that (said when it is above 1)."""
    a_seeds, b_seeds = a_reach["per_seed"], b_reach["per_seed"]
    seeds = sorted(set(a_seeds) & set(b_seeds), key=str)
    missing = [(label, reach) for label, reach in ((a, a_reach), (b, b_reach)) if reach["mean"] is None]
    out = {"slower": a, "faster": b, "seeds": seeds, "ratio_of_means": None, "geometric_mean": None, "interval": None,
           "lower_bound": None}
    if missing or not seeds:
        why = "; ".join(f"{label} reached it in {reach['reached']} of {len(reach['per_seed'])} seeds" for label, reach in missing)
        bound = _censored(a, b, a_reach, b_reach, budget)
        return {**out, **bound, "sentence": f"{a} / {b}: no ratio ({why or 'no paired seeds'})" + _censored_text(bound, budget)}
    at_start = [label for label, reach in ((a, a_reach), (b, b_reach)) if any(reach["per_seed"][s] == 0 for s in seeds)]
    if at_start:  # a seed at the target before any training: a ratio to 0 sequences means nothing
        return {**out, "sentence": f"{a} / {b}: no ratio ({' and '.join(at_start)} at the target before training, 0 sequences)"}
    if a_reach["mean"] < b_reach["mean"]:
        return sequences_ratio(b, a, b_reach, a_reach, budget)
    logs = [math.log(a_seeds[s] / b_seeds[s]) for s in seeds]
    out.update(ratio_of_means=a_reach["mean"] / b_reach["mean"], geometric_mean=math.exp(float(np.mean(logs))))
    text = f"{a} needed {out['ratio_of_means']:.2f}× {b}'s sequences (ratio of means)"
    if len(seeds) < 2:
        return {**out, "sentence": f"{text}; no interval with one seed"}
    lo, hi = t_interval(logs)
    out["interval"] = [math.exp(lo), math.exp(hi)]
    return {**out, "sentence": f"{text}; per-seed ratios' geometric mean {out['geometric_mean']:.2f}×, "
                              f"{LEVEL:.0%} interval [{out['interval'][0]:.2f}×, {out['interval'][1]:.2f}×] over {len(seeds)} seeds"}


def _censored(a: str, b: str, a_reach: dict, b_reach: dict, budget: float | None) -> dict:
    """``{"slower", "faster", "lower_bound"}`` when one label reached the target in every seed
    and the other did not, its unreached seeds counted at ``budget``, and that bound is above 1; else ``{}``."""
    if budget is None or (a_reach["mean"] is None) == (b_reach["mean"] is None):
        return {}
    (slow, slow_reach), (fast, fast_reach) = ((a, a_reach), (b, b_reach)) if a_reach["mean"] is None else ((b, b_reach), (a, a_reach))
    counted = [budget if v is None else v for v in slow_reach["per_seed"].values()]
    bound = float(np.mean(counted)) / fast_reach["mean"] if counted and fast_reach["mean"] else 0.0
    return {"slower": slow, "faster": fast, "lower_bound": bound} if bound > 1 else {}


def _censored_text(found: dict, budget: float | None) -> str:
    if not found:
        return ""
    return (f"; {found['slower']} needed at least {found['lower_bound']:.2f}× {found['faster']}'s sequences "
            f"(its unreached seeds counted at the budget, {budget:g} sequences)")


def sequences_ratios(reaches: dict[str, dict], planned: list[tuple[str, str]] | None = None,
                     budget: float | None = None) -> list[dict]:
    """:func:`sequences_ratio` for the ``planned`` pairs (every pair, in the spec's order,
    when none are planned) whose labels both have a :func:`target_summary` record."""
    labels = [label for label, reach in reaches.items() if reach is not None]
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    if planned is not None:
        wanted = {frozenset(pair) for pair in planned}
        pairs = [pair for pair in pairs if frozenset(pair) in wanted]
    return [sequences_ratio(a, b, reaches[a], reaches[b], budget) for a, b in pairs]
