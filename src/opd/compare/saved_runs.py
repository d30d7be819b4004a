"""Finished runs of a comparison on disk: each leaves ``result.json`` with its config, the
hash of its student's weights, its evaluation history and the machine it ran on; a re-run
reuses it when the config is the same and the student's weights are too (a testbed base
rebuilt on another CPU is another base). A run recomputed on another machine can part from
the saved one after many steps (``docs/results/grpo_stall.md``), so each says where it ran."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from opd.config.loader import config_to_dict, with_changes
from opd.config.train import TrainConfig

NOT_IN_REUSE_KEY = ("progress", "tensorboard", "overwrite", "resume", "run_dir")  # run_dir: a moved --out still reuses
RESULT_FILE = "result.json"


def _reuse_key(cfg: TrainConfig) -> dict:
    key = {k: v for k, v in config_to_dict(cfg).items() if k not in NOT_IN_REUSE_KEY}
    return json.loads(json.dumps(key))


def _saved_key(saved: dict) -> dict:
    """A finished run's reuse key, read today: a config key added since it ran (absent from
    its file) takes its default, which by this project's rule is the behaviour before the key."""
    defaults = _reuse_key(TrainConfig(method=saved.get("method", "opd")))
    return {**{k: v for k, v in defaults.items() if k not in saved}, **{k: v for k, v in saved.items() if k not in NOT_IN_REUSE_KEY}}


def machine() -> str:
    """Where a run is computed: the CPU's model, the GPU's when CUDA is up, and the builds
    of torch and Python (e.g. ``AMD EPYC; torch 2.13.0+cpu; Python 3.11.7; x86_64``)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = [f"{torch.cuda.get_device_name(0)}"] if torch.cuda.is_available() else []
    return "; ".join([cpu, *gpu, f"torch {torch.__version__}", f"Python {platform.python_version()}", platform.machine()])


def finished_result(cfg: TrainConfig) -> dict | None:
    """The saved ``{"config", "student_sha256", "history"}`` of the finished run in
    ``cfg.run_dir`` when its config is ``cfg``'s and it started from the same student
    weights (a run saved before the hash was recorded: from the config alone), else None."""
    path = Path(cfg.run_dir) / RESULT_FILE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if _saved_key(saved.get("config") or {}) != _reuse_key(cfg):
        return None
    was = saved.get("student_sha256")  # absent: a run from before the hash was saved
    return None if was is not None and was != student_sha256(cfg) else saved


def student_sha256(cfg: TrainConfig) -> str | None:
    """:func:`opd.run.checkpoint.weights_sha256` of the student ``cfg`` starts from, hashed
    once per process while its weight files keep their size and modification time."""
    from opd.run.checkpoint import weights_sha256
    from opd.run.setup import resolve_student

    path = Path(resolve_student(cfg)).expanduser()
    files = sorted(path.iterdir()) if path.is_dir() else []
    stamp = (str(path), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()))
    if stamp not in _HASHED:
        _HASHED[stamp] = weights_sha256(path)
    return _HASHED[stamp]


_HASHED: dict[tuple, str | None] = {}


def run_or_reuse(cfg: TrainConfig, force: bool = False) -> dict:
    """``{"config", "history", "reused", "extended"}``: the finished run in ``cfg.run_dir`` if
    its config is ``cfg`` (and not ``force``); that run continued from its last checkpoint when
    it is ``cfg`` stopped at a smaller budget (:func:`extendable`); else a fresh run."""
    from opd.run.runner import train

    saved = None if force else finished_result(cfg)
    if saved is not None:
        return {**saved, "reused": True, "extended": False}
    shorter = None if force else extendable(cfg)
    path = Path(cfg.run_dir) / RESULT_FILE
    path.unlink(missing_ok=True)
    if shorter is None:
        history, where = train(cfg), machine()
    else:
        history = shorter["history"] + train(with_changes(cfg, resume=True))
        where = _machines(shorter.get("machine"), shorter["history"][-1]["step"])
    result = {"config": _reuse_key(cfg), "student_sha256": student_sha256(cfg), "history": history, "machine": where}
    path.write_text(json.dumps(result, indent=1))
    return {**result, "reused": False, "extended": shorter is not None}


EXTENDABLE_KINDS = ("steps", "sequences", "teacher_tokens")  # counted exactly; wall time is not


def extendable(cfg: TrainConfig) -> dict | None:
    """The saved result of the finished run in ``cfg.run_dir`` when that run is ``cfg``
    stopped earlier: the same config but a smaller ``budget`` of the same counted kind, from
    the same student weights, with a checkpoint at its last step. Continuing it to ``cfg``'s
    budget gives the run ``cfg`` would train from scratch: every step draws its randomness
    from (seed, step), the lr schedule follows ``steps`` (not the budget), and a resumed run
    replays exactly (``tests/test_stop_and_resume.py``). Its history keeps the evaluations a fresh run
    makes (the stop's own evaluation is dropped when ``eval_every`` would skip that step).
    None otherwise."""
    from opd.run.checkpoint import checkpoint_dir, latest_checkpoint

    path = Path(cfg.run_dir) / RESULT_FILE
    if cfg.budget is None or cfg.budget_kind not in EXTENDABLE_KINDS or not path.exists():
        return None
    saved = json.loads(path.read_text())
    before, now = _saved_key(saved.get("config") or {}), _reuse_key(cfg)
    if {**before, "budget": now["budget"]} != now or before["budget"] is None or before["budget"] >= now["budget"]:
        return None
    if saved.get("student_sha256") != student_sha256(cfg) or not saved.get("history"):
        return None
    last = saved["history"][-1]["step"]
    ckpt = latest_checkpoint(cfg.run_dir)
    if ckpt is None or ckpt != checkpoint_dir(cfg.run_dir, last) or last >= cfg.steps:
        return None
    fresh = lambda step: step == 0 or (cfg.eval_every > 0 and step % cfg.eval_every == 0)  # noqa: E731
    return {**saved, "history": [row for row in saved["history"] if fresh(row["step"])]}


def _machines(before: str | None, step: int) -> str:
    """Where an extended run was computed: one machine, or each with its steps."""
    here = machine()
    return here if before == here else f"{before or 'not recorded'} (steps 1-{step}); {here} (from step {step + 1})"


def student_base(cfg: TrainConfig) -> dict:
    """``{"student", "weights_sha256"}``: the student a run starts from and one hash of its
    weight files (None for a hub id), so that two reports say whether they ran from the same
    base (a testbed base rebuilt on another CPU is another base; a saved run from another
    base is not reused: :func:`finished_result`); ``base_seed`` too when it is not 0."""
    return {"student": cfg.student, **({"base_seed": cfg.base_seed} if cfg.base_seed else {}),
            "weights_sha256": student_sha256(cfg)}
