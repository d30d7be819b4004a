"""Where GRPO's horizon-16 runs stall (a diagnostic of E1's 6,144-sequence comparison).

    python experiments/grpo_stall.py [--seeds 0 1 2 3 4] [--out runs/grpo_stall] [--measure-every 32] [--train-only]

In ``modchain_labeled_promise_h16_6144`` GRPO split over seeds: 0.984, 0.900 and 0.906
(seeds 1, 3, 4) against 0.494 and 0.570 (seeds 0, 2), and every seed's curve sat near
0.5-0.6 for a while (seed 2 from 1,024 sequences to the end), while OPD reached 0.992 in
every seed. This re-runs the named GRPO seeds with the comparison's config, a checkpoint
every 16 optimizer steps added, and says through how many sequences each run's evaluation
curve equals the committed one. Then it reads the greedy rollouts of the base and of the
checkpoints every ``--measure-every`` steps on the 500 test prompts by where their first
deviation from the oracle sits: the modulus of the problem (5 or 7), the step (0-15), the
word of the step (the value carried in, the label, the operation, the operand, ``=``, the
result) and the operation of that step.

Why: an accuracy that stops near one half on a task drawn half modulo 5 and half modulo 7
may be one modulus solved and the other not; a stall of that kind is a different failure
from mistakes spread over steps. Writes ``docs/results/grpo_stall.md`` and
``docs/results/grpo_stall/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import torch

from opd.compare.driver import load_spec, run_config
from opd.compare.saved_runs import run_or_reuse
from opd.config.loader import with_changes
from opd.diagnostics.diagnose import load
from opd.diagnostics.probe import first_deviation
from opd.report import markdown_table
from opd.run.evaluate import complete
from opd.testbed.oracle import OracleTeacher

from probed import base_checkpoint  # experiments/probed.py

ROOT = Path(__file__).resolve().parents[1]
NAME = "modchain_labeled_promise_h16_6144"
LABEL = "grpo"
SLOTS = ("value in", "label", "operation", "operand", "=", "result")  # a step's words, then ";"
OPS = ("+", "-", "*")
EVERY = 16  # a checkpoint every 16 optimizer steps (512 sequences), as often as the comparison evaluated


def first_mistake(oracle, prompt: list[int], completion: list[int], words: list[str]) -> tuple[int, int] | None:
    """``(step, slot)`` of the first deviation from the oracle (slot = the word's place in
    its step; step = horizon: the answer), or ``None``."""
    t = first_deviation(oracle, prompt, completion)
    if t is None:
        return None
    before = words[:t]
    step = before.count(";")
    last = max((i for i, w in enumerate(before) if w == ";"), default=-1)
    return step, t - last - 1


def rollouts(ckpt: Path) -> tuple[list, list[list[int]], list[list[int]], object]:
    """The checkpoint's test problems, their prompts and greedy completions (as its evaluation)."""
    cfg, setup = load(ckpt)
    problems = setup.eval_problems
    completions = complete(setup.env, problems, temperature=0.0, generator=None)
    return problems, [setup.env.encode_prompt(p) for p in problems], completions, setup


def measure(ckpt: Path) -> dict:
    """Accuracy by modulus and the first mistakes' places (module doc), as counts."""
    problems, prompts, completions, setup = rollouts(ckpt)
    env, tok = setup.env, setup.tokenizer
    oracle = OracleTeacher(tokenizer=tok, recovers=False)
    by_m = {}
    steps, slots, ops = Counter(), Counter(), Counter()
    for p, x, y in zip(problems, prompts, completions):
        spec = p.meta["spec"]
        row = by_m.setdefault(str(spec.m), {"problems": 0, "right": 0, "mistake_steps": []})
        row["problems"] += 1
        row["right"] += int(env.verify(p, y))
        where = first_mistake(oracle, x, y, tok.convert_ids_to_tokens(y))
        if where is None:
            continue
        step, slot = where
        row["mistake_steps"].append(step)
        steps[step] += 1
        if step < spec.horizon:
            slots[SLOTS[slot] if slot < len(SLOTS) else ";"] += 1
            ops[spec.ops[step][0]] += 1
        else:
            slots["answer"] += 1
    n = len(problems)
    return {"problems": n, "accuracy": sum(r["right"] for r in by_m.values()) / n, "by_modulus": by_m,
            "steps": {str(k): v for k, v in sorted(steps.items())}, "slots": dict(slots), "ops": dict(ops)}


def train(seeds: list[int], out: Path, overrides: list[str] = ()) -> dict[int, dict]:
    """Each seed's run (trained here unless ``out`` holds it finished): its folder and history."""
    spec = load_spec(os.path.relpath(ROOT / "experiments" / f"{NAME}.yaml"), overrides)
    done = {}
    for seed in seeds:
        cfg = with_changes(run_config(spec, LABEL, seed, None, out / f"seed{seed}"), save_every=EVERY, keep_last=0)
        result = run_or_reuse(cfg)
        how = "reused" if result["reused"] else "continued from a shorter budget" if result["extended"] else "trained"
        print(f"{LABEL} seed {seed}: {how}", flush=True)
        done[seed] = {"run_dir": Path(cfg.run_dir), "history": result["history"], "machine": result.get("machine")}
    return done


def saved(run_dir: Path) -> dict[int, Path]:
    """The run's checkpoints by optimizer step."""
    return {int(p.name.split("_")[1]): p for p in sorted((run_dir / "checkpoints").glob("step_*"))}


def curve(history: list[dict]) -> list[tuple[int, float]]:
    """``(sequences, greedy test accuracy)`` at each evaluation of a run."""
    return [(int(h["usage/sequences"]), h["eval/accuracy"]) for h in history if "eval/accuracy" in h]


def same_through(here: list, committed: list) -> int:
    """The most sequences up to which the two curves are equal at every evaluation (-1: none)."""
    last = -1
    for (n, a), (m, b) in zip(here, committed):
        if n != m or abs(a - b) > 1e-9:
            break
        last = n
    return last


def committed_curves() -> dict[int, list]:
    data = json.loads((ROOT / "docs" / "results" / NAME / "results.json").read_text())
    return {int(s): [tuple(x) for x in c] for s, c in data["labels"][LABEL]["curves"].items()}


def share(count: int, total: int) -> str:
    return f"{count / total:.3f}" if total else "-"


def curve_rows(runs: dict, committed: dict) -> list[str]:
    rows = []
    for seed, run in runs.items():
        here = curve(run["history"])
        fmt = lambda c: " ".join(f"{a:.2f}" for _, a in c)  # noqa: E731
        through = same_through(here, committed[seed])
        rows.append([str(seed), fmt(committed[seed]), fmt(here), f"{through:,}" if through >= 0 else "none"])
    return ["## The runs against the committed ones", "",
            "Greedy test accuracy every 512 sequences (0 to 6,144) of the committed run and of its rerun here, and "
            "the most sequences through which the two are equal at every evaluation.", "",
            markdown_table(["seed", "committed", "rerun here", "equal through (sequences)"], rows), ""]


def measure_tables(results: dict) -> list[str]:
    """Accuracy by modulus, then the first mistakes' steps, words and operations, a row per checkpoint."""
    moduli = sorted(next(iter(results.values()))["by_modulus"])
    acc = [[k, f"{r['accuracy']:.3f}"] + [f"{r['by_modulus'][m]['right'] / r['by_modulus'][m]['problems']:.3f}"
                                          for m in moduli] for k, r in results.items()]
    wrong = {k: sum(r["steps"].values()) for k, r in results.items()}
    horizon = 16
    step_rows = [[k, str(wrong[k])] + [share(r["steps"].get(str(s), 0), wrong[k]) for s in range(horizon + 1)]
                 for k, r in results.items()]
    slot_names = [*SLOTS, ";", "answer"]
    slot_rows = [[k] + [share(r["slots"].get(s, 0), wrong[k]) for s in slot_names] for k, r in results.items()]
    op_rows = [[k] + [share(r["ops"].get(o, 0), sum(r["ops"].values())) for o in OPS] for k, r in results.items()]
    counts = ", ".join(f"mod {m}: {next(iter(results.values()))['by_modulus'][m]['problems']}" for m in moduli)
    return ["## Greedy test accuracy by modulus", "", f"Test problems by modulus: {counts}.", "",
            markdown_table(["checkpoint (sequences)", "accuracy"] + [f"mod {m}" for m in moduli], acc), "",
            "## Word of the first mistake", "", "Share of the rollouts with a mistake whose first mistake is that word "
            "of a step (or of the answer).", "", markdown_table(["checkpoint (sequences)", *slot_names], slot_rows), "",
            "## Operation of the step holding the first mistake", "",
            "Share of first mistakes inside a step (the answer left out); each operation is drawn with probability 1/3.",
            "", markdown_table(["checkpoint (sequences)", *OPS], op_rows), "",
            "## Step of the first mistake", "", "Share of the rollouts with a mistake whose first one is in step s "
            "(0-based; 16: the answer).", "",
            markdown_table(["checkpoint (sequences)", "rollouts with a mistake"] + [str(s) for s in range(horizon + 1)],
                           step_rows), ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="runs/grpo_stall")
    ap.add_argument("--measure-every", type=int, default=32, help="optimizer steps between the checkpoints read")
    ap.add_argument("--train-only", action="store_true", help="train (or reuse) the seeds' runs, measure and write nothing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    runs = train(args.seeds, out)
    if args.train_only:
        return
    committed = committed_curves()
    summary = {"labels": {LABEL: {"runs": {s: {"run_dir": str(r["run_dir"])} for s, r in runs.items()}}}}
    results = {"base (0)": measure(base_checkpoint(summary, out))}
    for seed, run in runs.items():
        for step, ckpt in saved(run["run_dir"]).items():
            if step % args.measure_every == 0:
                key = f"seed {seed} ({step * 32:,})"
                results[key] = measure(ckpt)
                print(key, f"accuracy {results[key]['accuracy']:.3f}", flush=True)
    doc_dir = ROOT / "docs" / "results"
    (doc_dir / "grpo_stall").mkdir(exist_ok=True)
    curves = {str(s): {"committed": committed[s], "rerun": curve(r["history"]),
                       "equal_through": same_through(curve(r["history"]), committed[s])} for s, r in runs.items()}
    (doc_dir / "grpo_stall" / "results.json").write_text(json.dumps(
        {"spec": f"experiments/{NAME}.yaml", "label": LABEL, "seeds": args.seeds, "checkpoint_every": EVERY,
         "curves": curves, "checkpoints": results}, indent=1))
    intro = __doc__.split("\n\n", 2)[2].rsplit("Writes", 1)[0].strip()
    doc = ["# Where GRPO's horizon-16 runs stall", "", intro, "",
           f"Regenerate: `python experiments/grpo_stall.py --seeds {' '.join(map(str, args.seeds))} --measure-every "
           f"{args.measure_every}`; numbers in [grpo_stall/results.json](grpo_stall/results.json). The base is the "
           "shipped horizon-16 base every run starts from; GRPO uses 32 sequences (4 prompts x 8) an optimizer step.",
           "", *curve_rows(runs, committed), *measure_tables(results)]
    (doc_dir / "grpo_stall.md").write_text("\n".join(doc))
    print("\n".join(doc))


if __name__ == "__main__":
    main()
