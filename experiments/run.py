"""Run one shipped experiment (``experiments/NAME.yaml``) with ``opd compare`` and publish it.

    python experiments/run.py NAME [--out runs/NAME] [--force] [--jobs N]

Writes ``docs/results/NAME.md`` (the comparison report: the protocol and what of it is not
met, seeds, learning-rate grid, final accuracy mean ± std, the verdicts by the stated rule,
diagnostics side by side), ``docs/results/NAME_accuracy.png`` and
``docs/results/NAME/results.json`` (every number the verdicts come from), and regenerates the
instrument checks over every published report (``tuning_noise``, ``multiple_comparisons``).
Re-running reuses finished runs whose config is unchanged, with the same numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from opd.compare.driver import compare

ROOT = Path(__file__).resolve().parents[1]


def publish(name: str, out: Path, command: str | None = None) -> Path:
    """Write the report of ``out`` as ``docs/results/NAME.md``; ``command`` regenerates it
    (default ``python experiments/run.py NAME``)."""
    doc = ROOT / "docs" / "results" / f"{name}.md"
    spec = (ROOT / "experiments" / f"{name}.yaml").read_text().splitlines()
    intro = [ln[2:] for ln in spec if ln.startswith("# ") and not ln.startswith("# Run with")]
    report = (out / "report.md").read_text().split("\n", 1)[1]
    report = "\n".join(ln for ln in report.splitlines() if not ln.startswith("!["))
    shutil.copy(out / "accuracy_sequences.png", doc.with_name(f"{name}_accuracy.png"))
    (doc.parent / name).mkdir(exist_ok=True)
    shutil.copy(out / "results.json", doc.parent / name / "results.json")
    doc.write_text(
        f"# Experiment: {name}\n\n" + "\n".join(intro) + f"\n\nRegenerate: `{command or f'python experiments/run.py {name}'}` "
        f"(spec: `experiments/{name}.yaml`).\n\n![accuracy vs training sequences]({name}_accuracy.png)\n" + report + "\n"
    )
    refresh_checks()
    return doc


def refresh_checks() -> None:
    """Regenerate the instrument checks that read every published ``results.json``
    (``tuning_noise``, ``multiple_comparisons``, ``greedy_vs_sampled``, ``seed_splits``, and ``rule_level``'s
    skew of the committed pairs: seconds, no runs), so they never lag the reports they count
    (``tests/test_shared_runs.py`` holds the committed ones to it)."""
    import greedy_vs_sampled  # experiments/ is this script's folder, on sys.path
    import multiple_comparisons
    import rule_level
    import seed_splits
    import tuning_noise

    tuning_noise.main()
    multiple_comparisons.main()
    greedy_vs_sampled.main()
    seed_splits.main()
    rule_level.refresh_observed()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--out", default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, one worker process (one thread) each")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the testbed's tiny models gain nothing from more threads
    out = Path(args.out or f"runs/{args.name}")
    spec = os.path.relpath(ROOT / "experiments" / f"{args.name}.yaml")  # results.json names no machine's folders
    compare(spec, str(out), force=args.force, jobs=args.jobs)
    print(f"wrote {publish(args.name, out)}")


if __name__ == "__main__":
    main()
