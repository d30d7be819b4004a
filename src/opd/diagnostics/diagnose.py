"""``opd diagnose RUN_OR_CHECKPOINT``: measure the pitfalls on a trained student.

Loads the checkpoint (a run's latest, or the one given) and its run config, rebuilds the
run's teacher and held-out problems with :func:`opd.run.setup.build_setup`, runs the
measurements of :mod:`opd.diagnostics` (first mistakes, coverage, noise, variance, the probes) and writes
``report.md``, ``results.json`` and the PNG plots (:mod:`opd.diagnostics.report`).
Student and teacher rollouts use the run's sampling settings (temperature, top-p,
``max_new_tokens``); on the testbed torch runs on one thread while measuring (the tiny
models gain nothing from threads and are many times slower on a loaded machine).
This module is the only one in the package that reads a config; the measurement
modules take models, teachers and token lists as arguments.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from opd.run.checkpoint import latest_checkpoint
from opd.config.loader import load_config, with_changes
from opd.diagnostics import coverage, noise, probe, variance
from opd.errors import UserError

HORIZONS = (2, 4, 8)
REPEATS = 8  # rollouts per prompt for the gradient variance
VARIANCE_PROMPTS = 6
NOT_TESTBED = "skipped: this run trains on a dataset, where wrong steps are not known (testbed runs only)."
NO_TEACHER = "skipped: this run has no teacher."


def resolve(path: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint)`` from a run directory (its latest checkpoint) or a checkpoint."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise UserError(f"{path} has no complete checkpoint to diagnose.")
        return path, ckpt
    if (path / "config.yaml").exists() and (path / "config.json").exists():
        return path.parent.parent, path
    raise UserError(f"{path} is neither a run directory (with checkpoints/) nor a checkpoint (with config.yaml).")


def load(ckpt: Path):
    """The run config (student = the checkpoint) and its :class:`opd.run.setup.Setup`."""
    from opd.run.setup import load_student
    from opd.run.setup import build_setup
    from opd.config.train import TrainConfig

    cfg = with_changes(load_config(TrainConfig, ckpt / "config.yaml"), student=str(ckpt))
    return cfg, build_setup(cfg, student=load_student(ckpt, cfg))


def _student_rollouts(env, prompts, generator, max_new_tokens):
    from opd.models.sampler import sample

    out = sample(env.student, prompts, max_new_tokens=max_new_tokens, eos_id=env.eos_id, pad_id=env.pad_id,
                 temperature=env.temperature, top_p=env.top_p, generator=generator)
    return out.batch.completions()


def coverage_section(env, prompts, student_ids, generator) -> dict:
    if env.teacher is None:
        return {"skipped": NO_TEACHER}
    out = {"student": coverage.coverage_profile(env.teacher, env.student, prompts, student_ids, env.pad_id)}
    if hasattr(env.teacher, "generate"):
        teacher_ids = env.teacher.generate(prompts, max_new_tokens=env.max_new_tokens, temperature=env.temperature,
                                           top_p=env.top_p, generator=generator)
        out["teacher"] = coverage.coverage_profile(env.teacher, env.student, prompts, teacher_ids, env.pad_id)
    out["summary"] = {k: coverage.summary(v) for k, v in out.items() if k in ("student", "teacher")}
    return out


def noise_section(env, tokenizer, prompts, student_ids, testbed: bool) -> dict:
    if env.teacher is None:
        return {"skipped": NO_TEACHER}
    ent_N = noise.teacher_entropy_on(env.teacher, prompts, student_ids, env.pad_id)
    out = {"entropy": ent_N.tolist(), "entropy_stats": noise.entropy_stats(ent_N)}
    if not testbed:
        out["after_wrong_skipped"] = NOT_TESTBED
        return out
    from opd.testbed.oracle import OracleTeacher

    recovering, continuing = OracleTeacher(tokenizer=tokenizer), OracleTeacher(tokenizer=tokenizer, recovers=False)
    out["after_wrong"] = noise.after_wrong_step(env.teacher, recovering, continuing, prompts, student_ids, env.pad_id)
    return out


def variance_section(cfg, env, tokenizer, horizons, repeats, n_prompts, generator) -> dict:
    if cfg.dataset:
        return {"skipped": "skipped: the horizon sweep uses the testbed task family at several horizons (testbed runs only)."}
    if env.teacher is None:
        return {"skipped": NO_TEACHER}
    from opd.models.sampler import sample
    from opd.testbed.tasks import make_task

    points = {}
    for h in horizons:
        task = make_task(cfg.task, h)
        prompts = [env.encode_prompt(p) for p in task.problems("val", n_prompts, cfg.seed)]
        budget = 2 * task.solution_tokens

        def sample_fn(rows, budget=budget):
            s = sample(env.student, rows, max_new_tokens=budget, eos_id=env.eos_id, pad_id=env.pad_id,
                       temperature=env.temperature, top_p=env.top_p, generator=generator)
            return s.batch, s.sampler_logp_BT

        points[h] = variance.horizon_point(env.student, env.teacher, sample_fn, prompts, repeats)
    lengths = [p["length"] for p in points.values()]
    slopes = {g: variance.loglog_slope(lengths, [p[f"var@{g}"] for p in points.values()]) for g in ("0", "1")}
    return {"points": points, "slopes": slopes, "repeats": repeats, "prompts": n_prompts}


def probe_depths(horizon: int) -> list[int]:
    return sorted({1, math.ceil(horizon / 2), horizon})


def probe_section(cfg, env, tokenizer, problems, generator) -> dict:
    if cfg.dataset:
        return {"skipped": NOT_TESTBED}
    from opd.testbed.oracle import OracleTeacher

    oracle = OracleTeacher(tokenizer=tokenizer)
    sep_id, wait_id = tokenizer.convert_tokens_to_ids(";"), oracle.wait_token_id
    prompts = [env.encode_prompt(p) for p in problems]
    solutions = [tokenizer(p.solution, add_special_tokens=False)["input_ids"] for p in problems]
    depths = {}
    for k in probe_depths(cfg.horizon):
        planted = [probe.plant_wrong_step(oracle, x, y, sep_id, k, generator) for x, y in zip(prompts, solutions)]
        depths[k] = probe.probe_depth(
            env.student, planted, lambda i, c: env.verify(problems[i], c), wait_id=wait_id, eos_id=env.eos_id,
            pad_id=env.pad_id, max_new_tokens=env.max_new_tokens,
        )
    return {"depths": depths}


def detour_section(cfg, env, tokenizer, problems) -> dict:
    """The detour probe (:mod:`opd.diagnostics.detour`) at the probe depths; ring walks only."""
    if cfg.dataset or cfg.task != "ring":
        return {"skipped": "skipped: the detour probe is for the ring walk (task=ring), where a wrong move is legal."}
    from opd.diagnostics.detour import detour_depth

    kw = dict(eos_id=env.eos_id, pad_id=env.pad_id, max_new_tokens=env.max_new_tokens, encode_prompt=env.encode_prompt)
    return {"depths": {k: detour_depth(env.student, tokenizer, problems, k, env.verify, **kw) for k in probe_depths(cfg.horizon)}}


def mistakes_section(cfg, env, tokenizer, prompts, student_ids) -> dict:
    """The step of each rollout's first mistake (:mod:`opd.diagnostics.mistakes`)."""
    if cfg.dataset:
        return {"skipped": NOT_TESTBED}
    from opd.diagnostics.mistakes import first_mistake_shares
    from opd.testbed.oracle import OracleTeacher

    oracle = OracleTeacher(tokenizer=tokenizer, recovers=False)
    return first_mistake_shares(oracle, prompts, student_ids, tokenizer.convert_tokens_to_ids(";"), cfg.horizon)


def _timed(times: dict, name: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    times[name] = time.perf_counter() - t0
    return out


def diagnose(path: str | Path, out: str | Path | None = None, *, prompts: int = 16, seed: int = 0,
             horizons=HORIZONS, repeats: int = REPEATS, variance_prompts: int = VARIANCE_PROMPTS) -> Path:
    """Measure and write the report; returns the path of ``report.md``."""
    from opd.diagnostics.report import write_report

    run_dir, ckpt = resolve(path)
    out_dir = Path(out) if out else (run_dir / "diagnose" if Path(path) == run_dir else run_dir / "diagnose" / ckpt.name)
    cfg, setup = load(ckpt)
    threads = torch.get_num_threads()
    if not cfg.dataset:
        torch.set_num_threads(1)  # the testbed's tiny models gain nothing from threads, and lose a lot when loaded
    try:
        results = measure(cfg, setup, prompts, seed, horizons, repeats, variance_prompts)
    finally:
        torch.set_num_threads(threads)
    return write_report(out_dir, results)


def measure(cfg, setup, prompts: int, seed: int, horizons, repeats: int, variance_prompts: int) -> dict:
    """Every section's results (plain numbers and lists), with the seconds each took."""
    env, tok = setup.env, setup.tokenizer
    if not setup.eval_problems:
        raise UserError("the run has no held-out problems to diagnose on.")
    problems = setup.eval_problems[:prompts]
    generator = torch.Generator().manual_seed(seed)
    times: dict[str, float] = {}
    x = [env.encode_prompt(p) for p in problems]
    student_ids = _timed(times, "rollouts", _student_rollouts, env, x, generator, env.max_new_tokens)
    results = {
        "checkpoint": cfg.student, "method": cfg.method, "task": cfg.dataset or f"{cfg.task} (horizon {cfg.horizon})",
        "teacher": cfg.teacher, "prompts": len(problems), "seed": seed,
        "mistakes": _timed(times, "mistakes", mistakes_section, cfg, env, tok, x, student_ids),
        "coverage": _timed(times, "coverage", coverage_section, env, x, student_ids, generator),
        "noise": _timed(times, "noise", noise_section, env, tok, x, student_ids, not cfg.dataset),
        "variance": _timed(times, "variance", variance_section, cfg, env, tok, horizons, repeats, variance_prompts, generator),
        "probe": _timed(times, "probe", probe_section, cfg, env, tok, problems, generator),
        "detour": _timed(times, "detour", detour_section, cfg, env, tok, problems),
    }
    results["seconds"] = times
    return results
