"""A whole run: set-up, the step loop with evaluation, logs and checkpoints, resume.

Nothing is lost: one run owns its ``run_dir`` (:mod:`~opd.run.lock`); checkpoints appear
atomically and are verified when read (:mod:`~opd.run.checkpoint`); a resumed run's config
is its checkpoint's, with the changes asked for applied or refused (:mod:`~opd.run.resume`);
SIGTERM or SIGINT ends the run with a checkpoint (:mod:`~opd.run.guards`); a step whose
loss or gradient is not finite is skipped, ``max_nonfinite_steps`` in a row stop the run,
and a model with non-finite weights is never saved.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from opd.errors import UserError
from opd.run.checkpoint import (
    weights_of, checkpoint_dir, latest_checkpoint, list_checkpoints, load_trainer_state, save_checkpoint, set_aside,
)
from opd.config.loader import save_config
from opd.run.evaluate import evaluate
from opd.run.guards import RunStopped, StopSignals, finite_params
from opd.run.lock import acquire_run_lock, release_run_lock
from opd.run.metrics_log import METRICS_FILE, MetricLogger
from opd.models import fsdp
from opd.losses.fused_chunk import default_kernel
from opd.models.device import student_precision
from opd.run import distributed
from opd.run.resume import changes_row, describe_changes, resumed_config
from opd.run.setup import Setup, build_setup, load_student
from opd.run.loop import make_optimizer, make_scheduler, pick_problems, set_hyperparams, step_generator, train_step
from opd.config.train import TrainConfig

PROGRESS_KEYS = ["eval/accuracy", "rollout/reward", "rollout/length"]
USAGE = ("sequences", "teacher_tokens", "optimizer_steps", "wall_s")  # the counters logged as usage/...


def _say(line: str) -> None:
    if distributed.is_main():
        print(line, file=sys.stderr, flush=True)


class _NoLog:
    """The metric log of a rank other than 0: nothing written."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log(self, step: int, metrics: dict) -> None:
        pass


def _check_run_dir(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from (the newest that verifies), or None; refuses to
    clobber an earlier run. Checkpoints newer than the one resumed from (damaged or
    incomplete: reported) are set aside as ``step_N.damaged``."""
    if cfg.resume:
        skipped: list[tuple[Path, str]] = []
        found = latest_checkpoint(cfg.run_dir, report=lambda path, problem: skipped.append((path, problem)))
        if found is None:
            for path, problem in skipped:
                _say(f"checkpoint {path} is damaged or incomplete ({problem})")
            raise UserError(f"resume=true but {cfg.run_dir} has no complete checkpoint; drop resume=true to start fresh.")
        for path, problem in skipped:
            _say(f"checkpoint {path} is damaged or incomplete ({problem}): set aside as {set_aside(path).name}; "
                 f"resuming from {found.name}")
        return found
    existing = list_checkpoints(cfg.run_dir)
    if existing and not cfg.overwrite:
        raise UserError(
            f"{cfg.run_dir} already holds checkpoints (latest: {existing[-1].name}); pass resume=true to continue it, "
            "overwrite=true to start over there, or choose another run_dir."
        )
    return None


def _clear_run_dir(run_dir: Path) -> None:
    """A fresh run (``overwrite=true`` was asked for if anything was there) starts clean."""
    if not distributed.is_main():
        return
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)
    for events in run_dir.glob("events.out.tfevents*"):
        events.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def budget_spent(cfg: TrainConfig, counters: dict) -> bool:
    """Whether the ``budget_kind`` usage counter has reached ``budget`` (never, without a budget)."""
    counter = "step" if cfg.budget_kind == "steps" else cfg.budget_kind
    return cfg.budget is not None and counters[counter] >= cfg.budget


def _eval_due(cfg: TrainConfig, step: int) -> bool:
    return step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)


class Run:
    """Holds the live objects of one run; ``fit()`` trains to ``cfg.steps`` or until the
    ``budget_kind`` counter reaches ``budget``, whichever comes first.

    The run locks ``cfg.run_dir`` from here to the end of ``fit()``. On resume, ``cfg`` is
    the checkpoint's config with the changes asked for applied (``self.changes``:
    ``{key: (old, new)}``; see :mod:`opd.run.resume`)."""

    def __init__(self, cfg: TrainConfig, setup: Setup | None = None):
        new_dir = not Path(cfg.run_dir).exists()
        distributed.barrier()  # every rank has seen whether the run dir existed
        self._lock = acquire_run_lock(cfg.run_dir) if distributed.is_main() else None  # rank 0 holds it
        try:
            self._start(cfg, setup)
        except BaseException:
            release_run_lock(self._lock, remove_dir=new_dir)  # a run that cannot start writes nothing
            raise

    def _start(self, cfg: TrainConfig, setup: Setup | None) -> None:
        self.resume_from = _check_run_dir(cfg)
        self.cfg, self.changes = resumed_config(self.resume_from, cfg) if self.resume_from else (cfg, {})
        cfg = self.cfg
        student = load_student(weights_of(self.resume_from, cfg), cfg) if self.resume_from else None
        self.setup = setup or build_setup(cfg, student=student)
        model = self.setup.env.student
        if distributed.active():
            fsdp.shard(model)  # before the optimizer: it holds the shards
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, schedule=cfg.lr_schedule)
        self.counters = {"step": 0, "sequences": 0, "teacher_tokens": 0, "optimizer_steps": 0, "wall_s": 0.0, "skipped_nonfinite": 0}
        if self.resume_from:
            saved = load_trainer_state(self.resume_from, optimizer=self.optimizer, scheduler=self.scheduler,
                                       method_state=self.setup.method.state, model=model)
            self.counters.update(saved)
            set_hyperparams(self.optimizer, self.scheduler, lr=cfg.lr, weight_decay=cfg.weight_decay)
            if cfg.steps < self.counters["step"]:
                raise UserError(f"steps={cfg.steps} but {self.resume_from} is at step {self.counters['step']}: "
                                f"set steps to {self.counters['step']} or more to continue it")
            _say(describe_changes(self.counters["step"], self.changes) + f" from {self.resume_from}")
        self.history: list[dict] = []
        self.nonfinite_in_a_row = 0
        self.signals = StopSignals(lambda: self.counters["step"])

    def _usage(self) -> dict:
        return {f"usage/{k}": self.counters[k] for k in USAGE}

    def evaluate(self) -> dict:
        """Held-out metrics; over several ranks each evaluates its share of the problems
        (a seed of its own for pass@k) and the means are weighted by the shares' sizes."""
        c = self.cfg
        env = self.setup.env
        problems = distributed.share(self.setup.eval_problems)
        seed = c.seed + 1_000_003 * distributed.rank()
        with student_precision(env.student, env.autocast), fsdp.gathered(env.student):
            row = evaluate(env, problems, k=c.eval_k, temperature=c.eval_temperature, seed=seed,
                           subsets=getattr(env.teacher, "eval_subsets", None))
        row = distributed.mean_metrics(row, weight=len(problems))
        row.update(self._usage())
        self.history.append({"step": self.counters["step"], **row})
        return row

    def save(self) -> Path:
        """Checkpoint the current step; a model with non-finite weights is refused
        (:class:`RunStopped`), never saved."""
        c, step = self.cfg, self.counters["step"]
        if distributed.any_rank(not finite_params(self.setup.env.student)):
            latest = latest_checkpoint(c.run_dir)
            raise RunStopped(f"stopped at step {step}: the model's weights hold nan or inf, so it was not saved "
                             f"(latest checkpoint: {latest or 'none'}); lower lr or check the data and the teacher")
        return save_checkpoint(
            checkpoint_dir(c.run_dir, step), model=self.setup.env.student, tokenizer=self.setup.tokenizer,
            optimizer=self.optimizer, scheduler=self.scheduler, counters=dict(self.counters),
            config=c, method_state=state.state_dict() if (state := self.setup.method.state) is not None else None,
            keep_last=c.keep_last, sharded=fsdp.is_sharded(self.setup.env.student),
        )

    def one_step(self) -> dict:
        c, step = self.cfg, self.counters["step"]
        generator = step_generator(c.seed, step)
        problems = distributed.split(pick_problems(self.setup.train_pool, c.prompts_per_step, generator))
        generator = distributed.rank_generator(generator)
        self.setup.env.step = step
        t0 = time.perf_counter()
        env = self.setup.env
        with student_precision(env.student, env.autocast), default_kernel(c.loss_kernel):
            metrics, usage = train_step(
                env, self.setup.method, problems, generator, self.optimizer,
                micro_batch_size=c.micro_batch_size, max_grad_norm=c.max_grad_norm, ppo_epochs=c.ppo_epochs,
            )
        metrics = distributed.mean_metrics(metrics)
        usage = distributed.sum_counts(usage)
        metrics["optim/lr"] = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.counters["step"] += 1
        self.counters["sequences"] += usage["sequences"]
        self.counters["teacher_tokens"] += usage["teacher_tokens"]
        self.counters["wall_s"] += time.perf_counter() - t0
        self.counters["optimizer_steps"] += self.cfg.ppo_epochs - int(metrics["optim/skipped_nonfinite"])  # updates applied
        self.counters["skipped_nonfinite"] += int(metrics["optim/skipped_nonfinite"] > 0)
        metrics["optim/skipped_nonfinite_total"] = self.counters["skipped_nonfinite"]
        return metrics

    def fit(self, stop_after: int | None = None, stop_when=None) -> list[dict]:
        """Train to ``cfg.steps`` or to the budget (evaluated and checkpointed at the stop); stop
        early (with a checkpoint) after ``stop_after`` steps or at the first evaluation row for
        which ``stop_when(row)`` is true. A stop signal or too many non-finite steps end it
        with :class:`RunStopped`. The run dir is unlocked when it returns."""
        c = self.cfg
        try:
            if self._lock is None and distributed.is_main():
                self._lock = acquire_run_lock(c.run_dir)
            if not self.resume_from:
                _clear_run_dir(Path(c.run_dir))
            if distributed.is_main():
                save_config(c, Path(c.run_dir) / "config.yaml")
            distributed.barrier()
            self._fit(stop_after, stop_when)
        finally:
            release_run_lock(self._lock)
            self._lock = None
        return self.history

    def _fit(self, stop_after: int | None, stop_when) -> None:
        c = self.cfg
        resume_step = self.counters["step"] if self.resume_from else None
        log = MetricLogger(c.run_dir, tensorboard=c.tensorboard, progress_total=c.steps, progress_keys=PROGRESS_KEYS,
                           desc=c.method, resume_step=resume_step, progress=c.progress) if distributed.is_main() else _NoLog()
        with log, self.signals:
            if self.counters["step"] == 0:
                log.log(0, self.evaluate())
            self._loop(log, min(c.steps, stop_after or c.steps), stop_when, note=changes_row(self.changes))

    def _loop(self, log: MetricLogger, last: int, stop_when, note: dict) -> None:
        """The steps; ``note`` (the resume's changes) goes into the first step's row."""
        c = self.cfg
        while self.counters["step"] < last and not budget_spent(c, self.counters):
            if self._signalled():
                self._stop_on_signal()
            metrics = self.one_step()
            step = self.counters["step"]
            metrics.update(self._usage())
            metrics.update(note)
            note = {}
            stop = budget_spent(c, self.counters)
            if stop or _eval_due(c, step):
                row = self.evaluate()
                metrics.update(row)
                stop = stop or (stop_when is not None and stop_when(row))
            log.log(step, metrics)
            self._check_nonfinite(metrics)
            if stop or step in (c.steps, last) or (c.save_every > 0 and step % c.save_every == 0):
                self.save()
            if stop:
                break
        if self._signalled():  # arrived during the last step: the caller must stop too
            self._stop_on_signal()

    def _signalled(self) -> bool:
        """Whether a stop signal arrived (on any rank: all stop at the same step)."""
        return distributed.any_rank(self.signals.signum is not None)

    def _check_nonfinite(self, metrics: dict) -> None:
        """Count non-finite (skipped) steps in a row; ``max_nonfinite_steps`` of them stop the run."""
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if metrics["optim/skipped_nonfinite"] > 0 else 0
        n, step = self.nonfinite_in_a_row, self.counters["step"]
        if n >= self.cfg.max_nonfinite_steps:
            raise RunStopped(
                f"stopped at step {step}: the loss or gradient norm was not finite in {n} steps in a row (steps "
                f"{step - n + 1}-{step}), none of them applied; latest checkpoint: "
                f"{latest_checkpoint(self.cfg.run_dir) or 'none'}; lower lr, check the data and the teacher, "
                "or raise max_nonfinite_steps"
            )

    def _stop_on_signal(self):
        """Checkpoint the current step (unless it is saved already), then :class:`RunStopped`."""
        step = self.counters["step"]
        path = checkpoint_dir(self.cfg.run_dir, step)
        if distributed.any_rank(not path.is_dir()):
            path = self.save()
        raise RunStopped(f"stopped by {self.signals.name or 'a signal to another rank'} at step {step}: checkpoint {path}; resume with resume=true")


def train(cfg: TrainConfig, setup: Setup | None = None) -> list[dict]:
    """Train as configured; returns the evaluation history (one row per evaluation)."""
    return Run(cfg, setup).fit()
