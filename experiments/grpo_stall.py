"""Where GRPO's stalled seeds go wrong at horizon 16 (a diagnostic of E1's 6,144 run).

    python experiments/grpo_stall.py [--seeds 0 1] [--out runs/modchain_labeled_promise_h16_6144]

In ``modchain_labeled_promise_h16_6144`` GRPO split over seeds: 0.984, 0.900 and 0.906
(seeds 1, 3, 4) against 0.494 and 0.570 (seeds 0, 2), the latter flat from 3,584
sequences on, while OPD reached 0.992 in every seed. This re-runs (or reuses, in the
folder ``experiments/run.py`` gives that spec) the named GRPO seeds exactly as the
comparison ran them, checks that each final greedy test accuracy equals the committed
one, and reads the greedy rollouts of the base and of each final checkpoint on the 500
test prompts by where their first deviation from the oracle sits: the modulus of the
problem (5 or 7), the step (0-15), the word of the step (the value carried in, the label,
the operation, the operand, ``=``, the result) and the operation of that step.

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

from opd.compare.driver import load_spec, run_config, run_path
from opd.compare.saved_runs import run_or_reuse
from opd.diagnostics.diagnose import load, resolve
from opd.diagnostics.probe import first_deviation
from opd.models.sampler import sample
from opd.report import markdown_table
from opd.testbed.oracle import OracleTeacher

from probed import base_checkpoint  # experiments/probed.py

ROOT = Path(__file__).resolve().parents[1]
NAME = "modchain_labeled_promise_h16_6144"
LABEL = "grpo"
SLOTS = ("value in", "label", "operation", "operand", "=", "result")  # a step's words, then ";"
OPS = ("+", "-", "*")


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
    env = setup.env
    problems = setup.eval_problems
    prompts = [env.encode_prompt(p) for p in problems]
    completions = []
    for i in range(0, len(prompts), 256):
        out = sample(env.student, prompts[i:i + 256], max_new_tokens=env.max_new_tokens, eos_id=env.eos_id,
                     pad_id=env.pad_id, temperature=0.0, top_p=1.0)
        completions.extend(out.batch.completions())
    return problems, prompts, completions, setup


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


def runs(seeds: list[int], out: Path, overrides: list[str] = ()) -> dict[str, Path]:
    """Each named seed's final checkpoint (trained here if the folder lacks it), the base first."""
    spec = load_spec(os.path.relpath(ROOT / "experiments" / f"{NAME}.yaml"), overrides)
    ckpts = {}
    for seed in seeds:
        cfg = run_config(spec, LABEL, seed, None, run_path(out, LABEL, seed))
        result = run_or_reuse(cfg)
        print(f"{LABEL} seed {seed}: {'reused' if result['reused'] else 'trained'}")
        ckpts[f"seed {seed}"] = resolve(cfg.run_dir)[1]
    summary = {"labels": {LABEL: {"runs": {s: {"run_dir": str(run_path(out, LABEL, s))} for s in seeds}}}}
    return {"base": base_checkpoint(summary, out), **ckpts}


def share(count: int, total: int) -> str:
    return f"{count / total:.3f}" if total else "-"


def tables(results: dict) -> list[str]:
    """The report's tables: accuracy by modulus, then the first mistakes' steps, words and operations."""
    acc = [[k, f"{r['accuracy']:.3f}", f"{r['committed']:.3f}" if r.get("committed") is not None else "-"]
           + [f"{m['right'] / m['problems']:.3f} ({m['right']}/{m['problems']})" for _, m in sorted(r["by_modulus"].items())]
           for k, r in results.items()]
    moduli = sorted(next(iter(results.values()))["by_modulus"])
    out = ["## Greedy test accuracy by modulus", "",
           markdown_table(["checkpoint", "accuracy", "committed final"] + [f"mod {m}" for m in moduli], acc), ""]
    wrong = {k: sum(r["steps"].values()) for k, r in results.items()}
    horizon = 16
    step_rows = [[k, str(wrong[k])] + [share(r["steps"].get(str(s), 0), wrong[k]) for s in range(horizon + 1)]
                 for k, r in results.items()]
    out += ["## Step of the first mistake", "", "Share of the rollouts with a mistake whose first one is in step s "
            "(0-based; 16: the answer).", "",
            markdown_table(["checkpoint", "rollouts with a mistake"] + [str(s) for s in range(horizon + 1)], step_rows), ""]
    slot_names = [*SLOTS, ";", "answer"]
    slot_rows = [[k] + [share(r["slots"].get(s, 0), wrong[k]) for s in slot_names] for k, r in results.items()]
    op_rows = [[k] + [share(r["ops"].get(o, 0), sum(r["ops"].values())) for o in OPS] for k, r in results.items()]
    out += ["## Word of the first mistake", "", markdown_table(["checkpoint", *slot_names], slot_rows), "",
            "## Operation of the step holding the first mistake", "",
            "Share of first mistakes inside a step (the answer left out); each operation is drawn with "
            "probability 1/3.", "", markdown_table(["checkpoint", *OPS], op_rows), ""]
    return out


def committed_finals() -> dict[str, float]:
    data = json.loads((ROOT / "docs" / "results" / NAME / "results.json").read_text())
    return {f"seed {s}": f["accuracy"] for s, f in data["labels"][LABEL]["final"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=f"runs/{NAME}", help="the comparison's folder (its finished runs are reused)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    committed = committed_finals()
    results = {}
    for key, ckpt in runs(args.seeds, Path(args.out)).items():
        results[key] = {**measure(ckpt), "committed": committed.get(key)}
        print(key, f"accuracy {results[key]['accuracy']:.3f}", f"(committed {results[key]['committed']})")
    mismatch = [k for k, r in results.items() if r["committed"] is not None and abs(r["accuracy"] - r["committed"]) > 1e-9]
    doc_dir = ROOT / "docs" / "results"
    (doc_dir / "grpo_stall").mkdir(exist_ok=True)
    (doc_dir / "grpo_stall" / "results.json").write_text(json.dumps({"spec": f"experiments/{NAME}.yaml", "label": LABEL,
                                                                     "seeds": args.seeds, "checkpoints": results}, indent=1))
    intro = __doc__.split("\n\n", 2)[2].rsplit("Writes", 1)[0].strip()
    repro = ("Each final accuracy equals the committed one." if not mismatch else
             f"**Not reproduced**: {', '.join(mismatch)} differ from the committed finals; read the rest with that in mind.")
    doc = ["# Where GRPO's stalled seeds go wrong (horizon 16)", "", intro, "",
           f"Regenerate: `python experiments/grpo_stall.py --seeds {' '.join(map(str, args.seeds))}`; numbers in "
           "[grpo_stall/results.json](grpo_stall/results.json). Base: the shipped horizon-16 base the runs start from. "
           + repro, "", *tables(results)]
    (doc_dir / "grpo_stall.md").write_text("\n".join(doc))
    print("\n".join(doc))


if __name__ == "__main__":
    main()
