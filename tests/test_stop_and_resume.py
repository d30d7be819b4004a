"""A run ends cleanly and resumes explicitly: SIGTERM/SIGINT end it with a checkpoint (and
resuming gives the uninterrupted run), a second signal stops at once, a resumed run's
config is its checkpoint's with changes applied or refused by name, and non-finite steps
are skipped, counted and, in a row, stop the run without saving a bad model."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.config.loader import load_config
from opd.config.train import TrainConfig, train_config
from opd.errors import UserError
from opd.run.checkpoint import latest_checkpoint, list_checkpoints
from opd.run.guards import RunStopped, StopSignals
from opd.run.metrics_log import read_metrics
from opd.run.runner import Run, train
from opd.run.setup import build_setup
from run_helpers import subprocess_env, tiny_cli_args


_env, _cli_args = subprocess_env, tiny_cli_args


def _weights(path) -> dict:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _same_weights(a, b) -> bool:
    return all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def _training_rows(run_dir) -> dict[int, dict]:
    """Each step's row without clock times and resume notes."""
    rows = {}
    for row in read_metrics(run_dir):
        kept = {k: v for k, v in row.items() if k != "time" and not k.startswith(("time/", "resume/")) and k != "usage/wall_s"}
        if len(kept) > 1:
            rows.setdefault(row["step"], {}).update(kept)
    return rows


def _with_loss_hook(cfg, hook):
    """The run's setup with ``hook(step, loss_BT) -> loss_BT`` wrapped around the method's loss."""
    setup = build_setup(cfg)
    inner = setup.method.loss

    def loss(view, signal_):
        loss_BT, metrics = inner(view, signal_)
        return hook(setup.env.step, loss_BT), metrics

    setup.method = dataclasses.replace(setup.method, loss=loss)
    return setup


# ---------------------------------------------------------------- signals


def test_sigterm_stops_with_a_checkpoint_and_resume_matches_the_straight_run(tiny_cfg, tiny_student_dir, tmp_path):
    """A CLI run in a subprocess: a second run on its dir is refused with its PID; SIGTERM
    ends it with a checkpoint and one line; resuming gives the uninterrupted run."""
    run_dir = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "opd", "train", *_cli_args(tiny_student_dir, run_dir), "steps=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(lambda: any(r["step"] >= 2 for r in read_metrics(run_dir)) or proc.poll() is not None, 120, "two steps")
        with pytest.raises(UserError, match=rf"is in use by another run \(pid {proc.pid} on host "):
            train(tiny_cfg(run_dir=str(run_dir), steps=4, overwrite=True))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    last = err.strip().splitlines()[-1]
    stopped = re.fullmatch(r"opd: error: stopped by SIGTERM at step (\d+): checkpoint (\S+); resume with resume=true", last)
    assert proc.returncode == 2 and stopped, err[-3000:]
    step = int(stopped[1])
    assert Path(stopped[2]) == latest_checkpoint(run_dir) == run_dir / "checkpoints" / f"step_{step:06d}"
    assert read_metrics(run_dir)[-1]["step"] == step  # the log is complete up to the stop
    train(tiny_cfg(run_dir=str(run_dir), steps=step + 2, resume=True))
    straight = tiny_cfg(run_dir=str(tmp_path / "straight"), steps=step + 2)
    train(straight)
    final = f"checkpoints/step_{step + 2:06d}"
    assert _same_weights(_weights(Path(straight.run_dir) / final), _weights(run_dir / final))
    a, b = _training_rows(straight.run_dir), _training_rows(run_dir)
    assert sorted(a) == sorted(b) == list(range(step + 3))
    for s in a:
        assert a[s].keys() == b[s].keys(), s
        assert all(a[s][k] == pytest.approx(b[s][k], rel=1e-5, abs=1e-7) for k in a[s] if a[s][k] is not None), s


def test_sigint_in_process_ends_the_step_then_checkpoints(tiny_cfg):
    sent = []

    def interrupt_at_step_1(step, loss_BT):
        if step == 1 and not sent:  # once: the loss is called per micro-batch
            sent.append(os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C during the second step
        return loss_BT

    cfg = tiny_cfg(steps=5)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run = Run(cfg, _with_loss_hook(cfg, interrupt_at_step_1))
    with pytest.raises(RunStopped) as stop:
        run.fit()
    path = Path(cfg.run_dir) / "checkpoints" / "step_000002"
    assert str(stop.value) == f"stopped by SIGINT at step 2: checkpoint {path}; resume with resume=true"
    assert latest_checkpoint(cfg.run_dir) == path and read_metrics(cfg.run_dir)[-1]["step"] == 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    Run(tiny_cfg(steps=3, resume=True)).fit()  # the lock was released


def test_a_second_signal_stops_at_once():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals(lambda: 7) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: stop.signum is not None, 10, "the handler")
        assert stop.name == "SIGTERM"
        with pytest.raises(RunStopped, match=r"^stopped at once by a second SIGINT at step 7, without a new checkpoint"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # interrupted by the handler
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_handlers_are_installed_only_from_the_main_thread():
    seen = []

    def enter():
        with StopSignals(lambda: 0):
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=enter)
    thread.start()
    thread.join(timeout=30)
    assert seen == [before]


# ---------------------------------------------------------------- resume and change


def test_resume_applies_a_changed_lr_and_records_it(tiny_cfg, capsys):
    cfg = tiny_cfg(steps=2)
    train(cfg)
    capsys.readouterr()
    run = Run(tiny_cfg(steps=4, lr=4e-4, lr_schedule="linear", resume=True))
    assert ("resuming at step 2 with changes: lr: 0.001 -> 0.0004, lr_schedule: 'constant' -> 'linear', steps: 2 -> 4 "
            f"from {Path(cfg.run_dir) / 'checkpoints' / 'step_000002'}\n") in capsys.readouterr().err
    run.fit()
    rows = read_metrics(cfg.run_dir)
    notes = [r for r in rows if any(k.startswith("resume/") for k in r)]
    assert len(notes) == 1 and notes[0]["step"] == 3  # in the first resumed step's row
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert {k: v for k, v in notes[0].items() if k.startswith("resume/")} == {
        "resume/lr": 4e-4, "resume/lr_schedule=linear": 1.0, "resume/steps": 4.0}
    lrs = {r["step"]: r["optim/lr"] for r in rows if "optim/lr" in r}
    assert lrs[1] == lrs[2] == 1e-3
    assert lrs[3] == pytest.approx(4e-4 * (1 - 2 / 4), rel=1e-12)  # the new lr, on the new schedule over the new steps
    assert lrs[4] == pytest.approx(4e-4 * (1 - 3 / 4), rel=1e-12)
    for saved in (Path(cfg.run_dir) / "config.yaml", Path(cfg.run_dir) / "checkpoints/step_000004/config.yaml"):
        assert load_config(TrainConfig, saved).lr == 4e-4


def test_resume_refuses_a_changed_method_naming_the_differences(tiny_cfg):
    train(tiny_cfg(steps=1))
    with pytest.raises(UserError, match=r"^resume=true cannot change method: 'opd' -> 'grpo', seed: 0 -> 1 \(the run in "):
        Run(tiny_cfg(method="grpo", seed=1, steps=2, resume=True))
    run = Run(tiny_cfg(steps=2, resume=True))  # refused without harm: the lock is free, the run unchanged
    assert run.cfg.method == "opd" and run.changes == {"steps": (1, 2)}
    run.fit()


def test_resume_from_the_command_line_takes_unset_keys_from_the_checkpoint(tiny_cfg, tiny_student_dir):
    cfg = tiny_cfg(method="grpo", steps=1, group_size=3, temperature=0.7)
    train(cfg)
    # the default method's recipe (opd: group_size=4) is not a requested change
    asked, _ = train_config(None, [f"run_dir={cfg.run_dir}", "resume=true", "steps=2"])
    run = Run(asked)
    assert (run.cfg.method, run.cfg.group_size, run.cfg.temperature, run.cfg.student) == ("grpo", 3, 0.7, tiny_student_dir)
    assert run.changes == {"steps": (1, 2)} and run.cfg.resume
    run.fit()


def test_resume_with_fewer_steps_than_done_is_refused(tiny_cfg):
    train(tiny_cfg(steps=2))
    with pytest.raises(UserError, match=r"steps=1 but .*step_000002 is at step 2: set steps to 2 or more"):
        Run(tiny_cfg(steps=1, resume=True))


# ---------------------------------------------------------------- non-finite steps


def test_a_non_finite_step_is_skipped_and_counted(tiny_cfg):
    cfg = tiny_cfg(steps=3, save_every=1)
    nan_at_step_1 = lambda step, loss_BT: loss_BT * float("nan") if step == 1 else loss_BT  # noqa: E731
    Run(cfg, _with_loss_hook(cfg, nan_at_step_1)).fit()
    rows = {r["step"]: r for r in read_metrics(cfg.run_dir)}
    assert [rows[s]["optim/skipped_nonfinite"] for s in (1, 2, 3)] == [0, 1, 0]
    assert [rows[s]["optim/skipped_nonfinite_total"] for s in (1, 2, 3)] == [0, 1, 1]
    assert rows[2]["optim/grad_norm"] is None  # nan, written as null
    root = Path(cfg.run_dir) / "checkpoints"
    one, two, three = (_weights(root / f"step_{s:06d}") for s in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in one)  # nothing was applied
    assert not all(torch.equal(two[k], three[k]) for k in two)  # the next step was


def test_non_finite_steps_in_a_row_stop_the_run(tiny_cfg):
    cfg = tiny_cfg(steps=10, save_every=1, max_nonfinite_steps=3, keep_last=0)
    inf_from_step_1 = lambda step, loss_BT: loss_BT + float("inf") if step >= 1 else loss_BT  # noqa: E731
    with pytest.raises(RunStopped) as stop:
        Run(cfg, _with_loss_hook(cfg, inf_from_step_1)).fit()
    last = Path(cfg.run_dir) / "checkpoints" / "step_000003"
    assert str(stop.value) == (
        "stopped at step 4: the loss or gradient norm was not finite in 3 steps in a row (steps 2-4), none of them "
        f"applied; latest checkpoint: {last}; lower lr, check the data and the teacher, "
        "or raise max_nonfinite_steps")
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step_000001", "step_000002", "step_000003"]
    for path in list_checkpoints(cfg.run_dir):
        assert all(torch.isfinite(v).all() for v in _weights(path).values())
    assert read_metrics(cfg.run_dir)[-1]["optim/skipped_nonfinite_total"] == 3


def test_a_model_with_non_finite_weights_is_never_saved(tiny_cfg):
    cfg = tiny_cfg(steps=1)
    run = Run(cfg)
    run.fit()
    with torch.no_grad():
        next(run.setup.env.student.parameters()).view(-1)[0] = math.nan
    run.counters["step"] = 2
    with pytest.raises(RunStopped, match=r"^stopped at step 2: the model's weights hold nan or inf, so it was not saved "
                                         r"\(latest checkpoint: .*step_000001\)"):
        run.save()
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step_000001"]
