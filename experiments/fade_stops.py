"""Where suffix fade (or Prune-OPD) stops supervising, rollout by rollout: the spread behind its mean.

    python experiments/fade_stops.py NAME [--label fade_light_h32] [--prompts 256]

A suffix-fade run logs only the mean share of each rollout it kept (``signal/kept_frac``);
a Prune-OPD run only the mean reliable length (``signal/reliable_len``). Both stop
supervising each rollout at a point of their own (suffix fade at a change point of the
teacher's margin, Prune-OPD once its reliability falls under ``w_min``), so both are read
here the same way.
This takes the base student and every reported seed's final checkpoint of the label in
``runs/NAME`` (a published report's runs), samples rollouts of the first ``--prompts``
training prompts (``group_size`` each, generator seed 0, as a training step samples them),
has the teacher score them, and applies the method's own signal: per rollout, the number of
tokens its loss keeps (``k_i = Σ_t keep_it``, the tokens before the change point). Per
checkpoint it reports the mean, standard deviation, range and percentiles of ``k_i`` and
the share of rollouts at each ``k``; the most common ``k`` is the place a fixed rollout cut
would copy. With the testbed's oracle as teacher it also reads, per rollout, the clean
prefix ``c_i``: the tokens before the first position whose teacher has seen a deviation
(the position after the student's first wrong word; the whole rollout when it has none).
Under a decay keyed on deviations that is where the teacher's noise starts, and the table
adds where the stop falls against it (``k_i - c_i`` on the rollouts that deviate) and the
share of clean rollouts kept whole. Trains nothing. Writes
``docs/results/NAME/fade_stops.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PERCENTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
STOPPING = ("suffix_fade", "prune_opd")  # methods whose signal's mask_BT stops each rollout at a point of its own


def percentiles(sorted_values: list[int]) -> dict | None:
    """The value at index ``floor(q n)`` of the sorted values for each q in PERCENTILES (None
    when there are none)."""
    n = len(sorted_values)
    return {str(p): sorted_values[int(p * n)] for p in PERCENTILES} if n else None


def percentile_cell(found: dict | None) -> str:
    """A :func:`percentiles` dict as one table cell, ``p10 / p25 / p50 / p75 / p90`` ("–" for None)."""
    return " / ".join(str(found[str(p)]) for p in PERCENTILES) if found else "–"


def kept_stats(kept: list[int]) -> dict:
    """Summary of per-rollout kept-token counts: mean, sd, min, max, percentiles (the value at
    index ``floor(q n)`` of the sorted counts), the mode and its share, and every count's share."""
    q, n = sorted(kept), len(kept)
    if n < 2:
        raise ValueError("kept_stats needs at least 2 rollouts")
    counts = Counter(q)
    mode, mode_n = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))
    return {"rollouts": n, "mean": statistics.mean(q), "sd": statistics.stdev(q), "min": q[0], "max": q[-1],
            "percentiles": percentiles(q), "mode": mode, "mode_share": mode_n / n,
            "shares": {str(k): c / n for k, c in sorted(counts.items())}}


def stops(setup, prompts: int, batch: int = 64) -> list[tuple[int, int | None, int]]:
    """Per rollout ``(k_i, c_i, length)``: the tokens the method's loss mask keeps (its own
    signal; Prune-OPD's adaptive budget is reset to the cap before every batch, so its
    rollouts run to the same length as suffix fade's and the mask alone sets the stop), the
    clean prefix (None when the teacher cannot trace a prefix) and the rollout's length."""
    env, method = setup.env, setup.method
    if method.name not in STOPPING:
        raise SystemExit(f"the label's method is {method.name}, not one of {', '.join(STOPPING)}")
    generator, out = torch.Generator().manual_seed(0), []
    for start in range(0, prompts, batch):
        full_length(method)
        exp = method.rollout(env, setup.train_pool[start:min(start + batch, prompts)], generator)
        teacher, context = method.context(env, exp)
        scores = teacher.score(context, topk=method.teacher_request.topk, full=True, temperature=1.0)
        kept = method.signal(exp, scores)["mask_BT"].sum(-1).tolist()
        for k, problem, y in zip(kept, exp.problems, exp.batch.completions()):
            out.append((int(k), clean_prefix(env.teacher, env.encode_prompt(problem), y), len(y)))
    return out


def full_length(method) -> None:
    """Set an adaptive generation budget (Prune-OPD's ``state``) back to its cap."""
    budget = getattr(method, "state", None)
    if getattr(budget, "schedule", None) == "adaptive":
        budget.set_next(budget.max_tokens)


def kept_tokens(setup, prompts: int, batch: int = 64) -> list[int]:
    """Per rollout, the tokens the method's loss mask keeps (its own signal)."""
    return [k for k, _, _ in stops(setup, prompts, batch)]


def clean_prefix(teacher, prompt_ids: list[int], completion_ids: list[int]) -> int | None:
    """Tokens before the first position whose teacher has seen a deviation in the prefix
    (``len(completion_ids)`` when none); None for a teacher without ``trace`` (not the oracle)."""
    if not hasattr(teacher, "trace"):
        return None
    targets = teacher.trace(prompt_ids, completion_ids)
    return next((i for i, t in enumerate(targets) if t.deviations > 0), len(completion_ids))


def against_deviations(rows: list[tuple[int, int | None, int]]) -> dict | None:
    """Where the stops fall against the clean prefix: the share of rollouts that deviate, the
    percentiles (as :func:`kept_stats`) of their clean prefix ``c_i`` (where the first
    deviation falls) and of ``k_i - c_i``, the share of them stopped within 2 tokens of
    ``c_i``, and the share of clean rollouts kept whole."""
    if any(c is None for _, c, _ in rows):
        return None
    lag = sorted(k - c for k, c, n in rows if c < n)
    clean = [(k, n) for k, c, n in rows if c == n]
    n = len(lag)
    return {"deviating": n / len(rows),
            "clean_prefix_percentiles": percentiles(sorted(c for _, c, m in rows if c < m)),
            "lag_percentiles": percentiles(lag),
            "within_2": sum(abs(x) <= 2 for x in lag) / n if n else None,
            "clean_kept_whole": sum(k == m for k, m in clean) / len(clean) if clean else None}


def checkpoint_stats(setup, prompts: int) -> dict:
    """:func:`kept_stats` of one checkpoint's rollouts, with :func:`against_deviations` beside."""
    rows = stops(setup, prompts)
    return {**kept_stats([k for k, _, _ in rows]), "against_deviations": against_deviations(rows)}


def measure(run_root: Path, seeds: list[str], prompts: int) -> dict:
    from opd.config.loader import load_config
    from opd.config.train import TrainConfig
    from opd.diagnostics.diagnose import load, resolve
    from opd.run.setup import build_setup

    first = run_root / f"seed{seeds[0]}"
    out = {"base": checkpoint_stats(build_setup(load_config(TrainConfig, first / "config.yaml")), prompts)}
    for seed in seeds:
        out[seed] = checkpoint_stats(load(resolve(run_root / f"seed{seed}")[1])[1], prompts)
    return out


def table(found: dict) -> list[str]:
    head = "| checkpoint | rollouts | mean ± sd | min–max | p10 / p25 / p50 / p75 / p90 | mode (share) |"
    lines = [head, "|---|---|---|---|---|---|"]
    for name, s in found.items():
        lines.append(f"| {name} | {s['rollouts']} | {s['mean']:.1f} ± {s['sd']:.1f} | {s['min']}–{s['max']} "
                     f"| {percentile_cell(s['percentiles'])} | {s['mode']} ({s['mode_share']:.3f}) |")
    return lines + deviation_table(found)


def deviation_table(found: dict) -> list[str]:
    """The stops against the clean prefix, one row per checkpoint (none without an oracle)."""
    rows = [(name, s["against_deviations"]) for name, s in found.items() if s.get("against_deviations")]
    if not rows:
        return []
    fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    lines = ["", "| checkpoint | deviating | c (deviating): p10 / p25 / p50 / p75 / p90 | k − c: p10 / p25 / p50 / p75 / p90 "
             "| within 2 tokens | clean kept whole |", "|---|---|---|---|---|---|"]
    for name, d in rows:
        first = percentile_cell(d.get("clean_prefix_percentiles"))  # absent from files written before it was measured
        lines.append(f"| {name} | {d['deviating']:.3f} | {first} | {percentile_cell(d['lag_percentiles'])} | {fmt(d['within_2'])} "
                     f"| {fmt(d['clean_kept_whole'])} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a published report whose runs are in runs/NAME")
    ap.add_argument("--label", default="fade_light_h32")
    ap.add_argument("--prompts", type=int, default=256, help="training prompts per checkpoint (x group_size rollouts)")
    args = ap.parse_args()
    results = json.loads((ROOT / "docs" / "results" / args.name / "results.json").read_text())
    if args.label not in results["labels"]:
        raise SystemExit(f"{args.name} has no label {args.label}; its labels: {', '.join(results['labels'])}")
    seeds = [str(s) for s in results["seeds"]]
    found = measure(ROOT / "runs" / args.name / "runs" / args.label, seeds, args.prompts)
    path = ROOT / "docs" / "results" / args.name / "fade_stops.json"
    path.write_text(json.dumps({"label": args.label, "prompts": args.prompts, "generator_seed": 0, "checkpoints": found}, indent=1))
    print("\n".join(table(found)))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
