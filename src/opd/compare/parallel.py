"""``opd compare --jobs N``: a comparison's runs on N worker processes.

Every run of a comparison has a config known in advance once the lrs it depends on are
chosen, so the runs go to the workers in waves, each wave every run that can start:

1. every label's grid on its tuning seeds;
2. each label whose choice sits at an edge: the lr past it (:func:`opd.compare.protocol.tune_lr`),
   up to ``lr_extend`` waves;
3. every label's reported seeds at its chosen lr.

A worker writes each run's ``result.json`` as the serial path does; the serial path
(:func:`opd.compare.driver.compare`) then reuses every one of them and writes the report, so
the numbers, the choices and the report are those of a serial run with the same configs. Each
worker gets ``threads // jobs`` torch threads (at least one). A failed run stops the pool
(pending runs are cancelled) and raises in the parent; the finished runs stay on disk and a
re-run reuses them. The workers are spawned, so a script that calls ``compare(..., jobs=N)``
needs the ``if __name__ == "__main__":`` guard (``opd compare`` and ``experiments/run.py`` have it).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from opd.compare import protocol


class _NotRun(Exception):
    """A tuning score asked for a run that has not finished (its configs ride along)."""

    def __init__(self, configs: list):
        super().__init__(len(configs))
        self.configs = configs


def prerun(spec, out: Path, jobs: int, threads: int, driver) -> int:
    """Run every run of ``spec`` that has no finished result, ``jobs`` at a time, wave by wave;
    returns the number of runs started. ``driver``: :mod:`opd.compare.driver`, passed in by it
    (its configs, paths and ``run_or_reuse``), so that this module does not import it back."""
    context = multiprocessing.get_context("spawn")  # no forked torch state
    started = 0
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(max(1, threads // jobs),)) as pool:
        for _ in range(spec.lr_extend + 3):  # the grid, each widening, the reported seeds
            wave = [(what, cfg) for label in spec.methods for what, cfg in _pending(spec, out, label, driver)]
            if not wave:
                break
            _run_wave(pool, wave, driver.run_or_reuse)
            started += len(wave)
    return started


def _pending(spec, out: Path, label: str, driver) -> list[tuple[str, object]]:
    """``(what, config)`` of the runs ``label`` needs next: its unfinished grid runs, else the
    unfinished run of a widening, else its unfinished reported seeds (none: all finished)."""
    def tuning(lr: float) -> list:
        return [(f"tune {label} lr {lr:g} seed {seed}", driver.run_config(spec, label, seed, lr, driver._tune_path(spec, out, label, lr, seed),
                                                                          tune=True)) for seed in spec.tuning_seeds]

    if spec.lr_grid:
        todo = [(what, cfg) for lr in spec.lr_grid for what, cfg in tuning(lr) if driver.finished_result(cfg) is None]
        if todo:
            return todo

        def score(lr: float) -> float:
            runs = tuning(lr)
            results = [driver.finished_result(cfg) for _, cfg in runs]
            if None in results:
                raise _NotRun([run for run, result in zip(runs, results) if result is None])
            return sum(r["history"][-1].get(f"eval/{spec.tune_metric}", float("nan")) for r in results) / len(results)

        try:
            lr = protocol.tune_lr(spec.lr_grid, score, spec.lr_extend)[1]
        except _NotRun as e:
            return e.configs
    else:
        lr = None
    seeds = [(f"{label} seed {seed}", driver.run_config(spec, label, seed, lr, driver.run_path(out, label, seed))) for seed in spec.seeds]
    return [(what, cfg) for what, cfg in seeds if driver.finished_result(cfg) is None]


def _run_wave(pool: ProcessPoolExecutor, wave: list[tuple[str, object]], run_or_reuse) -> None:
    """Run ``wave`` on ``pool``; the first failure cancels the runs not started and raises."""
    futures = {pool.submit(_run_one, run_or_reuse, cfg): what for what, cfg in wave}
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            if future.exception() is not None:
                pool.shutdown(cancel_futures=True)
                raise future.exception()
            print(f"{futures[future]}: accuracy {future.result():.3f} (worker)", flush=True)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_one(run_or_reuse, cfg) -> float:
    """Run ``cfg`` (or reuse it) in a worker; its final accuracy."""
    return run_or_reuse(cfg)["history"][-1].get("eval/accuracy", float("nan"))
