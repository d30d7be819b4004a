"""How clearly each published comparison's tuning chose its learning rates (an instrument
check of the protocol).

    python experiments/tuning_noise.py

For every ``docs/results/<name>/results.json`` with a tuned grid: each label's chosen lr,
its validation accuracy on the tuning seed, the best other lr's, and whether the margin
between them exceeds the noise of a difference of two accuracies on the evaluation's
prompts (:func:`opd.compare.protocol.tuning_margin`; ``opd compare`` now writes the same
under ``lr_margin`` and flags such labels in its report). A choice inside the noise could
have gone another way on another tuning seed. Also shown: the lr a rule that prefers the
smaller lr inside the noise would have chosen (the alternative the protocol does not use),
and, for each comparison rerun with two tuning seeds (``NAME_tune2``), which of its lrs and
"beats" verdicts changed. Reads committed files only; runs nothing. Writes ``docs/results/tuning_noise.md`` and
``docs/results/tuning_noise/results.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from opd.compare import protocol, shared_runs
from opd.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def smallest_within_noise(scores: dict, best: float, n: int) -> float:
    """The smallest lr whose accuracy is not told apart from ``best`` (the chosen lr's)."""
    return min(float(lr) for lr, acc in scores.items() if best - acc <= protocol.difference_noise(best, acc, n))


def experiment_rows(name: str, results: dict, homes: dict | None = None) -> list[dict]:
    """The lr choices of one comparison, less those of labels whose home (``homes``:
    :func:`opd.compare.shared_runs.label_homes`) is another comparison."""
    n = results["test_prompts"] * len(results.get("tuning_seeds") or [1])  # prompts x tuning seeds
    rows = []
    for label, scores in results.get("lr_tuning", {}).items():
        if homes and homes.get((name, label), name) != name:
            continue
        chosen = results["chosen_lr"][label]
        m = protocol.tuning_margin(scores, chosen, n)
        finals = [f.get("accuracy") for f in results["labels"][label]["final"].values()]
        reported = sum(finals) / len(finals) if finals and None not in finals else None
        if m is not None:
            rows.append({"experiment": name, "label": label, "prompts": n, **m, "reported_mean": reported,
                         "smallest_within_noise": smallest_within_noise(scores, m["accuracy"], n)})
    return rows


def beats(results: dict) -> set[str]:
    """The "A beats B" verdicts of a comparison, as "A beats B"."""
    return {v["sentence"].split(" (")[0] for v in results["verdicts"] if " beats " in v["sentence"]}


def two_seed_check(one: dict, two: dict, name: str) -> dict:
    """A comparison against its rerun tuned on two seeds (``NAME_tune2``): the labels whose lr
    changed, and which "beats" verdicts stay, go or appear."""
    changed = [label for label, lr in one["chosen_lr"].items() if abs(lr - two["chosen_lr"][label]) > 1e-12 * lr]
    b1, b2 = beats(one), beats(two)
    return {"experiment": name, "labels": len(one["chosen_lr"]), "lr_changed": changed, "beats_one_seed": sorted(b1),
            "kept": sorted(b1 & b2), "lost": sorted(b1 - b2), "new": sorted(b2 - b1)}


def two_seed_table(checks: list[dict]) -> str:
    if not checks:
        return "No comparison has been rerun on two tuning seeds."
    kept, total = sum(len(c["kept"]) for c in checks), sum(len(c["beats_one_seed"]) for c in checks)
    changed, labels = sum(len(c["lr_changed"]) for c in checks), sum(c["labels"] for c in checks)
    table = markdown_table(
        ["experiment", "labels whose lr changed", "\"beats\" kept", "lost", "new"],
        [[c["experiment"], f"{len(c['lr_changed'])} of {c['labels']}" + (f" ({', '.join(c['lr_changed'])})" if c["lr_changed"] else ""),
          f"{len(c['kept'])} of {len(c['beats_one_seed'])}", "; ".join(c["lost"]) or "-", "; ".join(c["new"]) or "-"]
         for c in checks],
    )
    return (f"`NAME_tune2` reruns `NAME` with each lr tuned on the mean over seeds 5 and 6. Over {len(checks)} "
            f"comparisons, {changed} of {labels} labels changed their lr and **{kept} of {total} \"beats\" verdicts "
            f"stay**.\n\n{table}")


def report(rows: list[dict], checks: list[dict], skipped: int = 0) -> str:
    undecided = [r for r in rows if not r["decided"]]
    moved = [r for r in undecided if r["smallest_within_noise"] != r["chosen_lr"]]
    fell = [r for r in rows if r["reported_mean"] is not None
            and r["accuracy"] - r["reported_mean"] > protocol.difference_noise(r["accuracy"], r["reported_mean"], r["prompts"])]
    fell_list = "\n".join(f"- {r['experiment']} {r['label']}: {r['accuracy']:.3f} on the tuning seed (validation), "
                          f"{r['reported_mean']:.3f} reported (test), lr {r['chosen_lr']:g}"
                          + ("" if r["decided"] else "; chosen inside the noise") for r in fell) or "- none"
    table = markdown_table(
        ["experiment", "label", "chosen lr", "val. acc.", "runner-up lr", "its acc.", "margin", "noise (95%)", "decided",
         "smaller lr inside the noise", "reported mean (test)"],
        [[r["experiment"], r["label"], f"{r['chosen_lr']:g}", f"{r['accuracy']:.3f}", f"{r['runner_up_lr']:g}",
          f"{r['runner_up']:.3f}", f"{r['margin']:+.3f}", f"±{r['noise']:.3f}", "yes" if r["decided"] else "**no**",
          "" if r["smallest_within_noise"] == r["chosen_lr"] else f"{r['smallest_within_noise']:g}",
          "-" if r["reported_mean"] is None else f"{r['reported_mean']:.3f}"] for r in rows],
    )
    return f"""# How clearly the tuning chose each learning rate

`python experiments/tuning_noise.py` (reads the committed `docs/results/*/results.json`; runs
nothing). For each label of each published comparison: the chosen lr's final validation
accuracy on the tuning seed against the best other lr's, and the noise of that difference,
`1.96·sqrt((a1(1−a1) + a2(1−a2))/n)` on the `n` validation prompts (times the tuning
seeds, for a comparison tuned on the mean over several; `opd.compare.protocol.tuning_margin`).
A label whose runs several comparisons report (reused, gathered, rerun to the same numbers or
reported for some of its seeds: `opd.compare.shared_runs`) is counted once, at its home; {skipped} such repeats are left out. "decided: no" means the
margin is inside the noise:
another tuning seed could have chosen another lr. The protocol still uses the best lr; the
last column is the smallest lr that a rule preferring smaller lrs inside the noise would
have taken instead (empty: the same lr); the last, the label's mean final test accuracy over
the reported seeds at the chosen lr, for set against the tuning seed's validation accuracy.

**{len(undecided)} of {len(rows)} choices are inside the noise**; in {len(moved)} of them a
smaller lr was inside it too. Inside the noise mostly means a flat top: the lrs near the best
do about as well on the tuning seed. It costs where they do not behave alike on other seeds.
Measurements, not verdicts: a choice inside the noise is not a wrong choice, and a rerun of
a label at another lr is what would tell.

**{len(fell)} of {len(rows)} labels report a mean below their tuning value by more than the
noise of that difference.** The best of several lrs on one seed is biased upward (the
winner's curse), and the two are on different splits (validation and test) of the same
task, so part of each gap is expected; a collapse such as modchain_promise's GRPO is not:

{fell_list}

{table}

## Tuned again on two seeds

{two_seed_table(checks)}
"""


def quoted(out: dict) -> list[str]:
    """The phrases of this check that finding 8 of ``docs/results/README.md`` quotes, from the
    check's ``results.json`` (``tests/test_shared_runs.py`` holds the prose to them)."""
    rows = out["choices"]
    undecided = [r for r in rows if not r["decided"]]
    fell = [r for r in rows if r["reported_mean"] is not None
            and r["accuracy"] - r["reported_mean"] > protocol.difference_noise(r["accuracy"], r["reported_mean"], r["prompts"])]
    return [f"{out['repeats_left_out']} such repeats left out", f"In {len(undecided)} of the {len(rows)} choices",
            f"In {sum(r['smallest_within_noise'] != r['chosen_lr'] for r in undecided)} of those a smaller lr",
            f"{len(fell)} labels report a test mean below their tuning value",
            f"{sum(not r['decided'] for r in fell)} of them were chosen inside the noise"]


def main() -> None:
    rows, found = [], {}
    for path in sorted(RESULTS.glob("*/results.json")):
        results = json.loads(path.read_text())
        if "lr_tuning" in results and "chosen_lr" in results:
            found[path.parent.name] = results
    homes = shared_runs.label_homes(found, with_tuning=True)
    for name, results in found.items():
        rows += experiment_rows(name, results, homes)
    repeats = sum(homes[name, label] != name for name, results in found.items() for label in results["lr_tuning"])
    checks = [two_seed_check(found[name], found[f"{name}_tune2"], name) for name in sorted(found) if f"{name}_tune2" in found]
    out = RESULTS / "tuning_noise"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps({"choices": rows, "repeats_left_out": repeats, "two_seed_checks": checks}, indent=1) + "\n")
    (RESULTS / "tuning_noise.md").write_text(report(rows, checks, repeats))
    undecided = sum(not r["decided"] for r in rows)
    print(f"{undecided} of {len(rows)} lr choices inside the tuning noise; wrote {RESULTS / 'tuning_noise.md'}")


if __name__ == "__main__":
    main()
