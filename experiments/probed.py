"""What the probed experiments share (``myopic.py``, ``detour.py``): run a spec with
``opd compare`` under the protocol, probe the base and every reported seed's final
checkpoint at a few depths, judge the probe's metrics (each run's mean over depths) by the
same verdict rule as accuracy, and publish the report with a probe table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from opd.compare import verdicts
from opd.compare.driver import RESULTS_FILE, compare
from opd.compare.report import write_compare_report
from opd.diagnostics.diagnose import load, resolve

from run import publish  # experiments/run.py

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Probe:
    measure: Callable[[object, object, list, int], dict[int, dict]]  # (cfg, setup, problems, seed) -> {depth: metrics}
    keys: tuple[str, ...]  # the table's columns
    judged: tuple[str, ...]  # the metrics that get verdicts
    names: dict[str, str]  # column headings
    title: str
    intro: str  # the paragraph above the table
    small: tuple[str, ...] = ()  # keys printed as 1.2e-03
    prompts: int = 128  # held-out problems per depth unless --probe-prompts says otherwise


def run_probe(probe: Probe, ckpt: Path, n: int) -> dict[int, dict]:
    cfg, setup = load(ckpt)
    return probe.measure(cfg, setup, setup.eval_problems[:n], 0)


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
    """A step-0 stand-in: the first run's config with its prepared student as the student."""
    from opd.config.loader import load_config
    from opd.config.train import TrainConfig
    from opd.run.setup import resolve_student

    first = next(iter(next(iter(summary["labels"].values()))["runs"].values()))
    config = resolve(first["run_dir"])[1] / "config.yaml"
    probe_dir = out / "base_probe"
    if not (probe_dir / "config.json").exists():
        shutil.copytree(resolve_student(load_config(TrainConfig, config)), probe_dir, dirs_exist_ok=True)
        shutil.copy(config, probe_dir / "config.yaml")
    return probe_dir


def spec_base_checkpoint(spec_path: str, overrides: list[str], out: Path) -> Path:
    """The same step-0 stand-in without any run: the config the spec gives its first label
    at its last reported seed, with that label's prepared student as the student."""
    from opd.compare.driver import load_spec, run_config, run_path
    from opd.config.loader import save_config
    from opd.run.setup import resolve_student

    spec = load_spec(spec_path, overrides)
    label, seed = next(iter(spec.methods)), spec.seeds[-1]
    cfg = run_config(spec, label, seed, spec.lr_grid[0] if spec.lr_grid else None, run_path(out, label, seed))
    probe_dir = out / "base_probe"
    if not (probe_dir / "config.json").exists():
        shutil.copytree(resolve_student(cfg), probe_dir, dirs_exist_ok=True)
    save_config(cfg, probe_dir / "config.yaml")
    return probe_dir


def base_only(probe: Probe, spec: str, args, out: Path) -> None:
    """``--base-only``: probe the base alone (no training) and write ``base_probe.json``
    beside the report's results (``docs/results/NAME/`` unless ``--no-publish``)."""
    probes = {"prompts_per_depth": args.probe_prompts, "base": run_probe(probe, spec_base_checkpoint(spec, args.set, out), args.probe_prompts)}
    where = out if args.no_publish else ROOT / "docs" / "results" / args.name
    where.mkdir(parents=True, exist_ok=True)
    (where / "base_probe.json").write_text(json.dumps(no_nan(probes), indent=1))
    print("\n".join(probe_table(probe, {**probes, "labels": {}})))
    print(f"wrote {where / 'base_probe.json'}")


def probe_all(probe: Probe, summary: dict, out: Path, n: int) -> dict:
    """``{"base": depths, "labels": {label: {seed: depths}}}`` for every reported run."""
    labels = {label: {str(seed): run_probe(probe, resolve(run["run_dir"])[1], n) for seed, run in entry["runs"].items()}
              for label, entry in summary["labels"].items()}
    return {"prompts_per_depth": n, "base": run_probe(probe, base_checkpoint(summary, out), n), "labels": labels}


def probe_table(probe: Probe, probes: dict) -> list[str]:
    head = ["run", "k"] + [probe.names[k] for k in probe.keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    runs = {"base (before training)": [probes["base"]], **{label: list(by_seed.values()) for label, by_seed in probes["labels"].items()}}
    for label, depths_list in runs.items():
        for k in sorted(depths_list[0], key=int):
            cells = [mean_pm([d[k][key] for d in depths_list], ".1e" if key in probe.small else ".3f") for key in probe.keys]
            lines.append(f"| {label} | {k} | " + " | ".join(cells) + " |")
    return lines


def main(name: str | None, probe: Probe, doc: str) -> None:
    """The command line of a probed experiment: the spec ``experiments/NAME.yaml`` named on
    it (``name``, when given, is its default)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("name", nargs="?" if name else None, default=name, help="the spec: experiments/NAME.yaml")
    ap.add_argument("--out", default=None, help="default: runs/NAME")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, one worker process (one thread) each")
    ap.add_argument("--probe-prompts", type=int, default=probe.prompts)
    ap.add_argument("--set", nargs="*", default=[], help="spec or config overrides, as for opd compare (a smoke test)")
    ap.add_argument("--no-publish", action="store_true", help="leave docs/results alone")
    ap.add_argument("--base-only", action="store_true", help="probe the base alone, train nothing")
    args = ap.parse_args()
    name = args.name
    torch.set_num_threads(1)
    out = Path(args.out or f"runs/{name}")
    spec = os.path.relpath(ROOT / "experiments" / f"{name}.yaml")  # results.json names no machine's folders
    if args.base_only:
        return base_only(probe, spec, args, out)
    summary = compare(spec, str(out), overrides=args.set, jobs=args.jobs)
    probes = probe_all(probe, summary, out, args.probe_prompts)
    per_metric = {f"probe/{key}": {label: {seed: depth_mean(d, key) for seed, d in by_seed.items()}
                                   for label, by_seed in probes["labels"].items()} for key in probe.judged}
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
    path = publish(name, out, f"python experiments/{Path(sys.argv[0]).name} {name}")
    lines = ["", f"## {probe.title}", "", probe.intro.format(n=args.probe_prompts), ""]
    path.write_text(path.read_text() + "\n".join(lines + probe_table(probe, probes)) + "\n")
    print(f"wrote {path}")
