"""The verdict rule over a subset of a published experiment's seeds (a replication).

    python experiments/seed_subset.py NAME --seeds 7,8,9,10,11 [--pairs a:b,c:d]

Reads ``docs/results/NAME/results.json`` and applies the verdict rule
(:data:`opd.compare.verdicts.RULE`) to the final test accuracy of the given seeds alone.
Use: an experiment rerun with more seeds (``seeds: [0, ..., 4, 7, ..., 11]``) after its first
5 seeds measured no difference. Judging all 10 seeds after seeing the first 5 is a second look
at the data, so the rule's level over both looks is above 5%; the new seeds alone did not see
the first result and are judged as a replication. Writes
``docs/results/NAME/seeds_<seeds>.json`` and prints each verdict.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from opd.compare import verdicts

ROOT = Path(__file__).resolve().parents[1]


def subset(results: dict, seeds: list[str], pairs: list[tuple[str, str]] | None = None) -> dict:
    """``{"seeds", "rule", "means", "verdicts"}``: the rule over ``seeds`` alone, for ``pairs``
    (default: every pair of labels, in the report's order)."""
    finals = {}
    for label, entry in results["labels"].items():
        missing = [s for s in seeds if s not in entry["final"]]
        if missing:
            raise SystemExit(f"{label} has no final result for seed(s) {', '.join(missing)}; its seeds: {', '.join(entry['final'])}")
        finals[label] = {s: entry["final"][s]["accuracy"] for s in seeds}
    unknown = sorted({x for pair in pairs or [] for x in pair} - set(finals))
    if unknown:
        raise SystemExit(f"unknown label(s) {', '.join(unknown)}; the labels: {', '.join(finals)}")
    if pairs is None:
        found = verdicts.all_verdicts(finals)
    else:
        found = [verdicts.verdict(a, b, finals[a], finals[b]) for a, b in pairs]
    means = {label: {"mean": statistics.mean(v.values()), "std": statistics.stdev(v.values())} for label, v in finals.items()}
    return {"seeds": seeds, "rule": verdicts.RULE, "means": means, "verdicts": found}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 7,8,9,10,11")
    ap.add_argument("--pairs", default=None, help="comma-separated a:b label pairs (default: every pair)")
    args = ap.parse_args()
    folder = ROOT / "docs" / "results" / args.name
    results = json.loads((folder / "results.json").read_text())
    seeds = [s.strip() for s in args.seeds.split(",")]
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")] if args.pairs else None
    out = subset(results, seeds, pairs)
    path = folder / f"seeds_{'-'.join(seeds)}.json"
    path.write_text(json.dumps(out, indent=1))
    for label, m in out["means"].items():
        print(f"{label}: {m['mean']:.3f} ± {m['std']:.3f}")
    for v in out["verdicts"]:
        print(f"- {v['sentence']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
