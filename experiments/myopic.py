"""Myopic supervision on the testbed: does per-token OPD teach recovery from a wrong step?

    python experiments/myopic.py [--out runs/myopic] [--probe-prompts 64]

Runs ``experiments/myopic.yaml`` with ``opd compare`` (each method's lr from the same grid
on the validation split, then 2 seeds on the test split, 480 training sequences each), then
the correction-path probe of ``opd diagnose`` on the base and on every final checkpoint:
held-out reference solutions cut after step k, step k's result replaced by a wrong digit;
the student's P(`wait`) there, how often its greedy continuation writes `wait`, and how
often it still reaches the right answer. Writes ``docs/results/myopic.md`` and a plot.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

import torch

from opd.compare.driver import compare
from opd.diagnostics.diagnose import load, probe_section, resolve

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "myopic.yaml"
DOC = ROOT / "docs" / "results" / "myopic.md"


def probe(ckpt: Path, n: int) -> dict:
    cfg, setup = load(ckpt)
    generator = torch.Generator().manual_seed(0)
    return probe_section(cfg, setup.env, setup.tokenizer, setup.eval_problems[:n], generator)["depths"]


def mean_pm(values: list[float], fmt: str = ".3f") -> str:
    if len(values) < 2:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def probe_rows(label: str, probes: list[dict], acc: list[float]) -> list[str]:
    rows = []
    for k in sorted(probes[0]):
        cells = [mean_pm([p[k]["p_wait"] for p in probes], ".1e")]
        cells += [mean_pm([p[k][key] for p in probes]) for key in ("onset", "recovery", "clean_recovery")]
        rows.append(f"| {label} | {mean_pm(acc)} | {k} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/myopic")
    ap.add_argument("--probe-prompts", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    summary = compare(str(SPEC), args.out)
    lines = header(summary)
    lines += probe_rows("base (before training)", [probe(base_checkpoint(summary), args.probe_prompts)], [start_accuracy(summary)])
    for label, entry in summary["labels"].items():
        probes, acc = [], []
        for run in entry["runs"].values():
            probes.append(probe(resolve(run["run_dir"])[1], args.probe_prompts))
            acc.append(run["history"][-1]["eval/accuracy"])
        lines += probe_rows(f"{label} (lr {entry['lr']:g})", probes, acc)
    shutil.copy(Path(args.out) / "accuracy_sequences.png", DOC.with_name("myopic_accuracy.png"))
    training = (Path(args.out) / "report.md").read_text().split("\n", 1)[1]  # opd compare's report, title dropped
    training = "\n".join(ln for ln in training.splitlines() if not ln.startswith("!["))
    DOC.write_text("\n".join(lines) + "\n\n## Training (the `opd compare` report)\n" + training + "\n")
    print(f"wrote {DOC}")


def _first_run(summary: dict) -> dict:
    return next(iter(next(iter(summary["labels"].values()))["runs"].values()))


def base_checkpoint(summary: dict) -> Path:
    """A step-0 stand-in: the first run's config with the prepared base as the student."""
    from opd.testbed.builder import prepare_student_base

    base = prepare_student_base("addition", 4, quiet=True)
    probe_dir = Path(_first_run(summary)["run_dir"]).parent.parent / "base_probe"
    if not (probe_dir / "config.json").exists():
        shutil.copytree(base, probe_dir, dirs_exist_ok=True)
        shutil.copy(resolve(_first_run(summary)["run_dir"])[1] / "config.yaml", probe_dir / "config.yaml")
    return probe_dir


def start_accuracy(summary: dict) -> float:
    return _first_run(summary)["history"][0]["eval/accuracy"]


def header(summary: dict) -> list[str]:
    grid = ", ".join(f"{float(lr):g}" for lr in next(iter(summary["lr_info"]["grid"].values())))
    return [
        "# Myopic supervision: does per-token OPD teach recovery?", "",
        "Regenerate: `python experiments/myopic.py` (spec: `experiments/myopic.yaml`). Each method's lr is",
        f"chosen from {{{grid}}} by validation accuracy, then 2 seeds on the test split (200 prompts),",
        f"{summary['budget']:g} training sequences each. Probe: 64 held-out problems, wrong digit planted in step k.",
        "", "![accuracy](myopic_accuracy.png)", "",
        "| run | greedy acc. (end) | k | P(wait) | greedy starts with wait | recovery | recovery, clean prefix |",
        "|---|---|---|---|---|---|---|",
    ]


if __name__ == "__main__":
    main()
