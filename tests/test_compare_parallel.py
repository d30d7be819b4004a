"""``opd compare --jobs N`` (:mod:`opd.compare.parallel`): its schedule and its workers' GPUs.

The end-to-end checks (the workers' numbers equal the serial ones, a failing run raises
here) are in ``test_compare.py``."""

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch
import yaml

import opd.compare.driver as driver
from opd.compare import parallel


def _spec(tmp_path, student):
    spec = {
        "base": {"student": student, "teacher": "oracle", "prompts_per_step": 4, "group_size": 2, "micro_batch_size": 8,
                 "max_new_tokens": 40, "eval_size": 8, "eval_k": 2},
        "methods": {"fast": {"method": "opd"}, "slow": {"method": "opd", "gamma": 1}},
        "seeds": [0], "tuning_seed": [5], "budget_kind": "sequences", "budget": 8, "lr_grid": [1e-3, 3e-3], "lr_extend": 0,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return driver.load_spec(str(path), [])


class _HeldPool:
    """A pool that runs every run at once, in ``submit``, but those of label ``held``, which
    wait on one background thread until a run of ``fast``'s reported seeds has finished (or
    ``patience`` seconds pass). One run at a time: loading models is not safe on two threads at once."""

    def __init__(self, patience: float, held: str | None = "slow"):
        self.release, self.patience, self.log, self.label = threading.Event(), patience, [], held
        self.held = ThreadPoolExecutor(1)

    def submit(self, fn, run_or_reuse, cfg):
        self.log.append(("submit", cfg.run_dir))
        if self.label and f"/{self.label}/" in cfg.run_dir:
            return self.held.submit(self._after_release, fn, run_or_reuse, cfg)
        future = Future()
        future.set_result(self._run(fn, run_or_reuse, cfg))
        if "/runs/fast/" in cfg.run_dir:
            self.release.set()
        return future

    def _after_release(self, fn, run_or_reuse, cfg):
        self.release.wait(self.patience)
        return self._run(fn, run_or_reuse, cfg)

    def _run(self, fn, run_or_reuse, cfg):
        result = fn(run_or_reuse, cfg)
        self.log.append(("done", cfg.run_dir))
        return result

    def shutdown(self, cancel_futures=False):
        self.held.shutdown(cancel_futures=cancel_futures)


def test_a_label_goes_on_to_its_seeds_while_another_label_still_tunes(tiny_student_dir, tmp_path):
    """No waves: ``fast``'s reported seed starts as soon as its own grid has finished, while
    every run of ``slow``'s grid is still held (a wave schedule would wait for them)."""
    spec, out = _spec(tmp_path, tiny_student_dir), tmp_path / "out"
    pool = _HeldPool(patience=30)
    try:
        started = parallel._schedule(pool, spec, out, driver, jobs=2)
    finally:
        pool.shutdown()
    assert started == 2 * 2 + 2  # each label: two grid runs, one reported seed
    order = [f"{what} {run_dir.split('/out/')[1]}" for what, run_dir in pool.log]
    fast_seed = order.index("submit runs/fast/seed0")
    slow_done = [i for i, entry in enumerate(order) if entry.startswith("done tune/slow/")]
    assert len(slow_done) == 2 and fast_seed < min(slow_done), order
    assert sum(entry.startswith("submit") for entry in order) == started  # each run submitted once
    assert all(driver.finished_result(cfg) is not None for cfg in _every_config(spec, out))


def _every_config(spec, out):
    lrs = driver.tune(spec, out, False)["chosen"]
    grid = [driver.run_config(spec, label, 5, lr, driver._tune_path(spec, out, label, lr, 5), tune=True)
            for label in spec.methods for lr in spec.lr_grid]
    return grid + [driver.run_config(spec, label, 0, lrs[label], driver.run_path(out, label, 0)) for label in spec.methods]


def test_a_result_that_does_not_read_back_raises_instead_of_looping(tiny_student_dir, tmp_path, monkeypatch):
    spec = _spec(tmp_path, tiny_student_dir)
    monkeypatch.setattr(driver, "finished_result", lambda cfg: None)  # a result never found
    pool = _HeldPool(patience=0, held=None)
    with pytest.raises(RuntimeError, match="tune fast lr 0.001 seed 5: the worker finished it, but .* holds no result of its config"):
        parallel._schedule(pool, spec, tmp_path / "out", driver, jobs=4)
    pool.shutdown()
    assert [what for what, _ in pool.log].count("submit") == 4  # the grid, each run once


def test_a_free_worker_takes_the_first_labels_runs_so_labels_finish_one_after_another(tiny_student_dir, tmp_path):
    """One worker: ``fast`` tunes and runs its seed before ``slow``'s grid starts (submitting
    every known run at once would queue ``slow``'s grid ahead of ``fast``'s seed)."""
    spec, out = _spec(tmp_path, tiny_student_dir), tmp_path / "out"
    pool = _HeldPool(patience=0, held=None)
    try:
        started = parallel._schedule(pool, spec, out, driver, jobs=1)
    finally:
        pool.shutdown()
    submitted = [run_dir.split("/out/")[1] for what, run_dir in pool.log if what == "submit"]
    assert started == 6 and [p.rsplit("/", 1)[0] for p in submitted] == ["tune/fast"] * 2 + ["runs/fast"] + ["tune/slow"] * 2 + ["runs/slow"]


def test_worker_gpus_go_round_robin_and_only_to_unindexed_cuda_runs(monkeypatch):
    monkeypatch.setattr(parallel, "_visible_gpus", lambda: ["3", "5"])
    assert parallel.worker_gpus(3, ["auto", "cuda"]) == ["3", "5", "3"]
    assert parallel.worker_gpus(2, ["auto"]) == ["3", "5"]
    assert parallel.worker_gpus(1, ["auto"]) is None  # one worker keeps every GPU
    assert parallel.worker_gpus(2, ["auto", "cpu"]) is None
    assert parallel.worker_gpus(2, ["cuda:1"]) is None  # the user's index is kept
    monkeypatch.setattr(parallel, "_visible_gpus", lambda: [])
    assert parallel.worker_gpus(2, ["auto"]) is None  # no CUDA here


def test_visible_gpus_keep_the_parents_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,GPU-9f2e")
    assert parallel._visible_gpus() == ["6", "GPU-9f2e"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert parallel._visible_gpus() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parallel._visible_gpus() == []


def _what_a_worker_sees(hold_s: float) -> tuple[int, str, int]:
    time.sleep(hold_s)  # keeps this worker busy, so that the next task goes to the other one
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES", ""), torch.get_num_threads()


def test_each_spawned_worker_sees_only_its_own_gpu():
    """Real spawned workers of :func:`parallel.worker_pool`: two workers, two GPU ids, one each."""
    with parallel.worker_pool(2, threads=2, gpus=["3", "5"]) as pool:
        seen = [f.result(timeout=120) for f in [pool.submit(_what_a_worker_sees, 2.0) for _ in range(2)]]
    by_pid = {pid: gpu for pid, gpu, _ in seen}
    assert len(by_pid) == 2 and sorted(by_pid.values()) == ["3", "5"]
    assert all(threads == 1 for _, _, threads in seen)


_BUSY_POOL = """
import time
from opd.compare import parallel

if __name__ == "__main__":
    with parallel.worker_pool(2, threads=2, gpus=None) as pool:
        futures = [pool.submit(time.sleep, 120) for _ in range(2)]
        while len(pool._processes or {}) < 2:
            time.sleep(0.1)
        print(*pool._processes, flush=True)
        parallel.first_done({futures[0]})
"""


_FAILED_POOL = """
import time
from opd.compare import parallel

if __name__ == "__main__":
    with parallel.worker_pool(2, threads=2, gpus=None) as pool:
        futures = {pool.submit(time.sleep, 120), pool.submit(int, "not a number")}
        while len(pool._processes or {}) < 2:
            time.sleep(0.1)
        print(*pool._processes, flush=True)
        failed = parallel.first_done(futures)
        parallel.finish_in_flight(futures - failed, "a run")
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _signal_a_side_thread(pid: int, sig: int) -> None:
    """Send ``sig`` to a thread of ``pid`` other than its main one (``tgkill``): where the
    kernel may deliver a signal sent to the process."""
    import ctypes

    side = min(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
    assert ctypes.CDLL(None, use_errno=True).tgkill(pid, side, sig) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc; tgkill")
@pytest.mark.parametrize("how", ["sigterm", "sigterm_to_a_pool_thread", "sigkill"])
def test_a_stopped_parent_leaves_no_worker_running(tmp_path, how):
    """A real parent with two busy spawned workers (each in a 120 s task): SIGTERM to the
    parent terminates them and it exits 143, also when the kernel hands the signal to one of
    the pool's threads (the main thread must wake to run the handler); after SIGKILL (no
    handler runs) they notice their parent is gone and exit. Every worker is gone within 20 s."""
    script = tmp_path / "busy_pool.py"
    script.write_text(_BUSY_POOL)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    sig = signal.SIGKILL if how == "sigkill" else signal.SIGTERM
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        if how == "sigterm_to_a_pool_thread":
            _signal_a_side_thread(parent.pid, sig)
        else:
            parent.send_signal(sig)
        assert parent.wait(timeout=30) == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), [pid for pid in workers if _alive(pid)]
    finally:
        parent.kill()
        parent.wait(timeout=30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc; tgkill")
def test_sigterm_while_the_runs_in_flight_finish_after_a_failure_stops_them(tmp_path):
    """After a failed run the parent waits for the run in flight (120 s here) and says so;
    a SIGTERM in that wait stops it within seconds, also when the kernel hands it to a pool
    thread (a pool's shutdown, which waits without a timeout, waited the 120 s out first)."""
    script = tmp_path / "failed_pool.py"
    script.write_text(_FAILED_POOL)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert "a run failed; waiting for the 1 run(s) in flight" in parent.stderr.readline()
        _signal_a_side_thread(parent.pid, signal.SIGTERM)  # the main thread must wake to handle it
        assert parent.wait(timeout=30) == 143
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers)
    finally:
        parent.kill()
        parent.wait(timeout=30)


def test_after_a_failure_the_run_in_flight_is_waited_for():
    done, failing = Future(), Future()
    failing.set_exception(ValueError("bad"))
    threading.Timer(0.3, done.set_result, (0.5,)).start()
    started = time.monotonic()
    parallel.finish_in_flight({done, failing}, "a run")
    assert done.done() and time.monotonic() - started >= 0.25
