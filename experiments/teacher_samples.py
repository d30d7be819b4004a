"""What the teacher's sampled solutions hold, next to the task's reference solutions.

    python experiments/teacher_samples.py [--spec sft_rejection_h16] [--label L] [--prompts 500] [--seed 0]

One teacher sample per training prompt, drawn as SFT on teacher samples draws them (the
spec's ``base``: task, horizon, teacher, temperature, ``max_new_tokens``; with ``--label``,
that label's settings over it, e.g. its temperature), and the same
prompts' reference solutions. Each sample falls in one class: accepted or rejected by the
verifier, crossed with ``same`` (the reference word for word), ``wait`` (it holds a
``wait``: the oracle writes one after a slip and redoes the step) or ``other`` (it deviates
from the reference with no ``wait``: a wrong value carried on). ``wait_first`` counts the
``wait`` samples whose first deviation is the ``wait`` itself (sampled with no slip before
it). Rejection sampling trains on the accepted row. Writes ``docs/results/<spec>/teacher_samples.json``
(``teacher_samples_<label>.json`` with ``--label``) and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
import yaml

from opd.config.train import TrainConfig
from opd.report import markdown_table
from opd.rollouts.student import solution_rollout, teacher_rollout
from opd.run.setup import build_setup

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("same", "wait", "other")


def sample_class(sample: list[str], reference: list[str]) -> str:
    if sample == reference:
        return "same"
    return "wait" if "wait" in sample else "other"


def first_deviation(sample: list[str], reference: list[str]) -> str | None:
    return next((a for a, b in zip(sample, reference) if a != b), None)


def measure(base: dict, prompts: int, seed: int) -> dict:
    """Counts by (verifier, class) over ``prompts`` training prompts of the config ``base``."""
    cfg = TrainConfig(**{**base, "method": "sft", "sft_source": "teacher", "seed": seed, "progress": False})
    setup = build_setup(cfg)
    rows = setup.train_pool[:prompts]
    generator = torch.Generator().manual_seed(seed)
    samples, references = teacher_rollout(setup.env, rows, generator), solution_rollout(setup.env, rows, generator)
    words = setup.tokenizer.convert_ids_to_tokens
    counts, wait_first = collections.Counter(), collections.Counter()
    for b, (s_ids, r_ids) in enumerate(zip(samples.batch.completions(), references.batch.completions())):
        verdict = "accepted" if float(samples.rewards_B[b]) >= 1 else "rejected"
        sample, reference = words(s_ids), words(r_ids)
        kind = sample_class(sample, reference)
        counts[verdict, kind] += 1
        wait_first[verdict] += kind == "wait" and first_deviation(sample, reference) == "wait"
    verdicts = ("accepted", "rejected")
    return {"prompts": len(rows), "seed": seed, "temperature": cfg.temperature,
            "counts": {v: {c: counts[v, c] for c in CLASSES} for v in verdicts},
            "wait_first": {v: wait_first[v] for v in verdicts}}


def spec_config(spec: dict, label: str | None) -> dict:
    """The spec's ``base``, with ``label``'s settings over it (a clear error for an unknown label)."""
    if label is None:
        return spec["base"]
    if label not in spec["methods"]:
        raise SystemExit(f"no label {label!r} in the spec; its labels: {', '.join(spec['methods'])}")
    return {**spec["base"], **spec["methods"][label]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="sft_rejection_h16")
    ap.add_argument("--label", default=None, help="measure with this label's settings over the spec's base")
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = yaml.safe_load((ROOT / "experiments" / f"{args.spec}.yaml").read_text())
    res = {"spec": args.spec, "label": args.label, **measure(spec_config(spec, args.label), args.prompts, args.seed)}
    out = ROOT / "docs" / "results" / args.spec
    out.mkdir(parents=True, exist_ok=True)
    name = "teacher_samples.json" if args.label is None else f"teacher_samples_{args.label}.json"
    (out / name).write_text(json.dumps(res, indent=1) + "\n")
    table = [[v, str(sum(res["counts"][v].values())), *(str(res["counts"][v][c]) for c in CLASSES), str(res["wait_first"][v])]
             for v in res["counts"]]
    print(markdown_table(["verifier", "samples", "same as the reference", "with a wait", "other deviation",
                          "wait as the first deviation"], table))


if __name__ == "__main__":
    main()
