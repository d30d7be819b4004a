"""Which published labels' reported seeds split into two groups far apart (an instrument check
of the protocol).

    python experiments/seed_splits.py

A label whose seeds partly collapse (five of OPD's ten seeds under the strong deviations
decay ended at 0.000-0.128, the other five at 0.936-0.966) has a mean over seeds that
describes no seed, a wide spread that the verdict rule turns into "no difference measured"
or into a "beats" carried by the low seeds, and a tuning on two seeds that can miss the low
group. For every ``docs/results/<name>/results.json``, each label's per-seed final test
accuracy is tested by :func:`opd.compare.protocol.seed_split` (the widest gap between
neighbouring sorted values at least ``SPLIT_GAP`` and over ``SPLIT_RATIO`` times the wider
group's range; ``opd compare`` flags the same in each new report). Listed beside each split:
the tuning score at the chosen lr (validation, mean over the tuning seeds) and which side of
the gap it falls on, each tuning seed's own score where the report keeps it
(``lr_tuning_by_seed``), and the verdicts that judged the label's runs (in any report).
Over every label looked at, the split rate where the next larger lr of its grid collapsed on
tuning against the rest (Fisher's exact test), an association that bears on a remedy. Each
label's runs are counted once, at their home, and each pair of runs once
(:mod:`opd.compare.shared_runs`). Reads
committed files only; runs nothing. Writes ``docs/results/seed_splits.md`` and
``docs/results/seed_splits/results.json``.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from opd.compare import protocol, shared_runs
from opd.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def tuning_score(results: dict, label: str) -> float | None:
    """The label's validation score at its chosen lr (None: untuned)."""
    scores, chosen = results.get("lr_tuning", {}).get(label), results.get("chosen_lr", {}).get(label)
    if not scores or chosen is None:
        return None
    return {f"{float(lr):g}": acc for lr, acc in scores.items()}.get(f"{chosen:g}")


def tuning_by_seed(results: dict, label: str) -> dict[str, float] | None:
    """Each tuning seed's validation score at the label's chosen lr, where the report keeps
    them (``lr_tuning_by_seed``; reports before it kept the mean only): ``{seed: score}``."""
    scores, chosen = results.get("lr_tuning_by_seed", {}).get(label), results.get("chosen_lr", {}).get(label)
    if not scores or chosen is None:
        return None
    return {f"{float(lr):g}": by_seed for lr, by_seed in scores.items()}.get(f"{chosen:g}")


def next_lr_collapsed(results: dict, label: str) -> bool | None:
    """Whether the next larger lr of the label's grid collapsed on tuning
    (:func:`opd.compare.protocol.beside_collapse`; None: untuned, or the chosen lr is the
    grid's largest)."""
    scores, chosen = results.get("lr_tuning", {}).get(label), results.get("chosen_lr", {}).get(label)
    if not scores or chosen is None or protocol.next_larger(scores, chosen) is None:
        return None
    return protocol.beside_collapse(scores, chosen) is not None


def side(split: dict, score: float | None) -> str:
    """Where a tuning score falls against the groups: ``high`` (at or above the gap's middle),
    ``low``, or ``-`` (untuned)."""
    if score is None:
        return "-"
    middle = (max(split["low"].values()) + min(split["high"].values())) / 2
    return "high" if score >= middle else "low"


def judged(entry: dict, found: dict[str, dict], pair_homes: dict) -> dict:
    """The published verdicts that judged the runs of the label ``entry`` (all of them or some
    of its seeds: :func:`opd.compare.shared_runs.contains`) against another label, in any
    report, each pair of runs at its home only: ``{"pairs", "beats", "beaten", "none"}``."""
    counts = {"pairs": 0, "beats": 0, "beaten": 0, "none": 0}
    for name, results in found.items():
        for v in results.get("verdicts", []):
            mine = [label for label in (v["a"], v["b"]) if label in results["labels"]
                    and shared_runs.contains(entry, results["labels"][label])]
            if len(mine) != 1 or pair_homes.get((name, v["a"], v["b"]), name) != name:
                continue
            counts["pairs"] += 1
            won = {"a": v["a"], "b": v["b"]}.get(v["verdict"])
            counts["none" if won is None else "beats" if won == mine[0] else "beaten"] += 1
    return counts


def tuned_holder(entry: dict, found: dict[str, dict], home: str, label: str) -> tuple[dict, str]:
    """``(results, label)`` of a report that tuned runs holding those of the label ``entry``
    (:func:`opd.compare.shared_runs.contains`): the home when it did, else the first that did
    in home order (a report that fixed the lr of runs it reused holds no tuning of them),
    else the home."""
    order = sorted(found, key=lambda name: (len(found[name]["labels"]), name))
    for name in [home] + order:
        for other, held in found[name]["labels"].items():
            if found[name].get("lr_tuning", {}).get(other) and shared_runs.contains(held, entry):
                return found[name], other
    return found[home], label


def rows_of(name: str, found: dict[str, dict], homes: dict, pair_homes: dict) -> tuple[list[dict], list[tuple]]:
    """``(splits, labels looked at)`` of one comparison, less the labels at another home; each
    label looked at (three seeds at least) as ``(split?, next larger lr collapsed?)``."""
    rows, looked, results = [], [], found[name]
    for label, entry in results["labels"].items():
        if homes.get((name, label), name) != name:
            continue
        finals = {seed: f.get("accuracy", float("nan")) for seed, f in entry["final"].items()}
        split, tuned = protocol.seed_split(finals), tuned_holder(entry, found, name, label)
        if len(finals) >= 3:
            looked.append((split is not None, next_lr_collapsed(*tuned)))
        if split is None:
            continue
        score, by_seed = tuning_score(*tuned), tuning_by_seed(*tuned)
        rows.append({"report": name, "label": label, "method": entry["method"], **split,
                     "mean": sum(finals.values()) / len(finals), "tuning": score, "tuning_side": side(split, score),
                     "tuning_by_seed": None if by_seed is None else {seed: {"score": v, "side": side(split, v)}
                                                                     for seed, v in by_seed.items()},
                     "judged": judged(entry, found, pair_homes)})
    return rows, looked


def fisher_p(a: int, n1: int, c: int, n2: int) -> float:
    """Fisher's exact test, two-sided, of ``a`` of ``n1`` against ``c`` of ``n2``: the chance,
    with the margins held, of a table no likelier than the one seen,

        P(x) = C(n1, x) C(n2, k − x) / C(n1 + n2, k),   k = a + c,   p = Σ_{P(x) ≤ P(a)} P(x)."""
    k, total = a + c, math.comb(n1 + n2, a + c)
    probs = [math.comb(n1, x) * math.comb(n2, k - x) / total for x in range(max(0, k - n2), min(k, n1) + 1)]
    seen = math.comb(n1, a) * math.comb(n2, c) / total
    return min(1.0, sum(q for q in probs if q <= seen * (1 + 1e-7)))


def by_next_lr(looked: list[tuple]) -> dict:
    """Labels and splits among those whose next larger lr collapsed on tuning, and the rest, with
    Fisher's two-sided p of the two split rates."""
    groups = {"collapsed": [s for s, c in looked if c is True], "held": [s for s, c in looked if c is False]}
    out = {k: {"labels": len(v), "split": sum(v)} for k, v in groups.items()}
    one, two = out["collapsed"], out["held"]
    return {**out, "fisher_p": fisher_p(one["split"], one["labels"], two["split"], two["labels"])}


def next_lr_text(n: dict) -> str:
    """The sentence on splits beside a collapsing larger lr; "more often" only at p < 0.05."""
    one, two = n["collapsed"], n["held"]
    rate = lambda g: g["split"] / g["labels"] if g["labels"] else float("nan")  # noqa: E731
    told = n["fisher_p"] < 0.05
    verdict = (f"so labels tuned next to a collapse split {'more' if rate(one) > rate(two) else 'less'} often" if told
               else "the two rates are not told apart")
    return (f"Where the next larger lr of the grid collapsed on tuning (its score under {protocol.NEXT_COLLAPSE:g} times the "
            f"chosen lr's; the threshold set before the count was first made), {one['split']} of {one['labels']} labels "
            f"split; where it did not, {two['split']} of {two['labels']} (labels tuned with a larger lr in their grid; "
            f"Fisher's exact test, two-sided, p = {n['fisher_p']:.3f}: {verdict} at the 0.05 level). An association "
            f"over published labels, not a test of a remedy: taking the smaller lr there would need the runs again.")


def summary(rows: list[dict], looked: list[tuple]) -> dict:
    return {"labels": len(looked), "split": len(rows), "next_lr": by_next_lr(looked), "one_low_seed": sum(len(r["low"]) == 1 for r in rows),
            "one_high_seed": sum(len(r["high"]) == 1 for r in rows),
            "tuned": sum(r["tuning"] is not None for r in rows), "tuning_high": sum(r["tuning_side"] == "high" for r in rows),
            "pairs": sum(r["judged"]["pairs"] for r in rows), "beats_or_beaten": sum(r["judged"]["beats"] + r["judged"]["beaten"] for r in rows),
            "tuned_by_seed": sum(r["tuning_by_seed"] is not None for r in rows),
            "tuning_seed_low": sum(any(v["side"] == "low" for v in (r["tuning_by_seed"] or {}).values()) for r in rows)}


def _row(r: dict) -> list[str]:
    j = r["judged"]
    tuning = "-" if r["tuning"] is None else f"{r['tuning']:.3f} ({r['tuning_side']})"
    if r["tuning_by_seed"]:
        seeds = sorted(r["tuning_by_seed"].items(), key=lambda kv: (len(kv[0]), kv[0]))
        tuning += "; " + ", ".join(f"seed {seed} {v['score']:.3f} ({v['side']})" for seed, v in seeds)
    return [r["report"], r["label"], r["method"], protocol.group_text(r["low"]), protocol.group_text(r["high"]), f"{r['gap']:.3f}", f"{r['mean']:.3f}",
            tuning, f"{j['pairs']} ({j['beats']} won, {j['beaten']} lost, {j['none']} none)"]


def _summary_text(s: dict) -> str:
    """The summary paragraph, wrapped whole (the counts change the lengths of its lines)."""
    text = f"""**{s['split']} of the {s['labels']} labels split**; the low group is a single seed in
{s['one_low_seed']} of them and the high group in {s['one_high_seed']}. **In {s['tuning_high']} of the
{s['tuned']} tuned ones the tuning score at the chosen lr falls on the high side of the gap**
(at or above its middle: the tuning seeds did not show the low group; the score is the
mean over the tuning seeds on the validation split, so one tuning seed in the low group
would pull it toward the middle; of the {s['tuned_by_seed']} whose report keeps each tuning seed's
score, {s['tuning_seed_low']} had a tuning seed on the low side). These labels take part in {s['pairs']} judged pairs (in any report,
each pair of runs once), {s['beats_or_beaten']} of them a "beats" either way. A flag, not a rule: a split can be a
real property of the method at that lr (it collapses on some seeds), and the report states it
so the mean is not read as a typical seed. {next_lr_text(s['next_lr'])}"""
    return textwrap.fill(" ".join(text.split()), width=92)


def report(rows: list[dict], s: dict, repeats: int) -> str:
    table = markdown_table(["comparison", "label", "method", "low group", "high group", "gap", "mean", "tuning at the chosen lr",
                            "pairs judged"], [_row(r) for r in rows]) if rows else "No label splits."
    return f"""# Seeds that split: labels whose reported seeds fall into two groups

Generated by `python experiments/seed_splits.py` from the committed
`docs/results/*/results.json`; it runs nothing. A label's seeds *split* when, with its
per-seed final test accuracies sorted, the widest gap between neighbours is at least
{protocol.SPLIT_GAP:g} and more than {protocol.SPLIT_RATIO:g} times the wider group's range
(`opd.compare.protocol.seed_split`; a group of one seed has range 0; three seeds at least).
Then the mean over seeds describes neither group, and a verdict on it judges a mixture: the
paired interval widens with the gap (often "no difference measured"), or a "beats" rests on
the low seeds. Each label's runs are counted once, at their home (of the reports that hold
all its seeds' runs, or ran its config again to the same numbers, one with the most seeds,
the smallest such; {repeats} repeats left out), each pair of runs once.

{_summary_text(s)}

{table}
"""


def quoted(out: dict) -> list[str]:
    """The phrases of this check that finding 12 of ``docs/results/README.md`` quotes, from the
    check's ``results.json`` (``tests/test_shared_runs.py`` holds the prose to them)."""
    s = out["summary"]
    return [f"{s['split']} of the {s['labels']} labels split", f"a single seed in {s['one_low_seed']} of them",
            f"In {s['tuning_high']} of the {s['tuned']} tuned ones", f"{s['pairs']} judged pairs",
            f"{s['beats_or_beaten']} of them a \"beats\"", f"of the {s['tuned_by_seed']} whose report keeps each tuning seed's score, "
            f"{s['tuning_seed_low']} had a tuning seed on the low side", next_lr_quoted(s["next_lr"])]


def next_lr_quoted(n: dict) -> str:
    one, two = n["collapsed"], n["held"]
    return f"{one['split']} of {one['labels']} labels split; where it did not, {two['split']} of {two['labels']} (Fisher's exact test, two-sided, p = {n['fisher_p']:.3f})"


def main() -> None:
    found = {}
    for path in sorted(RESULTS.glob("*/results.json")):
        results = json.loads(path.read_text())
        if "labels" in results:
            found[path.parent.name] = results
    homes, pair_homes = shared_runs.label_homes(found), shared_runs.pair_homes(found)
    rows, looked = [], []
    for name in found:
        mine, n = rows_of(name, found, homes, pair_homes)
        rows, looked = rows + mine, looked + n
    repeats = sum(homes[name, label] != name for name, results in found.items() for label in results["labels"])
    s = summary(rows, looked)
    out = RESULTS / "seed_splits"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps({"summary": s, "repeats_left_out": repeats, "splits": rows}, indent=1) + "\n")
    (RESULTS / "seed_splits.md").write_text(report(rows, s, repeats))
    print(f"{s['split']} of {s['labels']} labels split; wrote {RESULTS / 'seed_splits.md'}")


if __name__ == "__main__":
    main()
