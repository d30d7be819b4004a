"""``opd quickstart``: SFT vs GRPO vs OPD on the synthetic testbed, same budget of sequences.

One student base (a tiny model warm-started to be right some of the time) and one teacher
(the oracle, a perfect program teacher). Each method trains for the same number of
sequences at its own learning rate, chosen once on the validation split by the mean over two
tuning seeds that are not reported, from a grid widened past an edge choice
(:mod:`opd.compare.protocol`; ``opd quickstart --tune`` re-runs it). Five reported seeds:
the table shows their means, and a ranking is stated only where the verdict rule of
:mod:`opd.compare.verdicts` gives one. Writes ``report.md`` and ``accuracy.png``.

The 15 reported runs go to ``jobs`` worker processes (default: one a core, at most 8), each
run on one torch thread, so the numbers are the same at any ``jobs`` on one CPU. The student
base ships with opd (:mod:`opd.testbed.shipped`): a fresh machine copies it instead of
building it, and starts where every other machine does.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from opd.compare import verdicts
from opd.compare.driver import teacher_accuracy
from opd.config.loader import with_changes
from opd.errors import UserError
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


def _tuning_config(out_dir: Path, name: str, lr: float, seed: int) -> TrainConfig:
    cfg = base_config(out_dir / "tune", name, lr, "val", run_name=f"{name}-lr{lr:g}-seed{seed}", seed=seed)
    return with_changes(cfg, eval_every=0, eval_k=1)


def tune(out_dir: Path, jobs: int = 1, student_base: str | None = None) -> dict:
    """Final validation accuracy (mean over the tuning seeds, as the protocol asks) of every
    method over the grid, widened past an edge choice up to ``LR_EXTEND`` times; writes
    LR_FILE with the ``student_base`` (weights sha256) it was tuned on. The whole grid runs
    at once on ``jobs`` workers, then each widening (both seeds at once)."""
    from opd.compare.protocol import tune_lr

    def configs(name: str, lrs: list[float]) -> dict:
        return {f"tune {name} lr {lr:g} seed {seed}": _tuning_config(out_dir, name, lr, seed) for lr in lrs for seed in TUNING_SEEDS}

    done = train_all({key: cfg for name in RECIPES for key, cfg in configs(name, LR_GRID).items()}, jobs)

    def accuracy(name: str, lr: float) -> float:
        mine = configs(name, [lr])
        done.update(train_all({key: cfg for key, cfg in mine.items() if key not in done}, jobs))
        return sum(done[key][0][-1]["eval/accuracy"] for key in mine) / len(mine)

    grid, chosen, bracketed = {}, {}, {}
    for name in RECIPES:
        scores, chosen[name], bracketed[name] = tune_lr(LR_GRID, lambda lr: accuracy(name, lr), LR_EXTEND)
        grid[name] = {f"{lr:g}": acc for lr, acc in sorted(scores.items())}
    info = {"grid": grid, "chosen": chosen, "bracketed": bracketed, "tuning_seeds": list(TUNING_SEEDS),
            "budget_sequences": BUDGET_SEQUENCES, "student_base": student_base}
    LR_FILE.write_text(json.dumps(info, indent=1) + "\n")
    return json.loads(LR_FILE.read_text())


def stored_lrs(student_base: str | None) -> dict:
    """LR_FILE, with a warning when it was tuned on another student base than ``student_base``."""
    info = json.loads(LR_FILE.read_text())
    if info.get("student_base") != student_base:
        warnings.warn(f"opd quickstart: its learning rates were tuned on the student base {info.get('student_base')}, "
                      f"not on this one ({student_base}, built on this machine?); `opd quickstart --tune` tunes them here",
                      stacklevel=2)
    return info


def mean_history(histories: list[list[dict]]) -> list[dict]:
    """Evaluation by evaluation, each key's mean over the seeds (same budget: same evaluations)."""
    return [{k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if all(k in r for r in rows)} for rows in zip(*histories)]


def default_jobs() -> int:
    """One worker a core this process may use, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


def _timed_train(cfg: TrainConfig) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    return train(cfg), time.perf_counter() - t0


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _no_loading_bars() -> None:
    """A worker prints one line a finished run, no loading bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def train_all(configs: dict, jobs: int) -> dict:
    """``{key: (history, seconds)}`` of every config, ``jobs`` runs at a time, one torch
    thread each (so the numbers do not depend on ``jobs``); one line per finished run."""
    if jobs <= 1:
        return {key: _timed_train(cfg) for key, cfg in configs.items()}
    from opd.compare.parallel import finish_in_flight, first_done, worker_pool

    quiet = {key: with_changes(cfg, progress=False) for key, cfg in configs.items()}
    done = {}
    with worker_pool(jobs, threads=jobs, gpus=None, setup=_no_loading_bars) as pool:  # one torch thread each
        futures = {pool.submit(_timed_train, cfg): key for key, cfg in quiet.items()}
        pending = set(futures)
        while pending:
            for future in first_done(pending):
                pending.discard(future)
                if future.exception() is not None:  # the first failure stops the runs not started yet
                    for waiting in pending:
                        waiting.cancel()  # not started: dropped; running: finished below
                    finish_in_flight(pending, futures[future])
                    raise future.exception()
                done[futures[future]] = history, seconds = future.result()
                print(f"{futures[future]}: accuracy {history[-1]['eval/accuracy']:.3f} ({seconds:.0f} s)", flush=True)
    return {key: done[key] for key in configs}


def run_all(out_dir: Path, lrs: dict, jobs: int = 1) -> dict:
    """Every method at every reported seed (``jobs`` runs at a time): ``history`` is the mean
    over seeds, ``finals`` each seed's final greedy accuracy, ``wall_s`` the mean time of one run."""
    configs = {f"{name} seed {seed}": base_config(out_dir, name, lrs[name], run_name=f"{name}/seed{seed}", seed=seed)
               for name in RECIPES for seed in SEEDS}
    runs = train_all(configs, jobs)
    results = {}
    for name in RECIPES:
        mine = {seed: runs[f"{name} seed {seed}"] for seed in SEEDS}
        results[name] = {"lr": lrs[name], "history": mean_history([h for h, _ in mine.values()]),
                         "finals": {seed: h[-1]["eval/accuracy"] for seed, (h, _) in mine.items()},
                         "wall_s": sum(s for _, s in mine.values()) / len(SEEDS)}
    return results


def quickstart(out_dir: str = "runs/quickstart", tune_lrs: bool = False, jobs: int | None = None) -> dict:
    from opd.report import print_table, write_report
    from opd.testbed.builder import prepare_student_base

    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs}: the number of worker processes must be at least 1")
    from opd.run.checkpoint import weights_sha256

    _one_thread()  # every run on one thread, here and in the workers: the same numbers at any ``jobs``
    jobs = default_jobs() if jobs is None else jobs
    out = Path(out_dir)
    t0 = time.perf_counter()
    base = weights_sha256(prepare_student_base(TASK, HORIZON))
    prep_s = time.perf_counter() - t0
    lr_info = tune(out, jobs, base) if tune_lrs or not LR_FILE.exists() else stored_lrs(base)
    results = run_all(out, {k: float(v) for k, v in lr_info["chosen"].items()}, jobs)
    teacher_acc = teacher_accuracy(base_config(out, "opd", 1e-3))
    summary = {"results": results, "teacher_accuracy": teacher_acc, "lr_info": lr_info, "prep_s": prep_s, "seeds": list(SEEDS),
               "student_base": base,
               "rule": verdicts.RULE, "verdicts": verdicts.all_verdicts({m: r["finals"] for m, r in results.items()})}
    print_table(summary)
    path = write_report(out, summary)
    print(f"report: {path}  (total {time.perf_counter() - t0:.0f} s)")
    return summary
