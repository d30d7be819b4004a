"""Resume is explicit about change: the checkpoint's config is the run's config.

On ``resume=true`` the run's config is the one saved in the checkpoint. A key the user set
explicitly (``key=value``, the YAML file, or passed to ``TrainConfig(...)``: pydantic's
``model_fields_set``) and that differs from the checkpoint's is a requested change:

- **Keys that can change** (:data:`CAN_CHANGE`) are applied, printed and recorded in the
  metrics log. They steer the optimizer or the bookkeeping, not what one step computes:
  the length of the run (``steps``, ``budget``, ``budget_kind``; the lr schedule is
  recomputed for the new ``steps``), the optimizer's settings (``lr``, ``warmup_steps``,
  ``lr_schedule``, ``weight_decay``, ``max_grad_norm``: what a user lowers after a loss
  spike), ``micro_batch_size`` (gradient accumulation: the same step in smaller pieces,
  e.g. after running out of memory), where the models run and the memory knob
  (``device``, ``teacher_device``, ``gradient_checkpointing``, ``loss_kernel``: a run saved
  on a GPU resumes on another one or on the CPU; the two loss kernels give the same
  numbers), and cadence and output (``eval_every``,
  ``save_every``, ``keep_last``, ``max_nonfinite_steps``, ``tensorboard``, ``progress``).
- **Every other key is refused** with each difference named: the method and every method
  knob; the models (``student``, ``teacher``, ``dtype``, ``oracle_*``); the data
  (``dataset``, ``task``, ``horizon``, ``verifier``, ``eval_fraction``,
  ``chat_template``, ``seed``: it draws every step's prompts); the batch shape
  (``prompts_per_step``, ``group_size``, ``ppo_epochs``); the sampler (``max_new_tokens``,
  ``temperature``, ``top_p``: they define the on-policy distribution); and the evaluation
  protocol (``eval_size``, ``eval_split``, ``eval_k``, ``eval_temperature``: one run's
  accuracy curve must be one measurement). A key added later is refused until it is added
  to :data:`CAN_CHANGE`, the safe default.
- ``run_dir``, ``resume`` and ``overwrite`` belong to the invocation, not to the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opd.config.loader import load_config, with_changes
from opd.errors import UserError

CAN_CHANGE = frozenset({
    "steps", "budget", "budget_kind", "lr", "warmup_steps", "lr_schedule", "weight_decay", "max_grad_norm",
    "micro_batch_size", "eval_every", "save_every", "keep_last", "max_nonfinite_steps", "tensorboard", "progress",
    "device", "teacher_device", "gradient_checkpointing", "loss_kernel",
})
PER_INVOCATION = frozenset({"run_dir", "resume", "overwrite"})


def config_changes(saved, asked) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, asked value)}`` for the keys ``asked`` set explicitly that differ."""
    keys = sorted(asked.model_fields_set - PER_INVOCATION)
    return {k: (getattr(saved, k), getattr(asked, k)) for k in keys if getattr(saved, k) != getattr(asked, k)}


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def resumed_config(checkpoint: Path, asked):
    """The run's config when resuming from ``checkpoint``, and the applied changes
    ``{key: (old, new)}``; a change to a key outside :data:`CAN_CHANGE` is a
    :class:`UserError` naming every such key."""
    saved = load_config(type(asked), checkpoint / "config.yaml")
    changes = config_changes(saved, asked)
    refused = {k: v for k, v in changes.items() if k not in CAN_CHANGE}
    if refused:
        raise UserError(
            f"resume=true cannot change {_describe(refused)} (the run in {asked.run_dir} was trained with the former); "
            "drop those settings to continue it, or start a new run (another run_dir, or overwrite=true)"
        )
    applied = {k: new for k, (_, new) in changes.items()}
    return with_changes(saved, **applied, **{k: getattr(asked, k) for k in PER_INVOCATION}), changes


def describe_changes(step: int, changes: dict[str, tuple[Any, Any]]) -> str:
    """The line printed on resume."""
    return f"resuming at step {step}" + (f" with changes: {_describe(changes)}" if changes else "")


def changes_row(changes: dict[str, tuple[Any, Any]]) -> dict[str, float]:
    """The changes as metrics (logged in the resumed run's first step's row):
    ``resume/<key>`` = the new value for numbers and booleans, ``resume/<key>=<value>`` = 1
    for text and None."""
    row = {}
    for key, (_, new) in changes.items():
        if isinstance(new, (int, float)):
            row[f"resume/{key}"] = float(new)
        else:
            row[f"resume/{key}={new}"] = 1.0
    return row
