"""A whole run: set-up, the step loop with evaluation, logs and checkpoints, resume."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from opd.errors import UserError
from opd.run.checkpoint import checkpoint_dir, latest_checkpoint, load_trainer_state, save_checkpoint
from opd.config.loader import save_config
from opd.run.evaluate import evaluate
from opd.run.metrics_log import METRICS_FILE, MetricLogger
from opd.models.hf import load_model
from opd.run.setup import Setup, build_setup
from opd.run.loop import make_optimizer, make_scheduler, pick_problems, step_generator, train_step
from opd.config.train import TrainConfig

PROGRESS_KEYS = ["eval/accuracy", "rollout/reward", "rollout/length"]


def _check_run_dir(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from, or None; refuses to clobber an earlier run."""
    found = latest_checkpoint(cfg.run_dir)
    if cfg.resume:
        if found is None:
            raise UserError(f"resume=true but {cfg.run_dir} has no complete checkpoint; drop resume=true to start fresh.")
        return found
    if found is not None and not cfg.overwrite:
        raise UserError(
            f"{cfg.run_dir} already holds checkpoints (latest: {found.name}); pass resume=true to continue it, "
            "overwrite=true to start over there, or choose another run_dir."
        )
    return None


def _clear_run_dir(run_dir: Path) -> None:
    """A fresh run (``overwrite=true`` was asked for if anything was there) starts clean."""
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
    ``budget_kind`` counter reaches ``budget``, whichever comes first."""

    def __init__(self, cfg: TrainConfig, setup: Setup | None = None):
        self.cfg = cfg
        self.resume_from = _check_run_dir(cfg)
        student = load_model(self.resume_from, cfg.dtype) if self.resume_from else None
        self.setup = setup or build_setup(cfg, student=student)
        model = self.setup.env.student
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, schedule=cfg.lr_schedule)
        self.counters = {"step": 0, "sequences": 0, "teacher_tokens": 0, "wall_s": 0.0}
        if self.resume_from:
            self.counters = load_trainer_state(
                self.resume_from, optimizer=self.optimizer, scheduler=self.scheduler, method_state=self.setup.method.state
            )
        self.history: list[dict] = []

    def evaluate(self) -> dict:
        c = self.cfg
        row = evaluate(self.setup.env, self.setup.eval_problems, k=c.eval_k, temperature=c.eval_temperature, seed=c.seed)
        row.update({f"usage/{k}": v for k, v in self.counters.items() if k != "step"})
        self.history.append({"step": self.counters["step"], **row})
        return row

    def save(self) -> Path:
        c = self.cfg
        return save_checkpoint(
            checkpoint_dir(c.run_dir, self.counters["step"]), model=self.setup.env.student, tokenizer=self.setup.tokenizer,
            optimizer=self.optimizer, scheduler=self.scheduler, counters=dict(self.counters),
            config=c, method_state=state.state_dict() if (state := self.setup.method.state) is not None else None,
        )

    def one_step(self) -> dict:
        c, step = self.cfg, self.counters["step"]
        generator = step_generator(c.seed, step)
        problems = pick_problems(self.setup.train_pool, c.prompts_per_step, generator)
        self.setup.env.step = step
        t0 = time.perf_counter()
        metrics, usage = train_step(
            self.setup.env, self.setup.method, problems, generator, self.optimizer,
            micro_batch_size=c.micro_batch_size, max_grad_norm=c.max_grad_norm, ppo_epochs=c.ppo_epochs,
        )
        metrics["optim/lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.counters["step"] += 1
        self.counters["sequences"] += usage["sequences"]
        self.counters["teacher_tokens"] += usage["teacher_tokens"]
        self.counters["wall_s"] += time.perf_counter() - t0
        return metrics

    def fit(self, stop_after: int | None = None, stop_when=None) -> list[dict]:
        """Train to ``cfg.steps`` or to the budget (evaluated and checkpointed at the stop); stop
        early (with a checkpoint) after ``stop_after`` steps or at the first evaluation row for
        which ``stop_when(row)`` is true."""
        c = self.cfg
        if not self.resume_from:
            _clear_run_dir(Path(c.run_dir))
        save_config(c, Path(c.run_dir) / "config.yaml")
        resume_step = self.counters["step"] if self.resume_from else None
        with MetricLogger(c.run_dir, tensorboard=c.tensorboard, progress_total=c.steps, progress_keys=PROGRESS_KEYS,
                          desc=c.method, resume_step=resume_step, progress=c.progress) as log:
            if self.counters["step"] == 0:
                log.log(0, self.evaluate())
            try:
                self._loop(log, min(c.steps, stop_after or c.steps), stop_when)
            except KeyboardInterrupt:
                print(f"interrupted: checkpoint saved to {self.save()}; resume with resume=true")
                raise
        return self.history

    def _loop(self, log: MetricLogger, last: int, stop_when) -> None:
        c = self.cfg
        while self.counters["step"] < last and not budget_spent(c, self.counters):
            metrics = self.one_step()
            step = self.counters["step"]
            metrics.update({f"usage/{k}": v for k, v in self.counters.items() if k != "step"})
            stop = budget_spent(c, self.counters)
            if stop or _eval_due(c, step):
                row = self.evaluate()
                metrics.update(row)
                stop = stop or (stop_when is not None and stop_when(row))
            log.log(step, metrics)
            if stop or step in (c.steps, last) or (c.save_every > 0 and step % c.save_every == 0):
                self.save()
            if stop:
                return


def train(cfg: TrainConfig, setup: Setup | None = None) -> list[dict]:
    """Train as configured; returns the evaluation history (one row per evaluation)."""
    return Run(cfg, setup).fit()

