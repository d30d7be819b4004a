"""The ``opd compare`` report: accuracy curves with seed bands, mean ± std tables, diagnostics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from opd.compare import protocol, verdicts
from opd.run.metrics_log import read_metrics
from opd.report import accuracy_axes, markdown_table, save_accuracy_plot

AXES = {  # x key of the evaluation rows -> (file stem, axis label)
    "usage/sequences": ("accuracy_sequences", "training sequences used"),
    "usage/teacher_tokens": ("accuracy_teacher_tokens", "teacher tokens used"),
    "usage/wall_s": ("accuracy_wall_time", "training wall time (s)"),
}
DIAG_PREFIXES = ("diag/", "teacher/")
DIAG_KEYS = ("rollout/length", "rollout/truncated")
COLUMNS = ["label", "method", "lr", "final accuracy", "pass@k", "sequences", "teacher tokens", "optimizer steps",
           "train wall s", "degenerate"]


def _histories(entry: dict) -> list[list[dict]]:
    return [run["history"] for run in entry["runs"].values()]


def seed_band(histories: list[list[dict]], x_key: str, y_key: str = "eval/accuracy"):
    """``(xs, mean, lo, hi)`` over seeds (lo/hi: min and max). Seeds with the same number of
    evaluations are aligned evaluation by evaluation (x: the seeds' mean); otherwise each
    curve is interpolated on the union of the evaluation points, within the x range every
    seed covers."""
    curves = [(np.asarray([r[x_key] for r in h], float), np.asarray([r.get(y_key, math.nan) for r in h], float)) for h in histories]
    if len({len(x) for x, _ in curves}) == 1:
        xs, ys = np.stack([x for x, _ in curves]).mean(0), np.stack([y for _, y in curves])
    else:
        start, stop = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
        xs = np.unique(np.concatenate([x for x, _ in curves]))
        xs = xs[(xs >= start) & (xs <= stop)]
        ys = np.stack([np.interp(xs, x, y) for x, y in curves])
    return xs, ys.mean(0), ys.min(0), ys.max(0)


def plot_bands(summary: dict, x_key: str, path: Path) -> Path:
    fig, ax = accuracy_axes()
    n = len(summary["seeds"])
    for label, entry in summary["labels"].items():
        xs, mean, lo, hi = seed_band(_histories(entry), x_key)
        line = ax.plot(xs, mean, marker="o", ms=3, label=f"{label} (lr {entry['lr']:g})")[0]
        if n > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_title(f"mean over {n} seed{'s' if n > 1 else ''}" + (" (band: min-max)" if n > 1 else ""), fontsize=9)
    return save_accuracy_plot(fig, ax, path, AXES[x_key][1])


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _pm(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _pass_at_k(row: dict) -> float:
    return next((v for k, v in row.items() if k.startswith("eval/pass@")), math.nan)


def final_rows(summary: dict) -> list[list[str]]:
    rows = []
    for label, entry in summary["labels"].items():
        last = [h[-1] for h in _histories(entry)]
        mean = lambda key: _mean_std([r[key] for r in last])[0]  # noqa: E731
        rows.append([
            label, entry["method"], f"{entry['lr']:g}", _pm([r.get("eval/accuracy", math.nan) for r in last]),
            _pm([_pass_at_k(r) for r in last]), f"{mean('usage/sequences'):.0f}", f"{mean('usage/teacher_tokens'):.0f}",
            _optimizer_steps(last, entry.get("ppo_epochs", 1)), f"{mean('usage/wall_s'):.1f}", degenerate_cell(entry),
        ])
    return rows


def _optimizer_steps(last: list[dict], ppo_epochs: int) -> str:
    """Mean optimizer steps applied, with ``ppo_epochs`` shown when a step is several updates."""
    steps = [r.get("usage/optimizer_steps", math.nan) for r in last]
    text = "n/a" if any(math.isnan(x) for x in steps) else f"{sum(steps) / len(steps):.0f}"
    return text + (f" ({ppo_epochs} per step)" if ppo_epochs > 1 else "")


def degenerate_cell(entry: dict) -> str:
    """``-``, or the knobs that make the label's method reduce to another one on its runs."""
    knobs = entry.get("degenerate") or []
    return "yes: change " + ", ".join(f"`{k}`" for k in knobs) if knobs else "-"


def run_diagnostics(run_dir: str) -> dict[str, float]:
    """Mean over the training steps of a run of its diag/*, teacher/* and rollout length keys."""
    sums: dict[str, list[float]] = {}
    for row in read_metrics(run_dir):
        for key, value in row.items():
            if (key.startswith(DIAG_PREFIXES) or key in DIAG_KEYS) and value is not None:
                sums.setdefault(key, []).append(value)
    return {key: sum(vals) / len(vals) for key, vals in sums.items()}


def diagnostics_table(summary: dict) -> str:
    per_label = {}
    for label, entry in summary["labels"].items():
        runs = [run_diagnostics(run["run_dir"]) for run in entry["runs"].values()]
        keys = sorted({k for r in runs for k in r})
        per_label[label] = {k: float(np.mean([r[k] for r in runs if k in r])) for k in keys}
    keys = sorted({k for d in per_label.values() for k in d})
    if not keys:
        return "(no diag/, teacher/ or rollout length metrics were logged)"
    rows = [[f"`{k}`"] + [f"{per_label[label][k]:.4g}" if k in per_label[label] else "-" for label in per_label] for k in keys]
    return markdown_table(["metric"] + list(per_label), rows)


def spread_text(summary: dict) -> str:
    seeds = summary["seeds"]
    if len(seeds) == 1:
        return (f"One seed ({seeds[0]}): no spread was measured, so differences between labels carry no error bar; "
                "run with more `seeds` before reading much into them.")
    parts = []
    for label, entry in summary["labels"].items():
        accs = [h[-1].get("eval/accuracy", math.nan) for h in _histories(entry)]
        parts.append(f"{label} {min(accs):.3f}–{max(accs):.3f} (std {_mean_std(accs)[1]:.3f})")
    return (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}) per label; ± is the standard deviation over seeds "
            f"(ddof=1). Final accuracy ranged over seeds as: {'; '.join(parts)}. Whether a gap between two labels "
            "is measured is for the verdict rule below, not for these ranges.")


def grid_table(lr_info: dict) -> str:
    """Each label's validation score (``lr_info["metric"]``) at every lr it was tuned at (``-``: not tried: the
    grid was widened for another label), its choice, and whether the choice is bracketed."""
    grid = lr_info["grid"]
    lrs = sorted({lr for scores in grid.values() for lr in scores}, key=float)
    bracketed = lr_info.get("bracketed", {})
    rows = [[label] + [f"{grid[label][lr]:.3f}" if lr in grid[label] else "-" for lr in lrs]
            + [f"{lr_info['chosen'][label]:g}", "yes" if bracketed.get(label, True) else "no (at an edge)"] for label in grid]
    return markdown_table(["label"] + [f"lr {lr}" for lr in lrs] + ["chosen", "bracketed"], rows)


def _budget_text(summary: dict) -> str:
    if summary["budget"] is None:
        return "each run's own `steps` (no budget set)"
    return f"{summary['budget']:g} {summary['budget_kind'].replace('_', ' ')} per run (a run stops at the first step that reaches it)"


def _lr_section(summary: dict) -> str:
    info = summary["lr_info"]
    if info is None:
        return "No `lr_grid`: every label ran at the lr of its config (shown in the table)."
    seeds = info.get("seeds") or [info["seed"]]
    which = (f"the tuning seed {seeds[0]}" if len(seeds) == 1
             else f"the mean over the tuning seeds {', '.join(map(str, seeds))}")
    metric = info.get("metric", "accuracy")
    judged = "final greedy accuracy" if metric == "accuracy" else f"final {metric} (sampled accuracy)" if metric == "pass@1" else f"final {metric}"
    return (f"Each label's lr was chosen by {judged} on the validation split with {which} "
            f"(never a reported seed; same budget; ties go to the smaller lr); a choice at an edge of the "
            "grid widened it past that edge and was tuned again. The compared runs then used it on the test split."
            f"\n\n{grid_table(info)}")


def protocol_text(results: dict) -> str:
    unmet = results["protocol"]["unmet"]
    if not unmet:
        text = "Every rule of the protocol (`opd.compare.protocol`) is met."
    else:
        text = "Rules of the protocol (`opd.compare.protocol`) this comparison does not meet:\n\n" + "\n".join(f"- {u}" for u in unmet)
    flags = results["protocol"]
    return (text + undecided_text(flags.get("undecided_lr", [])) + collapse_text(flags.get("beside_collapse", []))
            + split_text(flags.get("split_seeds", [])))


def _flag_list(heading: str, items: list[str]) -> str:
    """A flag of the protocol: ``heading (reason; flagged, not a rule):`` and one bullet per
    label ("" when none is flagged); ``heading`` ends inside its open parenthesis."""
    return f"\n\n{heading}; flagged, not a rule):\n\n" + "\n".join(f"- {x}" for x in items) if items else ""


def undecided_text(undecided: list[str]) -> str:
    """The labels whose lr the tuning chose inside its noise (``protocol.tuning_margin``)."""
    return _flag_list("Learning rates chosen inside the tuning noise (the chosen lr's validation accuracy over the "
                      "runner-up's is within a 95% interval of their difference; another tuning seed could have "
                      "chosen another lr", undecided)


def collapse_text(beside: list[str]) -> str:
    """The labels whose chosen lr sits next to a larger lr that collapsed on tuning (``protocol.beside_collapse``)."""
    return _flag_list(f"Learning rates chosen beside a collapse (the next larger lr of the grid scored under "
                      f"{protocol.NEXT_COLLAPSE:g}x the chosen lr's validation accuracy; over the published labels "
                      "such a choice split its reported seeds more often, docs/results/seed_splits.md", beside)


def split_text(splits: list[str]) -> str:
    """The labels whose reported seeds split into two groups far apart (``protocol.seed_split``)."""
    return _flag_list(f"Labels whose reported seeds split into two groups (the widest gap between neighbouring final "
                      f"accuracies at least {protocol.SPLIT_GAP:g} and over {protocol.SPLIT_RATIO:g}x the wider group's "
                      "range; a mean over seeds and a verdict on it then describe a mixture, and two tuning seeds can "
                      "miss the low group", splits)


def holm_text(found: list[dict]) -> str:
    """One line: the "beats" verdicts that Holm's correction over the comparison's pairs (its
    planned pairs, when the spec names them) keeps."""
    h = verdicts.holm_summary(found)
    if not h["beats"]:
        return ""
    planned = not all(v.get("planned", True) for v in found)
    over = f"the {h['pairs']} planned pairs" if planned else f"these {h['pairs']} pairs"
    text = f"Under Holm's correction over {over} (the rule's p-values, the same level): {h['stay']} of {h['beats']} verdicts stay"
    text += "." if not h["go"] else "; these go: " + "; ".join(s.split(" (")[0] for s in h["go"]) + "."
    return text + (" The pairs marked exploratory were not planned: no correction is claimed for them." if planned else "")


def _sentence(v: dict) -> str:
    return f"- {v['sentence']}" + ("" if v.get("planned", True) else " [exploratory: not a planned pair]")


def _sentences_and_holm(found: list[dict]) -> list[str]:
    """The verdicts' lines, then Holm's line when every pair has a p-value (a report made
    before p-values were saved has none)."""
    holm_line = holm_text(found) if all("p" in v or v["interval"] is None for v in found) else ""
    return [_sentence(v) for v in found] + (["", holm_line] if holm_line else [])


def verdict_text(results: dict) -> str:
    lines = [f"Rule: {results['rule']}.", ""] + _sentences_and_holm(results["verdicts"])
    for metric, found in results.get("metric_verdicts", {}).items():
        levels = "; ".join(f"{label} {_pm([f.get(metric, math.nan) for f in entry['final'].values()])}"
                           for label, entry in results["labels"].items())
        teacher = results.get(f"teacher_{metric}")
        levels += f"; the teacher {teacher:.3f}" if teacher is not None else ""
        lines += ["", f"On `{metric}` (final; mean ± std over seeds: {levels}):", ""] + _sentences_and_holm(found)
    target = results.get("target_accuracy")
    if target is not None:
        lines += ["", f"Sequences to {results['target']:g} of the teacher's test accuracy "
                      f"({results['teacher_accuracy']:.3f}, so accuracy >= {target:.3f}):", ""]
        for label, entry in results["labels"].items():
            reach = entry["sequences_to_target"]
            n = len(reach["per_seed"])
            got = f"{reach['mean']:.0f} (mean over {n} seeds)" if reach["mean"] is not None else f"not reached ({reach['reached']} of {n} seeds did)"
            lines.append(f"- {label}: {got}")
        ratios = results.get("sequences_ratios") or []
        lines += ["", "Ratios of sequences to the target:", ""] + [f"- {r['sentence']}" for r in ratios] if ratios else []
    return "\n".join(lines)


def bases_text(summary: dict) -> str:
    """One line: the student weights every label started from, by hash (first 12 hex digits),
    so that two reports show whether they ran from one base."""
    groups: dict[tuple, list[str]] = {}
    for label, entry in summary["labels"].items():
        base = entry.get("student_base") or {}
        seed = f" with `base_seed={base['base_seed']}`" if base.get("base_seed") else ""
        groups.setdefault((f"`{base.get('student')}`{seed}", base.get("weights_sha256")), []).append(label)
    if all(sha is None for _, sha in groups):
        return ""
    parts = [f"{student} (weights sha256 {sha[:12] if sha else 'n/a: not a local directory'})"
             + ("" if len(groups) == 1 else f" for {', '.join(labels)}") for (student, sha), labels in groups.items()]
    return "\nStudent base: " + "; ".join(parts) + " (`student_base` in results.json holds the whole hash)."


def machines_text(summary: dict) -> str:
    """The machines the reported runs were computed on (runs saved before runs said so: unknown)."""
    counts: dict[str, int] = {}
    for entry in summary["labels"].values():
        for run in entry["runs"].values():
            name = run.get("machine") or "not recorded"
            counts[name] = counts.get(name, 0) + 1
    return "\nComputed on: " + "; ".join(f"{name} ({n} runs)" if len(counts) > 1 else name for name, n in counts.items()) + "."


def write_compare_report(out: Path, summary: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    images = [plot_bands(summary, x_key, out / f"{stem}.png").name for x_key, (stem, _) in AXES.items()]
    plots = "\n".join(f"![{AXES[x][1]}]({name})" for x, name in zip(AXES, images))
    text = REPORT.format(
        spec=summary["spec"], budget=_budget_text(summary), bases=bases_text(summary) + machines_text(summary), n=len(summary["seeds"]), eval_size=summary["eval_size"],
        table=markdown_table(COLUMNS, final_rows(summary)), spread=spread_text(summary), plots=plots,
        lrs=_lr_section(summary), diagnostics=diagnostics_table(summary),
        protocol=protocol_text(summary["results"]), verdicts=verdict_text(summary["results"]),
    )
    path = out / "report.md"
    path.write_text(text)
    return path


REPORT = """# opd compare: `{spec}`

Budget: {budget}. Seeds: {n}. Evaluation: {eval_size} held-out test prompts per evaluation.{bases}

{protocol}

{table}

Columns: mean ± std over seeds of the final greedy accuracy and pass@k (at the stop); mean
sequences, teacher tokens, optimizer steps applied and training wall time used (wall time
excludes evaluation);
"degenerate": the label's method reduced to another one on its runs (each run's log says
what it became), so its row does not measure its own objective: change the knob named.

{spread}

## Verdicts

{verdicts}

{plots}

Lines: mean over seeds, evaluation by evaluation (x: the seeds' mean usage there; seeds with
different numbers of evaluations are interpolated on shared x); bands: min–max over seeds.

## Learning rates

{lrs}

## Diagnostics

Mean over each run's training steps, then over seeds ("-": not logged for that label).

{diagnostics}

Runs: `runs/LABEL/seedS/` (metrics.jsonl, checkpoints, result.json). Re-running the same
command reuses finished runs whose config is unchanged; `--force` recomputes them.
"""
