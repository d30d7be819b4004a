"""Myopic supervision on the testbed: does per-token OPD teach recovery from a wrong step?

    python experiments/myopic.py [--out runs/myopic] [--probe-prompts 128] [--set KEY=VALUE ...]

Runs ``experiments/myopic.yaml`` with ``opd compare`` under the protocol, then the
correction-path probe of ``opd diagnose`` on the base and on every reported seed's final
checkpoint: held-out reference solutions cut after step k, step k's result replaced by a
wrong digit (k = 1, 2, 4). Per run and depth: the student's P(`wait`) there, how often its
greedy continuation starts with `wait` (onset), how often it then redoes the step exactly,
how often it still reaches the right answer, and how often it says `wait` after a correct
step (false alarm). The probe's metrics, each the mean over depths, get verdicts by the
same rule as accuracy. Writes ``docs/results/myopic.md``, its plot, and
``docs/results/myopic/results.json`` (with a ``probe`` section).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from pathlib import Path

import torch

from opd.compare import verdicts
from opd.compare.driver import RESULTS_FILE, compare
from opd.compare.report import write_compare_report
from opd.diagnostics.diagnose import load, probe_section, resolve

from run import publish  # experiments/run.py

NAME = "myopic"
ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / f"{NAME}.yaml"
DOC = ROOT / "docs" / "results" / f"{NAME}.md"
KEYS = ("p_wait", "onset", "wait_redo", "redo_given_wait", "recovery", "clean_recovery", "false_wait", "false_onset")
JUDGED = ("onset", "wait_redo", "recovery", "false_onset")  # probe metrics that get verdicts
NAMES = {"p_wait": "P(wait)", "onset": "onset", "wait_redo": "wait + right redo", "redo_given_wait": "P(right redo | wait)",
         "recovery": "recovery", "clean_recovery": "recovery, clean prefix", "false_wait": "P(wait), clean prefix",
         "false_onset": "false onset"}


def probe(ckpt: Path, n: int) -> dict[int, dict]:
    cfg, setup = load(ckpt)
    generator = torch.Generator().manual_seed(0)
    return probe_section(cfg, setup.env, setup.tokenizer, setup.eval_problems[:n], generator)["depths"]


def no_nan(x):
    """``x`` with every NaN float replaced by None (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


def depth_mean(depths: dict[int, dict], key: str) -> float:
    """A run's probe metric averaged over depths (NaN depths skipped; NaN if all are)."""
    vals = [d[key] for d in depths.values() if not math.isnan(d[key])]
    return sum(vals) / len(vals) if vals else math.nan


def mean_pm(values: list[float], fmt: str = ".3f") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) < 2:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def base_checkpoint(summary: dict, out: Path) -> Path:
    """A step-0 stand-in: the first run's config with the prepared base as the student."""
    from opd.testbed.builder import WAIT_CORRECTIONS, prepare_student_base

    first = next(iter(next(iter(summary["labels"].values()))["runs"].values()))
    base = prepare_student_base("addition", 4, quiet=True, correction_rate=WAIT_CORRECTIONS)
    probe_dir = out / "base_probe"
    if not (probe_dir / "config.json").exists():
        shutil.copytree(base, probe_dir, dirs_exist_ok=True)
        shutil.copy(resolve(first["run_dir"])[1] / "config.yaml", probe_dir / "config.yaml")
    return probe_dir


def probe_all(summary: dict, out: Path, n: int) -> dict:
    """``{"base": depths, "labels": {label: {seed: depths}}}`` for every reported run."""
    labels = {label: {str(seed): probe(resolve(run["run_dir"])[1], n) for seed, run in entry["runs"].items()}
              for label, entry in summary["labels"].items()}
    return {"prompts_per_depth": n, "base": probe(base_checkpoint(summary, out), n), "labels": labels}


def probe_table(probes: dict) -> list[str]:
    head = ["run", "k"] + [NAMES[k] for k in KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    runs = {"base (before training)": [probes["base"]], **{label: list(by_seed.values()) for label, by_seed in probes["labels"].items()}}
    for label, depths_list in runs.items():
        for k in sorted(depths_list[0], key=int):
            cells = [mean_pm([d[k][key] for d in depths_list], ".1e" if key in ("p_wait", "false_wait") else ".3f") for key in KEYS]
            lines.append(f"| {label} | {k} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"runs/{NAME}")
    ap.add_argument("--probe-prompts", type=int, default=128)
    ap.add_argument("--set", nargs="*", default=[], help="spec or config overrides, as for opd compare (a smoke test)")
    ap.add_argument("--no-publish", action="store_true", help="leave docs/results alone")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    summary = compare(str(SPEC), str(out), overrides=args.set)
    probes = probe_all(summary, out, args.probe_prompts)
    per_metric = {f"probe/{key}": {label: {seed: depth_mean(d, key) for seed, d in by_seed.items()}
                                   for label, by_seed in probes["labels"].items()} for key in JUDGED}
    results = summary["results"]
    results["probe"] = no_nan(probes)
    results["metric_verdicts"].update(verdicts.metric_verdicts(per_metric))
    for metric, by_label in per_metric.items():  # the per-seed values the verdicts read, beside the finals
        for label, by_seed in by_label.items():
            for seed, value in by_seed.items():
                results["labels"][label]["final"][seed][metric] = value
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    report = write_compare_report(out, summary)
    if args.no_publish:
        print(f"wrote {report} (not published)")
        return
    doc = publish(NAME, out)
    lines = ["", "## Correction probe", "",
             f"{args.probe_prompts} held-out test problems per depth k, step k's result replaced by a plausible wrong "
             "digit; greedy continuations. Mean ± std over the reported seeds. The verdicts above on `probe/*` take each "
             "run's mean over depths. `false onset` and `P(wait), clean prefix` are false alarms: lower is better.", ""]
    doc.write_text(doc.read_text() + "\n".join(lines + probe_table(probes)) + "\n")
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
