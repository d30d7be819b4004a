"""``opd export RUN_OR_CHECKPOINT OUT [--merge]``: a checkpoint as a plain model directory.

The newest checkpoint that verifies (or the one named) is written to ``OUT`` with
``save_pretrained``, with its tokenizer: a full model as it is; a LoRA student's adapter as
PEFT's adapter directory, or with ``merge`` the base model with the adapter folded in (a
model any ``from_pretrained`` loads without PEFT). The optimizer state is not exported.
"""

from __future__ import annotations

from pathlib import Path

from opd.config.loader import load_config, with_changes
from opd.errors import UserError
from opd.models import lora
from opd.models.hf import load_tokenizer
from opd.run.checkpoint import is_sharded_checkpoint, latest_checkpoint, load_sharded_weights, verify_checkpoint, weights_of


def checkpoint_of(path: str | Path) -> Path:
    """A checkpoint directory: ``path`` itself, or a run directory's newest complete one."""
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir() is False and verify_checkpoint(path) is None:
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise UserError(f"{path} holds no complete checkpoint (a run directory with checkpoints/, or a checkpoint)")
    return found


def export(path: str | Path, out: str | Path, *, merge: bool = False) -> Path:
    from opd.config.train import TrainConfig
    from opd.run.setup import load_student

    ckpt, out = checkpoint_of(path), Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; choose a new directory to export to")
    cfg = with_changes(load_config(TrainConfig, ckpt / "config.yaml"), device="cpu", gradient_checkpointing=False)
    model = load_student(weights_of(ckpt, cfg), cfg)
    if is_sharded_checkpoint(ckpt):  # a sharded run's weights: from dcp/, gathered here
        load_sharded_weights(ckpt, model)
    if lora.is_lora(model) and merge:
        model = lora.merged(model)
    model.save_pretrained(out)
    load_tokenizer(str(ckpt), what="checkpoint").save_pretrained(out)
    return out
