"""The comparison protocol, as code: what a comparison must hold for its numbers to be
reported, and the learning-rate grid that widens itself until it brackets its choice.

The rules (``opd compare`` checks every spec against them; each rule not met is listed in
the report and in ``results.json`` under ``protocol.unmet``, never silently passed):

- at least :data:`MIN_SEEDS` reported seeds, and at least :data:`MIN_TUNING_SEEDS` separate
  tuning seeds (``tuning_seed``: an int or a list; each lr judged by the mean over them) that
  are never among them (a spec that reuses one is refused). Two, since one seed's choice
  flipped 11 of 81 "beats" verdicts when the same comparisons were tuned on seeds 5 and 6
  (docs/results/tuning_noise.md); a spec without ``tuning_seed`` tunes on two;
- a learning-rate grid of at least :data:`MIN_GRID` values, neighbours at most
  :data:`MAX_SPACING` times apart (3x, with the half-decade grid 1, 3, 10 allowed: its
  3 → 10 step is 3.33x); a label whose chosen lr sits at an edge of the grid gets
  the next value past that edge (the edge's own spacing) and is tuned again, up to
  ``lr_extend`` times; a choice still at an edge is reported as not bracketed;
- one budget for every label (``budget``), and every counter shown: sequences, teacher
  tokens, optimizer steps (``ppo_epochs`` > 1 shows there) and wall time;
- at least :data:`MIN_TEST` held-out test prompts.

Flagged, not rules: a label whose lr the tuning chose inside its noise (:func:`tuning_margin`),
and a label whose reported seeds split into two groups far apart (:func:`seed_split`), where
the mean over seeds describes no seed and two tuning seeds can miss the low group.
"""

from __future__ import annotations

import math

MIN_SEEDS = 5
MIN_TUNING_SEEDS = 2
MIN_GRID = 4
MAX_SPACING = 10 / 3
MIN_TEST = 500
SPACING_SLACK = 1e-9  # float ratios such as 1e-3 / 3e-4 = 3.3333333333333335
SPLIT_GAP = 0.2  # seed_split: the least gap between two groups of seeds' final accuracies
SPLIT_RATIO = 2.0  # seed_split: the gap over the wider group's range
NEXT_COLLAPSE = 0.5  # beside_collapse: the next larger lr's tuning score under this times the chosen lr's


def grid_problems(grid: list[float]) -> list[str]:
    """What keeps ``grid`` from the protocol's grid (none: it is one)."""
    if not grid:
        return ["no lr_grid: every label ran at its config's lr, untuned"]
    values = sorted(set(grid))
    out = []
    if len(values) < MIN_GRID:
        out.append(f"lr_grid has {len(values)} distinct value(s); the protocol asks for at least {MIN_GRID}")
    wide = [(a, b) for a, b in zip(values, values[1:]) if b / a > MAX_SPACING * (1 + SPACING_SLACK)]
    if wide:
        gaps = ", ".join(f"{a:g}→{b:g} ({b / a:.3g}x)" for a, b in wide)
        out.append(f"lr_grid neighbours more than {MAX_SPACING:.3g}x apart: {gaps}")
    return out


def next_lr(grid: list[float], chosen: float) -> float | None:
    """The value past the edge ``chosen`` sits at (its spacing repeated), or None when
    ``chosen`` is inside the grid (bracketed) or the grid has one value."""
    values = sorted(set(grid))
    if len(values) < 2:
        return None
    if chosen == values[0]:
        return values[0] * values[0] / values[1]
    if chosen == values[-1]:
        return values[-1] * values[-1] / values[-2]
    return None


def unmet(*, seeds: list[int], tuning_seeds: list[int], grid: list[float], unbracketed: list[str],
          budget: float | None, test_size: int) -> list[str]:
    """The protocol's rules this comparison does not meet, one sentence each."""
    out = []
    if len(seeds) < MIN_SEEDS:
        out.append(f"{len(seeds)} reported seed(s); the protocol asks for at least {MIN_SEEDS}")
    if grid and not tuning_seeds:
        out.append("no separate tuning seed")
    elif grid and len(tuning_seeds) < MIN_TUNING_SEEDS:
        out.append(f"{len(tuning_seeds)} tuning seed; the protocol asks for at least {MIN_TUNING_SEEDS} "
                   "(each lr judged by the mean over them)")
    out += grid_problems(grid)
    if unbracketed:
        out.append("chosen lr at an edge of the grid after widening it (not bracketed): " + ", ".join(unbracketed))
    if budget is None:
        out.append("no common budget: each run used its own `steps`")
    if test_size < MIN_TEST:
        out.append(f"{test_size} held-out test prompts; the protocol asks for at least {MIN_TEST}")
    return out


def tune_lr(grid: list[float], accuracy, extend: int) -> tuple[dict[float, float], float, bool]:
    """``(accuracy by lr, chosen lr, bracketed)``: ``accuracy(lr)`` over ``grid``, then the
    value past an edge choice (:func:`next_lr`), up to ``extend`` times; ties go to the
    smaller lr."""
    scores: dict[float, float] = {}
    todo = list(grid)
    for _ in range(extend + 1):
        scores.update({lr: accuracy(lr) for lr in todo})
        lrs = sorted(scores)
        chosen = max(lrs, key=lambda lr: (scores[lr], -lrs.index(lr)))
        wider = next_lr(lrs, chosen)
        if wider is None:
            return scores, chosen, True
        todo = [wider]
    return scores, chosen, False


def tuning_margin(scores: dict, chosen: float, n: int) -> dict | None:
    """How clearly the tuning chose: the chosen lr's validation accuracy ``a1`` over the best
    other lr's ``a2``, against the noise of that difference on ``n`` prompts,

        margin = a1 - a2,    noise = 1.96 * sqrt((a1 (1 - a1) + a2 (1 - a2)) / n)

    (a 95% normal interval of a difference of two independent accuracies). ``decided`` is
    False when ``margin <= noise``: another tuning seed could have chosen another lr. The
    protocol still uses the best lr (a rule that preferred, say, the smaller lr inside the
    noise would change every choice made so far); this flags such choices. None with fewer
    than two lrs. ``scores`` maps lr (a float, or its ``%g`` string) to accuracy."""
    by_lr = {f"{float(lr):g}": (float(lr), acc) for lr, acc in scores.items()}  # %g: as results.json keys them
    mine = by_lr.pop(f"{chosen:g}", None)
    if mine is None or not by_lr or n < 1:
        return None
    runner_up, a2 = max(sorted(by_lr.values()), key=lambda pair: pair[1])
    a1 = mine[1]
    noise = difference_noise(a1, a2, n)
    return {"chosen_lr": mine[0], "accuracy": a1, "runner_up_lr": runner_up, "runner_up": a2, "margin": a1 - a2,
            "noise": noise, "decided": a1 - a2 > noise}


def difference_noise(a1: float, a2: float, n: int) -> float:
    """Half-width of a 95% normal interval of ``a1 - a2``, two independent accuracies on ``n`` prompts."""
    return 1.96 * math.sqrt(max(a1 * (1 - a1) + a2 * (1 - a2), 0.0) / n)


def undecided(margins: dict) -> list[str]:
    """One sentence per label whose lr choice is inside the tuning noise (:func:`tuning_margin`)."""
    return [f"{label}: {m['accuracy']:.3f} at lr {m['chosen_lr']:g} against {m['runner_up']:.3f} at lr "
            f"{m['runner_up_lr']:g} (margin {m['margin']:+.3f}, noise ±{m['noise']:.3f})"
            for label, m in margins.items() if m is not None and not m["decided"]]


def beside_collapse(scores: dict, chosen: float) -> dict | None:
    """The next larger lr of a tuned grid and its score when it collapsed on tuning,

        a(next) < NEXT_COLLAPSE * a(chosen),

    else None (it did not, the chosen lr is the grid's largest, or ``chosen`` was not tuned).
    ``scores`` maps lr (a float, or its ``%g`` string) to accuracy. Over the published labels
    a choice beside a collapse split its reported seeds more often (``experiments/seed_splits.py``)."""
    pair = next_larger(scores, chosen)
    if pair is None or pair[1][1] >= NEXT_COLLAPSE * pair[0][1]:
        return None
    (lr, acc), (next_lr, next_acc) = pair
    return {"chosen_lr": lr, "accuracy": acc, "next_lr": next_lr, "next_accuracy": next_acc}


def next_larger(scores: dict, chosen: float) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """``((chosen lr, its score), (next larger lr, its score))`` of a tuned grid, or None when
    ``chosen`` was not tuned or is the grid's largest. ``scores``: lr (float or ``%g``) → accuracy."""
    by_lr = {f"{float(lr):g}": (float(lr), acc) for lr, acc in scores.items()}
    mine = by_lr.get(f"{chosen:g}")
    larger = sorted(pair for pair in by_lr.values() if pair[0] > chosen * (1 + 1e-6))
    return None if mine is None or not larger else (mine, larger[0])


def collapse_sentences(grid: dict[str, dict]) -> list[str]:
    """One sentence per label tuned beside a collapse (:func:`beside_collapse`); ``grid``:
    ``{label: {"scores": {lr: accuracy}, "chosen": lr}}``."""
    out = []
    for label, g in grid.items():
        c = beside_collapse(g["scores"], g["chosen"])
        if c is not None:
            out.append(f"{label}: {c['accuracy']:.3f} at lr {c['chosen_lr']:g}, the next larger lr {c['next_lr']:g} "
                       f"{c['next_accuracy']:.3f}")
    return out


def seed_split(finals: dict[str, float]) -> dict | None:
    """Whether a label's reported seeds fall into two groups far apart (a bimodal label: some
    seeds collapse, the rest do not). With the per-seed final accuracies sorted,
    ``a_(1) <= ... <= a_(n)``, the widest gap between neighbours

        g = max_k (a_(k+1) - a_(k))

    splits them into a low group ``a_(1..k)`` and a high group ``a_(k+1..n)``; it is a split
    when ``g >= SPLIT_GAP`` and ``g > SPLIT_RATIO * max(range(low), range(high))`` (each group
    tight against the gap; a group of one seed has range 0). ``{"gap", "low", "high"}`` (the
    groups as ``{seed: accuracy}``), or None: no split, fewer than three seeds, or a NaN."""
    items = sorted(finals.items(), key=lambda kv: kv[1])
    values = [v for _, v in items]
    if len(values) < 3 or any(math.isnan(v) for v in values):
        return None
    k = max(range(1, len(values)), key=lambda i: values[i] - values[i - 1])
    gap, low, high = values[k] - values[k - 1], values[:k], values[k:]
    if gap < SPLIT_GAP or gap <= SPLIT_RATIO * max(low[-1] - low[0], high[-1] - high[0]):
        return None
    return {"gap": gap, "low": dict(items[:k]), "high": dict(items[k:])}


def group_text(accs: dict[str, float]) -> str:
    """A group of seeds' accuracies as ``"N at lo–hi"`` (``"N at x"`` when they are equal)."""
    lo, hi = min(accs.values()), max(accs.values())
    return f"{len(accs)} at " + (f"{lo:.3f}" if hi - lo < 5e-4 else f"{lo:.3f}–{hi:.3f}")


def _group(accs: dict[str, float]) -> str:
    seeds = ", ".join(sorted(accs, key=lambda s: (len(str(s)), str(s))))
    return f"{group_text(accs)} (seed{'s' if len(accs) > 1 else ''} {seeds})"


def split_sentences(finals: dict[str, dict[str, float]], tuned: dict[str, dict[str, float]] | None = None) -> list[str]:
    """One sentence per label whose reported seeds split (:func:`seed_split`); ``finals``:
    ``{label: {seed: final accuracy}}``; ``tuned``: ``{label: {tuning seed: its score at the
    chosen lr}}``, shown beside the groups (tuning seeds all level with the high group did not
    see the low one)."""
    out = []
    for label, accs in finals.items():
        s = seed_split(accs)
        if s is None:
            continue
        mean = sum(accs.values()) / len(accs)
        inside = max(s["low"].values()) < mean < min(s["high"].values())
        text = (f"{label}: {_group(s['low'])} and {_group(s['high'])}, a gap of {s['gap']:.3f}; "
                f"the mean {mean:.3f}" + (" falls in the gap between them" if inside else ""))
        if tuned and tuned.get(label):
            scores = ", ".join(f"{v:.3f} (seed {seed})" for seed, v in sorted(tuned[label].items(), key=lambda kv: int(kv[0])))
            text += f"; at the chosen lr the tuning seeds scored {scores} on the validation split"
        out.append(text)
    return out
