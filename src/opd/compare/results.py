"""``results.json`` of a comparison: the protocol, the budget, each label's per-seed final
metrics and accuracy curves, sequences to the target, the tuning margins and the verdicts."""

from __future__ import annotations

import math
from opd.compare import protocol, verdicts

FINAL_KEYS = {"accuracy": "eval/accuracy", "sequences": "usage/sequences", "teacher_tokens": "usage/teacher_tokens",
              "optimizer_steps": "usage/optimizer_steps", "wall_s": "usage/wall_s"}


def _final(row: dict) -> dict:
    out = {name: row.get(key) for name, key in FINAL_KEYS.items()}
    out.update({k.removeprefix("eval/"): v for k, v in row.items() if k.startswith(("eval/pass@", "eval/accuracy_"))})
    return out


def subset_finals(labels: dict, judge: list[str] = ()) -> dict[str, dict[str, dict]]:
    """``{metric: {label: {seed: value}}}`` of the further metrics that every run of every
    label logged: the evaluation subsets (``accuracy_<name>``, e.g. a blind-spot teacher's)
    and those the spec names under ``judge`` (pass@8 for EOPD's claim)."""
    finals = [f for entry in labels.values() for f in entry["final"].values()]
    names = sorted({k for f in finals for k in f if k.startswith("accuracy_") or k in judge})
    names = [k for k in names if all(f.get(k) is not None for f in finals)]
    return {k: {label: {seed: f[k] for seed, f in entry["final"].items()} for label, entry in labels.items()} for k in names}


def _tuning_seeds(info: dict) -> list:
    """The tuning seeds of ``summary["lr_info"]`` (``seeds``; an older one names ``seed`` only)."""
    return info.get("seeds") or ([] if info.get("seed") is None else [info["seed"]])


def _at_chosen(info: dict) -> dict[str, dict[str, float]]:
    """``{label: {tuning seed: score at the chosen lr}}`` from ``summary["lr_info"]`` (empty
    for a label tuned before the per-seed scores were kept)."""
    return {label: seeds.get(f"{info['chosen'][label]:g}", {}) for label, seeds in info.get("by_seed", {}).items()}


def results_of(spec, summary: dict, teacher_acc: float | None) -> dict:
    """``results.json``: the protocol, the budget, each label's per-seed final metrics and
    accuracy curves (against sequences), sequences to the target, and the verdicts.
    ``spec`` is the comparison's :class:`opd.compare.driver.Spec`."""
    info = summary["lr_info"] or {}
    labels, finals = {}, {}
    threshold = None if teacher_acc is None or spec.target is None else spec.target * teacher_acc
    for label, entry in summary["labels"].items():
        histories = {str(seed): run["history"] for seed, run in entry["runs"].items()}
        finals[label] = {seed: h[-1].get("eval/accuracy", math.nan) for seed, h in histories.items()}
        labels[label] = {
            "method": entry["method"], "overrides": entry["overrides"], "lr": entry["lr"],
            "ppo_epochs": entry.get("ppo_epochs", 1), "degenerate": entry["degenerate"],
            "student_base": entry.get("student_base"),
            "final": {seed: _final(h[-1]) for seed, h in histories.items()},
            "curves": {seed: [[r.get("usage/sequences"), r.get("eval/accuracy")] for r in h] for seed, h in histories.items()},
            "sequences_to_target": None if threshold is None else verdicts.target_summary(histories, threshold),
            "machines": {str(seed): run.get("machine") for seed, run in entry["runs"].items()},
        }
    unbracketed = [label for label, ok in info.get("bracketed", {}).items() if not ok]
    n_tuning = summary["eval_size"] * max(1, len(_tuning_seeds(info)))  # prompts x tuning seeds
    margins = {label: protocol.tuning_margin(scores, info["chosen"][label], n_tuning)
               for label, scores in info.get("grid", {}).items()}
    return {
        "spec": spec.path, "seeds": spec.seeds, "tuning_seed": info.get("seed"), "tuning_seeds": info.get("seeds"),
        "lr_grid": {label: [float(lr) for lr in grid] for label, grid in info.get("grid", {}).items()},
        "lr_tuning": info.get("grid", {}), "lr_tuning_by_seed": info.get("by_seed", {}), "tune_metric": info.get("metric", "accuracy") if info else None,
        "chosen_lr": info.get("chosen", {}), "bracketed": info.get("bracketed", {}),
        "budget": {"kind": spec.budget_kind, "value": spec.budget},
        "test_prompts": summary["eval_size"],
        "protocol": {"unmet": protocol.unmet(seeds=spec.seeds, tuning_seeds=_tuning_seeds(info), grid=spec.lr_grid,
                                             unbracketed=unbracketed, budget=spec.budget, test_size=summary["eval_size"]),
                     "undecided_lr": protocol.undecided(margins),
                     "split_seeds": protocol.split_sentences(finals, _at_chosen(info)),
                     "beside_collapse": protocol.collapse_sentences(
                         {label: {"scores": scores, "chosen": info["chosen"][label]} for label, scores in info.get("grid", {}).items()})},
        "lr_margin": margins,
        "teacher_accuracy": teacher_acc, "target": spec.target, "target_accuracy": threshold,
        "labels": labels, "rule": verdicts.RULE, "planned": spec.planned and [list(pair) for pair in spec.planned],
        "verdicts": verdicts.all_verdicts(finals, planned=spec.planned),
        "metric_verdicts": verdicts.metric_verdicts(subset_finals(labels, spec.judge), spec.planned),
        "sequences_ratios": [] if threshold is None else verdicts.sequences_ratios(
            {label: entry["sequences_to_target"] for label, entry in labels.items()}, spec.planned,
            spec.budget if spec.budget_kind == "sequences" else None),
    }
