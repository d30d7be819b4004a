"""``opd quickstart``: SFT vs GRPO vs OPD on the synthetic testbed, same budget of sequences.

One student base (a tiny model warm-started to be right some of the time) and one teacher
(the oracle, a perfect program teacher). Each method trains for the same number of
sequences at its own learning rate, chosen once from a small grid on the validation split
(``opd quickstart --tune`` re-runs that grid). Writes ``report.md`` and ``accuracy.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from opd.config.loader import with_changes
from opd.run.runner import train
from opd.config.train import TrainConfig

TASK, HORIZON = "addition", 4
BUDGET_SEQUENCES = 768
SEQ_PER_STEP = 32
LR_GRID = [1e-5, 3e-5, 1e-4, 3e-4]
LR_FILE = Path(__file__).with_name("quickstart_lrs.json")
RECIPES = {
    "sft": dict(method="sft", sft_source="teacher", prompts_per_step=SEQ_PER_STEP, group_size=1),
    "grpo": dict(method="grpo", prompts_per_step=SEQ_PER_STEP // 8, group_size=8),
    "opd": dict(method="opd", prompts_per_step=SEQ_PER_STEP // 4, group_size=4),
}


def base_config(out_dir: Path, name: str, lr: float, eval_split: str = "test", run_name: str | None = None) -> TrainConfig:
    steps = BUDGET_SEQUENCES // SEQ_PER_STEP
    return TrainConfig(
        student="testbed", teacher="oracle", task=TASK, horizon=HORIZON, steps=steps, lr=lr,
        eval_every=6, eval_size=200, eval_k=2, eval_split=eval_split, max_new_tokens=64,
        run_dir=str(out_dir / (run_name or name)), overwrite=True, progress=True, **RECIPES[name],
    )


def tune(out_dir: Path) -> dict:
    """Final validation accuracy of every (method, lr) on the grid; writes LR_FILE."""
    grid = {}
    for name in RECIPES:
        grid[name] = {}
        for lr in LR_GRID:
            cfg = with_changes(base_config(out_dir / "tune", name, lr, "val", run_name=f"{name}-lr{lr:g}"), eval_every=0, eval_k=1)
            grid[name][f"{lr:g}"] = train(cfg)[-1]["eval/accuracy"]
    chosen = {name: float(max(scores, key=scores.get)) for name, scores in grid.items()}
    LR_FILE.write_text(json.dumps({"grid": grid, "chosen": chosen, "budget_sequences": BUDGET_SEQUENCES}, indent=1))
    return json.loads(LR_FILE.read_text())


def teacher_accuracy(cfg: TrainConfig) -> float:
    from opd.run.setup import build_setup

    setup = build_setup(cfg)
    env, problems = setup.env, setup.eval_problems
    completions = env.teacher.generate([env.encode_prompt(p) for p in problems], max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    return sum(env.verify(p, c) for p, c in zip(problems, completions)) / len(problems)


def run_all(out_dir: Path, lrs: dict) -> dict:
    results = {}
    for name in RECIPES:
        t0 = time.perf_counter()
        history = train(base_config(out_dir, name, lrs[name]))
        results[name] = {"lr": lrs[name], "history": history, "wall_s": time.perf_counter() - t0}
    return results


def quickstart(out_dir: str = "runs/quickstart", tune_lrs: bool = False) -> dict:
    from opd.report import print_table, write_report
    from opd.testbed.builder import prepare_student_base

    out = Path(out_dir)
    t0 = time.perf_counter()
    prepare_student_base(TASK, HORIZON)
    prep_s = time.perf_counter() - t0
    lr_info = tune(out) if tune_lrs or not LR_FILE.exists() else json.loads(LR_FILE.read_text())
    results = run_all(out, {k: float(v) for k, v in lr_info["chosen"].items()})
    teacher_acc = teacher_accuracy(base_config(out, "opd", 1e-3))
    summary = {"results": results, "teacher_accuracy": teacher_acc, "lr_info": lr_info, "prep_s": prep_s}
    print_table(summary)
    path = write_report(out, summary)
    print(f"report: {path}  (total {time.perf_counter() - t0:.0f} s)")
    return summary
