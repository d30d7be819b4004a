"""Verdicts at smaller budgets, read off a published experiment's curves.

    python experiments/budgets.py NAME [--budgets 256,512,1024,2048,3072]

Reads ``docs/results/NAME/results.json`` (written by ``experiments/run.py NAME``) and
applies the verdict rule to each label's accuracy at each budget, from the evaluation
that used exactly that many sequences (:func:`opd.compare.verdicts.at_budget`). Valid
only for runs at a constant learning rate (the default): a run's state at a budget is
then the state of a run stopped there. The learning rate stays the one tuned at the
experiment's full budget (one tuning per label shared across budgets). Writes
``docs/results/NAME_budgets.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from opd.compare import verdicts

ROOT = Path(__file__).resolve().parents[1]


def budget_section(labels: dict, budget: int) -> list[str]:
    finals = verdicts.at_budget(labels, budget)
    if not finals:
        return [f"## {budget:,} sequences", "", "No run was evaluated at exactly this budget.", ""]
    cells = [f"{label} {statistics.mean(v.values()):.3f} ± {statistics.stdev(v.values()):.3f}" for label, v in finals.items()]
    found = verdicts.all_verdicts(finals)
    return [f"## {budget:,} sequences", "", "Accuracy (mean ± std over seeds): " + "; ".join(cells) + ".", ""] + [f"- {v['sentence']}" for v in found] + [""]


def lr_sentence(results: dict) -> str:
    """Where the lrs came from: tuned at the full budget, or (no ``lr_grid``) the spec's own."""
    if results["chosen_lr"]:
        return "tuned once per label at the full budget (" + ", ".join(f"{k} {v:g}" for k, v in results["chosen_lr"].items()) + ")"
    lrs = ", ".join(f"{label} {entry['lr']:g}" for label, entry in results["labels"].items())
    return f"the spec's own, not tuned in this experiment ({lrs}; the spec says where they come from)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--budgets", default="256,512,1024,2048,3072")
    args = ap.parse_args()
    results = json.loads((ROOT / "docs" / "results" / args.name / "results.json").read_text())
    base = yaml.safe_load((ROOT / "experiments" / f"{args.name}.yaml").read_text()).get("base") or {}
    schedules = {entry["overrides"].get("lr_schedule", base.get("lr_schedule", "constant")) for entry in results["labels"].values()}
    if schedules != {"constant"}:
        raise SystemExit(f"{args.name}: lr_schedule {sorted(schedules)}; budgets can be read off the curves only at a constant lr")
    lines = [f"# {args.name}: verdicts at smaller budgets", "",
             f"Regenerate: `python experiments/budgets.py {args.name} --budgets {args.budgets}` (from "
             f"[{args.name}/results.json]({args.name}/results.json)). Each label's accuracy at a budget is read off its "
             "runs' curves at the evaluation that used exactly that many sequences; the runs use a constant learning rate, "
             f"so that is the state of a run stopped there. Learning rates: {lr_sentence(results)}. Seeds: "
             f"{results['seeds']}. Test prompts: {results['test_prompts']}.", "", f"Rule: {verdicts.RULE}.", ""]
    budgets = [int(b) for b in args.budgets.split(",")]
    for budget in budgets:
        lines += budget_section(results["labels"], budget)
    n = len(budgets) * len(results["labels"]) * (len(results["labels"]) - 1) // 2
    lines += [f"{n} verdicts, each at {verdicts.LEVEL:.0%}: were no two labels different at all, about {n * (1 - verdicts.LEVEL):.1f} "
              "of them would still say \"beats\" by chance (no correction for multiple comparisons is applied); a "
              "verdict that holds at one budget and not at its neighbours is weak evidence.", ""]
    out = ROOT / "docs" / "results" / f"{args.name}_budgets.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
