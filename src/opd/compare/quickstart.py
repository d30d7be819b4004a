"""``opd quickstart``: SFT vs GRPO vs OPD on the synthetic testbed, same budget of sequences.

One student base (a tiny model warm-started to be right some of the time) and one teacher
(the oracle, a perfect program teacher). Each method trains for the same number of
sequences at its own learning rate, chosen once on the validation split by the mean over two
tuning seeds that are not reported, from a grid widened past an edge choice
(:mod:`opd.compare.protocol`; ``opd quickstart --tune`` re-runs it). Five reported seeds:
the table shows their means, and a ranking is stated only where the verdict rule of
:mod:`opd.compare.verdicts` gives one. Writes ``report.md`` and ``accuracy.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from opd.compare import verdicts
from opd.compare.driver import teacher_accuracy
from opd.config.loader import with_changes
from opd.run.runner import train
from opd.config.train import TrainConfig

TASK, HORIZON = "addition", 4
BUDGET_SEQUENCES = 768
SEQ_PER_STEP = 32
LR_GRID = [3e-5, 1e-4, 3e-4, 1e-3]
SEEDS, TUNING_SEEDS = (0, 1, 2, 3, 4), (5, 6)  # the reported seeds; the seeds the learning rates are tuned on
LR_EXTEND = 2
LR_FILE = Path(__file__).with_name("quickstart_lrs.json")
RECIPES = {
    "sft": dict(method="sft", sft_source="teacher", prompts_per_step=SEQ_PER_STEP, group_size=1),
    "grpo": dict(method="grpo", prompts_per_step=SEQ_PER_STEP // 8, group_size=8),
    "opd": dict(method="opd", prompts_per_step=SEQ_PER_STEP // 4, group_size=4),
}


def base_config(out_dir: Path, name: str, lr: float, eval_split: str = "test", run_name: str | None = None,
                seed: int = SEEDS[0]) -> TrainConfig:
    steps = BUDGET_SEQUENCES // SEQ_PER_STEP
    return TrainConfig(
        student="testbed", teacher="oracle", task=TASK, horizon=HORIZON, steps=steps, lr=lr, seed=seed,
        eval_every=6, eval_size=200, eval_k=2, eval_split=eval_split, max_new_tokens=64,
        run_dir=str(out_dir / (run_name or name)), overwrite=True, progress=True, **RECIPES[name],
    )


def _val_accuracy(out_dir: Path, name: str, lr: float) -> float:
    """The mean over the tuning seeds of the final validation accuracy at ``lr``."""
    accs = []
    for seed in TUNING_SEEDS:
        cfg = base_config(out_dir / "tune", name, lr, "val", run_name=f"{name}-lr{lr:g}-seed{seed}", seed=seed)
        accs.append(train(with_changes(cfg, eval_every=0, eval_k=1))[-1]["eval/accuracy"])
    return sum(accs) / len(accs)


def tune(out_dir: Path) -> dict:
    """Final validation accuracy (mean over the tuning seeds, as the protocol asks) of every
    method over the grid, widened past an edge choice up to ``LR_EXTEND`` times; writes LR_FILE."""
    from opd.compare.protocol import tune_lr

    grid, chosen, bracketed = {}, {}, {}
    for name in RECIPES:
        scores, chosen[name], bracketed[name] = tune_lr(LR_GRID, lambda lr: _val_accuracy(out_dir, name, lr), LR_EXTEND)
        grid[name] = {f"{lr:g}": acc for lr, acc in sorted(scores.items())}
    info = {"grid": grid, "chosen": chosen, "bracketed": bracketed, "tuning_seeds": list(TUNING_SEEDS),
            "budget_sequences": BUDGET_SEQUENCES}
    LR_FILE.write_text(json.dumps(info, indent=1))
    return json.loads(LR_FILE.read_text())


def mean_history(histories: list[list[dict]]) -> list[dict]:
    """Evaluation by evaluation, each key's mean over the seeds (same budget: same evaluations)."""
    return [{k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if all(k in r for r in rows)} for rows in zip(*histories)]


def run_all(out_dir: Path, lrs: dict) -> dict:
    """Every method at every reported seed: ``history`` is the mean over seeds, ``finals``
    each seed's final greedy accuracy, ``wall_s`` the mean time of one run."""
    results = {}
    for name in RECIPES:
        t0, histories = time.perf_counter(), {}
        for seed in SEEDS:
            histories[seed] = train(base_config(out_dir, name, lrs[name], run_name=f"{name}/seed{seed}", seed=seed))
        results[name] = {"lr": lrs[name], "history": mean_history(list(histories.values())),
                         "finals": {seed: h[-1]["eval/accuracy"] for seed, h in histories.items()},
                         "wall_s": (time.perf_counter() - t0) / len(SEEDS)}
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
    summary = {"results": results, "teacher_accuracy": teacher_acc, "lr_info": lr_info, "prep_s": prep_s, "seeds": list(SEEDS),
               "rule": verdicts.RULE, "verdicts": verdicts.all_verdicts({m: r["finals"] for m, r in results.items()})}
    print_table(summary)
    path = write_report(out, summary)
    print(f"report: {path}  (total {time.perf_counter() - t0:.0f} s)")
    return summary
