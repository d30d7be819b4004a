"""Checkpoints that resume exactly: model + tokenizer (``save_pretrained``), optimizer,
scheduler, RNG states, counters and the run's config."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from opd.config.loader import save_config

STATE_FILE = "trainer_state.pt"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (one whose trainer state was written last)."""
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).exists()) if root.exists() else []
    return done[-1] if done else None


def save_checkpoint(path: Path, *, model, tokenizer, optimizer, scheduler, counters: dict, config, method_state: dict | None = None) -> Path:
    """Write to a temporary folder, then rename: a crash never leaves a half checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    save_config(config, tmp / "config.yaml")
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "counters": counters,
        "method_state": method_state,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
    }
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_trainer_state(path: Path, *, optimizer, scheduler, method_state=None) -> dict:
    """Restore optimizer, scheduler, the method's state and RNG states; return the counters."""
    state = torch.load(path / STATE_FILE, weights_only=False)
    if method_state is not None and state.get("method_state") is not None:
        method_state.load_state_dict(state["method_state"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["counters"]
