"""Per-step training metrics of one label's reported runs, kept beside its report.

    python experiments/step_trace.py NAME --label LABEL [--keys rollout/budget signal/reliable_len]

A report's diagnostics table gives each logged metric's mean over training; a claim about
when something happened in training (the generation budget Prune-OPD set in its first
steps, say) needs the steps themselves. This reads ``runs/NAME/runs/LABEL/seedS/metrics.jsonl``
of every reported seed (the training rows: those that log the first key) and writes, per
seed and key, the value at every step, with the mean over steps 0-15 and the first step
after step 0 at which each key reaches its largest value over the run, to
``docs/results/NAME/step_trace.json``. Trains nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EARLY = 16  # steps 0-15: before a run's first evaluation at eval_every 16


def seed_trace(metrics_path: Path, keys: list[str]) -> dict:
    """``{key: {"steps": [...], "early_mean": ..., "first_back_at_max": step or None}}``
    from one run's ``metrics.jsonl`` (rows that log ``keys[0]``)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if keys[0] in r]
    out = {}
    for key in keys:
        values = [r.get(key) for r in rows]
        known = [v for v in values if v is not None]
        top = max(known) if known else None
        out[key] = {"steps": values,
                    "early_mean": statistics.mean(v for v in values[:EARLY] if v is not None) if known else None,
                    "first_back_at_max": next((i for i, v in enumerate(values) if i > 0 and v == top), None)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a published report whose runs are in runs/NAME")
    ap.add_argument("--label", required=True)
    ap.add_argument("--keys", nargs="+", default=["rollout/budget", "signal/reliable_len"])
    args = ap.parse_args()
    results = json.loads((ROOT / "docs" / "results" / args.name / "results.json").read_text())
    if args.label not in results["labels"]:
        raise SystemExit(f"{args.name} has no label {args.label}; its labels: {', '.join(results['labels'])}")
    root = ROOT / "runs" / args.name / "runs" / args.label
    found = {str(seed): seed_trace(root / f"seed{seed}" / "metrics.jsonl", args.keys) for seed in results["seeds"]}
    path = ROOT / "docs" / "results" / args.name / "step_trace.json"
    path.write_text(json.dumps({"label": args.label, "keys": args.keys, "early_steps": EARLY, "seeds": found}, indent=1))
    for seed, trace in found.items():
        print(seed, {k: (round(t["early_mean"], 1) if t["early_mean"] is not None else None, t["first_back_at_max"])
                     for k, t in trace.items()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
