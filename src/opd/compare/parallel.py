"""``opd compare --jobs N``: a comparison's runs on N worker processes.

Every run of a comparison has a config known in advance once the lrs it depends on are
chosen, so each run goes to a worker as soon as its config is known, and every finished run
may make more known:

1. every label's grid on its tuning seeds (known from the start);
2. for a label whose choice sits at an edge, the lr past it (:func:`opd.compare.protocol.tune_lr`),
   up to ``lr_extend`` times, once that label's last grid run has finished;
3. the label's reported seeds at its chosen lr, once its tuning is done.

A label's widenings and seeds do not wait for another label's grid: a label with short runs
goes on while the others tune. At most N runs are in flight, and a free worker takes the
first runnable run in the spec's label order, so the labels finish one after another (the
first label's seeds before the last label's grid): a comparison stopped part way leaves
whole labels finished, not every label half tuned. The order changes no number. A worker
writes each run's ``result.json`` as the serial path does; the serial path
(:func:`opd.compare.driver.compare`) then reuses every one of them and writes the report, so
the numbers, the choices and the report are those of a serial run with the same configs.
Each worker gets ``threads // jobs`` torch threads (at least one).

GPUs: when the runs use ``device: auto`` or ``cuda`` and CUDA sees k GPUs, worker i gets the
i-th of them (mod k) as its only visible device (``CUDA_VISIBLE_DEVICES``), so ``--jobs 4``
on four GPUs runs one run per GPU; an indexed device (``cuda:1``) is left as it is. A failed
run stops the schedule: no run starts after it, the runs in flight finish, and the failure
is raised in the parent; the finished runs stay on disk and a re-run reuses them. The
workers are spawned, so a script that calls
``compare(..., jobs=N)`` needs the ``if __name__ == "__main__":`` guard (``opd compare`` and
``experiments/run.py`` have it). Stopping the parent stops its workers: SIGTERM or Ctrl-C
ends the runs in flight (their folders hold no result, so a re-run starts them again; the
finished runs stay), and a worker whose parent is gone (SIGKILL) exits within a second.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

from opd.compare import protocol


class _NotRun(Exception):
    """A tuning score asked for a run that has not finished (its configs ride along)."""

    def __init__(self, configs: list):
        super().__init__(len(configs))
        self.configs = configs


def prerun(spec, out: Path, jobs: int, threads: int, driver) -> int:
    """Run every run of ``spec`` that has no finished result, ``jobs`` at a time, each as soon
    as its config is known; returns the number of runs started. ``driver``:
    :mod:`opd.compare.driver`, passed in by it (its configs, paths and ``run_or_reuse``), so
    that this module does not import it back."""
    todo = _all_pending(spec, out, driver, {})
    gpus = worker_gpus(jobs, [cfg.device for _, cfg in todo.values()])
    if gpus:
        print(f"worker GPUs (CUDA_VISIBLE_DEVICES): {', '.join(gpus)}", flush=True)
    with worker_pool(jobs, threads, gpus) as pool:
        return _schedule(pool, spec, out, driver, jobs)


@contextmanager
def worker_pool(jobs: int, threads: int, gpus: list[str] | None, setup=None):
    """A pool of ``jobs`` spawned workers (no forked torch state), ``threads // jobs`` torch
    threads each, worker i on ``gpus[i]`` (None: every GPU), each calling ``setup()`` (a
    module-level function, or None) once it starts. SIGTERM to this process (in the main thread)
    raises ``SystemExit(143)`` here, and on it or Ctrl-C the workers are terminated instead
    of being waited for: a stopped comparison leaves no run going on behind it. Wait on the
    pool's futures with :func:`first_done`, so that the handler runs."""
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in range(jobs):
        slots.put(slot)
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                               initargs=(max(1, threads // jobs), slots, gpus, os.getpid(), setup))
    main = threading.current_thread() is threading.main_thread()  # signal handlers: main thread only
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        yield pool
    except (KeyboardInterrupt, SystemExit):
        _stop_workers(pool)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        pool.shutdown(cancel_futures=True)


def first_done(futures: set) -> set:
    """The futures of ``futures`` that have finished, once one has, waking every second: the
    kernel may deliver SIGTERM to one of the pool's threads, and Python runs the handler only
    when the main thread next runs, which a wait without a timeout would never let it do."""
    while True:
        done, _ = wait(futures, timeout=1.0, return_when=FIRST_COMPLETED)
        if done:
            return done


def finish_in_flight(futures: set, failed: str) -> None:
    """After ``failed`` failed: submit nothing more and wait for the runs in flight (their
    results stay for a re-run), saying so, through :func:`first_done`, so that SIGTERM or
    Ctrl-C during the wait stops them at once (a pool's shutdown would wait them out first)."""
    pending = {f for f in futures if not f.done()}
    if pending:
        print(f"{failed} failed; waiting for the {len(pending)} run(s) in flight to finish (kept for a re-run; "
              "SIGTERM or Ctrl-C stops them)", file=sys.stderr, flush=True)
    while pending:
        pending -= first_done(pending)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _stop_workers(pool: ProcessPoolExecutor, grace_s: float = 5.0) -> None:
    """Terminate the pool's worker processes (SIGTERM, then SIGKILL after ``grace_s``).
    ``ProcessPoolExecutor`` lists them only in ``_processes`` before Python 3.14."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(grace_s)
        if process.is_alive():
            process.kill()


def _schedule(pool: ProcessPoolExecutor, spec, out: Path, driver, jobs: int) -> int:
    """Fill the ``jobs`` worker slots with the first known unfinished runs not in flight
    (label order, :func:`_all_pending`), wait for one to finish, repeat; the first failure
    starts no more runs, lets those in flight finish (:func:`finish_in_flight`) and raises."""
    flying: dict = {}  # future -> (run_dir, what)
    submitted: set = set()
    while True:
        busy = {run_dir for run_dir, _ in flying.values()}
        free = max(0, jobs - len(flying))
        for run_dir, (what, cfg) in list(_all_pending(spec, out, driver, busy).items())[:free]:
            if run_dir in submitted:  # each run once: a result that does not read back must not loop
                finish_in_flight(set(flying), what)
                raise RuntimeError(f"{what}: the worker finished it, but {run_dir} holds no result of its config")
            flying[pool.submit(_run_one, driver.run_or_reuse, cfg)] = (run_dir, what)
            submitted.add(run_dir)
        if not flying:
            return len(submitted)
        for future in first_done(set(flying)):
            _, what = flying.pop(future)
            if future.exception() is not None:
                finish_in_flight(set(flying), what)
                raise future.exception()
            print(f"{what}: accuracy {future.result():.3f} (worker)", flush=True)


def _all_pending(spec, out: Path, driver, busy: set) -> dict:
    """``{run_dir: (what, config)}``: every label's runs that can start now and are not in ``busy``."""
    return {cfg.run_dir: (what, cfg) for label in spec.methods for what, cfg in _pending(spec, out, label, driver)
            if cfg.run_dir not in busy}


def worker_gpus(jobs: int, devices: list[str]) -> list[str] | None:
    """The GPU each of ``jobs`` workers sees (``CUDA_VISIBLE_DEVICES`` entries, one a worker,
    round robin over the GPUs this process sees), or None: one worker, no CUDA, or a run whose
    device is not ``auto``/``cuda`` (a CPU run, or an index the user chose)."""
    if jobs < 2 or not devices or any(d not in ("auto", "cuda") for d in devices):
        return None
    visible = _visible_gpus()
    return [visible[i % len(visible)] for i in range(jobs)] if visible else None


def _visible_gpus() -> list[str]:
    """The GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` entries (ids or UUIDs)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    given = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return given[:count] if given else [str(i) for i in range(count)]


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


def _init_worker(threads: int, slots, gpus: list[str] | None, parent: int, setup=None) -> None:
    """Take a worker slot; pin its GPU (before CUDA starts here) and its torch threads;
    exit when the ``parent`` process is gone; then ``setup()``."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot]
    import torch

    torch.set_num_threads(threads)
    if setup is not None:
        setup()


def _exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """End this worker once its parent has died (it is then re-parented: ``getppid`` changes)."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def _run_one(run_or_reuse, cfg) -> float:
    """Run ``cfg`` (or reuse it) in a worker; its final accuracy."""
    return run_or_reuse(cfg)["history"][-1].get("eval/accuracy", float("nan"))
