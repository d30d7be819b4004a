"""SIGKILL a checkpoint writer at random points of its writes, many times; each time a
fresh run must resume from a checkpoint that verifies, and no ``step_N`` folder that does
not verify may ever appear.

Run by ``tests/test_checkpoint.py`` in a subprocess (not collected by pytest):

    python tests/checkpoint_killer.py STUDENT_DIR RUN_DIR KILLS SEED

One trial: fork a child that resumes the run (``resume=true``: the check of the previous
kill; it also takes the run-dir lock the killed child held) and then writes checkpoints
back to back (``Run.save``, with pruning: ``keep_last=2``) until the parent SIGKILLs it
after a random delay of up to two checkpoint writes. After the last kill the parent
resumes once more and trains a real step. Prints one JSON line: the number of kills, of
resumes that succeeded, of kills that left a partial temporary folder (the kill landed
inside a write), the mean write time, and the failures.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch


def config(student: str, run_dir: str, **changes):
    from opd.config.train import TrainConfig

    base = dict(student=student, teacher="oracle", steps=10**6, prompts_per_step=2, group_size=2, micro_batch_size=4,
                max_new_tokens=8, eval_every=0, eval_size=1, eval_k=1, run_dir=run_dir, progress=False, keep_last=2)
    return TrainConfig(**{**base, **changes})


def writer(student: str, run_dir: str, pipe_w: int) -> None:
    """The child: resume, say from where, then write checkpoints until killed."""
    from opd.run.runner import Run

    try:
        run = Run(config(student, run_dir, resume=True))
        os.write(pipe_w, f"resumed {run.resume_from.name}\n".encode())
        while True:
            run.counters["step"] += 1
            run.save()
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        os.write(pipe_w, f"error {err!r}\n".encode()[:4000])
    finally:
        os._exit(1)


def trial(student: str, run_dir: str, delay_s: float) -> tuple[str, bool, list[str]]:
    """(the child's first line, whether the kill left a partial temporary folder, the
    ``step_N`` folders that do not verify: there must be none)."""
    from opd.run.checkpoint import list_checkpoints, verify_checkpoint

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        writer(student, run_dir, w)
    os.close(w)
    with os.fdopen(r) as pipe:
        line = pipe.readline().strip()  # blocks until the child has resumed (or failed)
        if line.startswith("resumed"):
            time.sleep(delay_s)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    partial = any(p.name.startswith(".tmp-") for p in (Path(run_dir) / "checkpoints").iterdir())
    return line, partial, [p.name for p in list_checkpoints(run_dir) if verify_checkpoint(p) is not None]


def write_time(student: str, run_dir: str) -> float:
    """Start the run (one step, checkpointed) and time three checkpoint writes."""
    from opd.run.runner import Run

    Run(config(student, run_dir)).fit(stop_after=1)
    run = Run(config(student, run_dir, resume=True))
    t0 = time.perf_counter()
    for _ in range(3):
        run.counters["step"] += 1
        run.save()
    run.fit(stop_after=run.counters["step"])  # nothing to train: releases the run-dir lock
    return (time.perf_counter() - t0) / 3


def private_progress_lock() -> None:
    """tqdm's default lock is a multiprocessing lock, shared with every forked child: a
    child killed while it draws a bar (``save_pretrained`` draws one) would leave it held
    for the parent and every later child. A thread lock is copied, not shared, by fork."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def main(student: str, run_dir: str, kills: int, seed: int) -> dict:
    from opd.run.checkpoint import latest_checkpoint, verify_checkpoint
    from opd.run.runner import Run

    torch.set_num_threads(1)
    private_progress_lock()
    rng = random.Random(seed)
    save_s = write_time(student, run_dir)
    failures, partial, resumed = [], 0, 0
    for _ in range(kills):
        line, cut, unverified = trial(student, run_dir, rng.uniform(0, 2 * save_s))
        resumed += line.startswith("resumed")
        failures += ([] if line.startswith("resumed") else [line]) + [f"{name} does not verify" for name in unverified]
        partial += cut
    run = Run(config(student, run_dir, resume=True))  # the check of the last kill, then a real step
    resumed += 1
    step = run.counters["step"]
    run.fit(stop_after=step + 1)
    final = latest_checkpoint(run_dir)
    ok = final is not None and final.name == f"step_{step + 1:06d}" and verify_checkpoint(final) is None
    return {"kills": kills, "resumed": resumed, "partial_writes": partial, "save_s": save_s,
            "trained_after": ok, "failures": failures}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
