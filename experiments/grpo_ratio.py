"""GRPO's sequences to 0.9 of the teacher at horizon 16, past 6,144 (E1's GRPO/OPD ratio).

    python experiments/grpo_ratio.py [--budget 12288] [--seeds 0 1 2 3 4] [--from runs/grpo_stall] [--out runs/grpo_ratio]

In ``modchain_labeled_promise_h16_6144`` OPD reached 0.9 of the teacher's test accuracy in
every seed by 1,024 sequences and GRPO in 3 of 5 by the budget, so GRPO/OPD was only bounded
(at least 5.50x). This continues each GRPO run of ``grpo_stall.py`` (the comparison's config
on this machine, a checkpoint every 512 sequences) from its last checkpoint to ``--budget``
sequences (``opd.compare.saved_runs.extendable``: the continued run is the run trained
straight to that budget), reruns OPD's seeds here to 1,536 sequences, and says through how
many sequences each rerun equals the committed curve. Then it gives each label's sequences to
the target, seed by seed, and the ratio by the protocol's rule
(``opd.compare.verdicts.sequences_ratio``: a ratio only when every seed of both reached the
target; otherwise a bound, unreached seeds counted at the budget), and reads GRPO's final
greedy rollouts by modulus (``grpo_stall.measure``). Every lr is the one tuned at 1,536
sequences (GRPO 3e-5, OPD 3e-5), not at this budget. Writes ``docs/results/grpo_ratio.md``
and ``docs/results/grpo_ratio/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from opd.compare.driver import load_spec, run_config
from opd.compare.saved_runs import run_or_reuse
from opd.compare.verdicts import sequences_ratio, target_summary
from opd.report import markdown_table
from opd.run.checkpoint import latest_checkpoint

import grpo_stall  # experiments/grpo_stall.py
from grpo_stall import NAME, ROOT, curve, same_through

TARGET = 0.9  # of the oracle teacher's test accuracy, 1.000
OPD_BUDGET = 1536  # every committed OPD seed reached the target by 1,024


def spec_for(budget: int):
    return load_spec(os.path.relpath(ROOT / "experiments" / f"{NAME}.yaml"), [f"budget={budget}"])


def grpo_runs(seeds: list[int], source: Path, out: Path, budget: int) -> dict[int, dict]:
    """Each GRPO seed's run to ``budget``: ``source``'s run copied to ``out`` (once) and continued."""
    for seed in seeds:
        if (source / f"seed{seed}").is_dir() and not (out / f"seed{seed}").exists():
            shutil.copytree(source / f"seed{seed}", out / f"seed{seed}")
    return grpo_stall.train(seeds, out, [f"budget={budget}"])


def opd_runs(seeds: list[int], out: Path) -> dict[int, dict]:
    spec, runs = spec_for(OPD_BUDGET), {}
    for seed in seeds:
        cfg = run_config(spec, "opd", seed, None, out / f"seed{seed}")
        result = run_or_reuse(cfg)
        print(f"opd seed {seed}: {'reused' if result['reused'] else 'trained'}", flush=True)
        runs[seed] = {"run_dir": Path(cfg.run_dir), "history": result["history"], "machine": result["machine"]}
    return runs


def committed(label: str) -> dict[int, list]:
    data = json.loads((ROOT / "docs" / "results" / NAME / "results.json").read_text())
    return {int(s): [tuple(x) for x in c] for s, c in data["labels"][label]["curves"].items()}


def curve_table(runs: dict, before: dict) -> str:
    fmt = lambda c: " ".join(f"{a:.2f}" for _, a in c)  # noqa: E731
    rows = []
    for seed, run in runs.items():
        here = curve(run["history"])
        through = same_through(here, before[seed])
        rows.append([str(seed), fmt(before[seed]), fmt(here), f"{through:,}" if through >= 0 else "none"])
    return markdown_table(["seed", "committed (to 6,144)", "here", "equal through (sequences)"], rows)


def reach_rows(reaches: dict) -> list[list[str]]:
    show = lambda v: "not reached" if v is None else f"{v:,.0f}"  # noqa: E731
    return [[label, *(show(v) for v in reach["per_seed"].values()), f"{reach['reached']} of {len(reach['per_seed'])}",
             "-" if reach["mean"] is None else f"{reach['mean']:,.0f}"] for label, reach in reaches.items()]


def modulus_rows(finals: dict) -> list[list[str]]:
    rows = []
    for seed, row in finals.items():
        by_m = row["by_modulus"]
        rows.append([str(seed), f"{row['accuracy']:.3f}"] + [f"{by_m[m]['right'] / by_m[m]['problems']:.3f}" for m in sorted(by_m)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=12288)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--from", dest="source", default="runs/grpo_stall", help="grpo_stall.py's runs, continued here")
    ap.add_argument("--out", default="runs/grpo_ratio")
    ap.add_argument("--train-only", action="store_true", help="train (or reuse) the named seeds' runs and write nothing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    grpo = grpo_runs(args.seeds, Path(args.source), out / "grpo", args.budget)
    if args.train_only:
        return
    opd = opd_runs(args.seeds, out / "opd")
    histories = {"grpo": {s: r["history"] for s, r in grpo.items()}, "opd": {s: r["history"] for s, r in opd.items()}}
    reaches = {label: target_summary(h, TARGET) for label, h in histories.items()}
    ratio = sequences_ratio("grpo", "opd", reaches["grpo"], reaches["opd"], float(args.budget))
    finals = {s: grpo_stall.measure(latest_checkpoint(r["run_dir"])) for s, r in grpo.items()}
    machines = sorted({r.get("machine") or "not recorded" for r in [*grpo.values(), *opd.values()]})
    doc_dir = ROOT / "docs" / "results"
    (doc_dir / "grpo_ratio").mkdir(exist_ok=True)
    (doc_dir / "grpo_ratio" / "results.json").write_text(json.dumps(
        {"spec": f"experiments/{NAME}.yaml", "budget": args.budget, "opd_budget": OPD_BUDGET, "seeds": args.seeds,
         "target": TARGET, "curves": {label: {s: curve(h) for s, h in hs.items()} for label, hs in histories.items()},
         "sequences_to_target": reaches, "ratio": ratio, "grpo_final_by_modulus": finals, "machines": machines},
        indent=1))
    intro = __doc__.split("\n\n", 2)[2].rsplit("Writes", 1)[0].strip()
    doc = ["# GRPO's sequences to the target at horizon 16", "", intro, "",
           f"Regenerate: `python experiments/grpo_stall.py --train-only; python experiments/grpo_ratio.py --budget "
           f"{args.budget}`; numbers in [grpo_ratio/results.json](grpo_ratio/results.json). Computed on "
           f"(each run's record): {' | '.join(machines)}.", "",
           f"## GRPO to {args.budget:,} sequences", "", "Greedy test accuracy every 512 sequences.", "",
           curve_table(grpo, committed("grpo")), "",
           f"## OPD to {OPD_BUDGET:,} sequences", "", curve_table(opd, committed("opd")), "",
           f"## Sequences to {TARGET} of the teacher (accuracy >= {TARGET:.3f})", "",
           markdown_table(["label", *(f"seed {s}" for s in args.seeds), "reached", "mean"], reach_rows(reaches)), "",
           f"- {ratio['sentence']}", "",
           f"## GRPO's final greedy test accuracy by modulus ({args.budget:,} sequences)", "",
           markdown_table(["seed", "accuracy", *(f"mod {m}" for m in sorted(next(iter(finals.values()))["by_modulus"]))],
                          modulus_rows(finals)), ""]
    (doc_dir / "grpo_ratio.md").write_text("\n".join(doc))
    print("\n".join(doc))


if __name__ == "__main__":
    main()
