"""Checkpoints that resume exactly and appear atomically or not at all.

A checkpoint is ``run_dir/checkpoints/step_<digits>/``: model + tokenizer
(``save_pretrained``), optimizer, scheduler, RNG states, counters, the run's config, and
``manifest.json`` (each file's size and sha256), written last. Only a folder whose name is
exactly ``step_<digits>`` is a checkpoint; everything else there is ignored by readers.

Writing (:func:`save_checkpoint`): into ``.tmp-step_N`` (a name no reader picks), every
file fsynced, the manifest written and fsynced last, the folder fsynced, then one
``rename`` to ``step_N`` and an fsync of ``checkpoints/``. A process killed at any point
leaves either the new checkpoint complete or no ``step_N`` at all; a checkpoint is only
ever removed by first renaming it to a hidden name, so a half-deleted one is never read.
Out of disk space: a one-line :class:`UserError`, the temporary folder removed, the earlier
checkpoints untouched.

Reading (:func:`latest_checkpoint`): the newest checkpoint whose manifest verifies (sizes
and checksums); each newer one that does not is reported in one line and skipped. A
checkpoint without a manifest but with its trainer state was written before manifests
existed and is accepted unverified.

A sharded (FSDP2) run writes the student's weights and optimizer state with
``torch.distributed.checkpoint`` into ``dcp/`` instead (each rank its shards, into the
same temporary folder on a shared file system; rank 0 writes the rest, the manifest and
the rename, between barriers). DCP reshards on load, so such a checkpoint resumes on any
number of ranks, one process included; a single-process checkpoint resumes on several
ranks too (its optimizer state is loaded as a full state dict and sharded).
``opd export`` turns either into a ``save_pretrained`` directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from opd.config.loader import save_config
from opd.errors import UserError

STATE_FILE = "trainer_state.pt"
DCP_DIR = "dcp"  # a sharded run's weights and optimizer state
MANIFEST = "manifest.json"
_NAME = re.compile(r"step_(\d+)")
_TMP, _OLD = ".tmp-", ".old-"  # being written; being removed (hidden: never a checkpoint)
_BLOCK = 1 << 20
LOW_SPACE = 64 << 20  # bytes: a write that fails with less free than this ran out of space


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint folder name (``step_000012`` -> 12), else None."""
    match = _NAME.fullmatch(path.name)
    return int(match[1]) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every ``step_<digits>`` folder of the run, oldest first (verified or not)."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=checkpoint_step)


# ---------------------------------------------------------------- verify


def file_sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_sha256(path: str | Path) -> str | None:
    """One sha256 of a model directory's weight files (``*.safetensors``, ``*.bin``, ``*.pt``,
    ``*.pth`` except the trainer state): sha256 over the lines ``name:sha256(file)`` in name
    order. None for a hub id or a directory without weight files. Two reports with the same
    value ran from the same weights; a base rebuilt on another CPU gets another value."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES and f.name != STATE_FILE)
    if not files:
        return None
    return hashlib.sha256("".join(f"{f.name}:{file_sha256(f)}\n" for f in files).encode()).hexdigest()


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is a complete, intact checkpoint; else what is wrong, in a few words."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None if (path / STATE_FILE).is_file() else f"no {MANIFEST} (an incomplete write)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        expected = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, size, sha in expected:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
        if file_sha256(file) != sha:
            return f"{name} does not match its sha256"
    return None


def latest_checkpoint(run_dir: str | Path, report: Callable[[Path, str], None] | None = None) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is skipped and
    passed to ``report(path, what is wrong)``."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if report is not None:
            report(path, problem)
    return None


# ---------------------------------------------------------------- write


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path) -> None:
    """fsync every file of ``folder``, then write (and fsync) the manifest of their sizes
    and checksums, then fsync the folder."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p, sync=True)} for p in files}
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"format": 1, "files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in [p for p in folder.rglob("*") if p.is_dir()] + [folder]:
        _fsync_dir(sub)


def _write_files(folder: Path, *, model, tokenizer, optimizer, scheduler, counters: dict, config, method_state) -> None:
    """``model``/``optimizer`` None: a sharded checkpoint's (they are in ``dcp/``)."""
    if model is not None:
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    save_config(config, folder / "config.yaml")
    state = {
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "counters": counters,
        "method_state": method_state,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
    }
    torch.save(state, folder / STATE_FILE)


def _remove(path: Path) -> None:
    """Remove a folder by renaming it to a hidden name first: never a half-deleted checkpoint."""
    hidden = path.with_name(_OLD + path.name)
    shutil.rmtree(hidden, ignore_errors=True)
    os.rename(path, hidden)
    _fsync_dir(path.parent)
    shutil.rmtree(hidden, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Temporary and half-removed folders of a killed writer (the run lock makes them stale)."""
    for p in root.iterdir():
        if p.name.startswith((_TMP, _OLD)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _out_of_space(err: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC or EDQUOT as an ``OSError`` or in a
    library's message (safetensors), or any error while ``folder``'s file system has less
    than :data:`LOW_SPACE` free (``torch.save`` reports a full disk as "unexpected pos")."""
    if not isinstance(err, Exception) or isinstance(err, UserError):  # e.g. a second stop signal
        return False
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


def prune(path: Path, keep_last: int) -> None:
    """Keep ``path`` and the ``keep_last - 1`` newest checkpoints before it (0 = keep all)."""
    step = checkpoint_step(path)
    older = [p for p in list_checkpoints(path.parent.parent) if checkpoint_step(p) < step]
    if keep_last > 0:
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            _remove(old)


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def weights_of(path: Path, cfg) -> Path:
    """Where to load a checkpoint's student from before its state is restored: the
    checkpoint itself, or for a sharded one the run's base student (its weights then come
    from ``dcp/``, :func:`load_trainer_state`)."""
    if not is_sharded_checkpoint(path):
        return path
    from opd.run.setup import resolve_student

    return resolve_student(cfg)


def _dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def load_sharded_weights(path: Path, model, optimizer=None) -> None:
    """Load ``path/dcp`` into ``model`` (and ``optimizer``), resharded to this run's layout
    (plain tensors in a single process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _load_full_optimizer(model, optimizer, saved: dict) -> None:
    """A single-process optimizer state (keyed by parameter index, in the order of the
    trainable parameters) into a sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    full = {"state": {names[i]: st for i, st in saved["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def _publish(tmp: Path, path: Path) -> None:
    """The written folder ``tmp`` becomes checkpoint ``path``: its manifest, then one rename
    (a checkpoint already there is removed first), then an fsync of the parent."""
    _write_manifest(tmp)
    if path.exists():
        _remove(path)
    os.rename(tmp, path)
    _fsync_dir(path.parent)


def _save_sharded(path: Path, *, model, tokenizer, optimizer, scheduler, counters: dict, config, method_state, keep_last: int) -> Path:
    """The sharded form of :func:`save_checkpoint` (every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    from opd.models import fsdp
    from opd.run import distributed

    root, main = path.parent, distributed.is_main()
    tmp = root / (_TMP + path.name)
    if main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        tmp.mkdir()
    distributed.barrier()
    fsdp.reshard(model)
    try:
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))
        distributed.barrier()
        if main:
            _write_files(tmp, model=None, tokenizer=tokenizer, optimizer=None, scheduler=scheduler,
                         counters=counters, config=config, method_state=method_state)
            _publish(tmp, path)
            prune(path, keep_last)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    distributed.barrier()
    return path


def save_checkpoint(path: Path, *, model, tokenizer, optimizer, scheduler, counters: dict, config, method_state: dict | None = None,
                    keep_last: int = 0, sharded: bool = False) -> Path:
    """Write the checkpoint ``path`` atomically (see the module doc), then :func:`prune`.
    ``sharded``: the student is FSDP2-sharded (every rank calls this)."""
    if sharded:
        return _save_sharded(path, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                             counters=counters, config=config, method_state=method_state, keep_last=keep_last)
    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    tmp = root / (_TMP + path.name)
    try:
        tmp.mkdir()
        _write_files(tmp, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                     counters=counters, config=config, method_state=method_state)
        _publish(tmp, path)
    except BaseException as err:
        full = _out_of_space(err, root)  # asked before the temporary folder frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            before = [p.name for p in list_checkpoints(root.parent) if p != path]
            raise UserError(
                f"out of disk space while writing checkpoint {path}: nothing of it was kept, the previous checkpoint "
                f"({before[-1] if before else 'none'}) is intact; free space, then continue with resume=true"
            ) from None
        raise
    prune(path, keep_last)
    return path


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``step_N.damaged`` (kept for a look, never read again)."""
    target = path.with_name(path.name + ".damaged")
    if target.exists():
        _remove(target)
    os.rename(path, target)
    return target


def load_trainer_state(path: Path, *, optimizer, scheduler, method_state=None, model=None) -> dict:
    """Restore optimizer, scheduler, the method's state and RNG states; return the counters.
    Read onto the host: the optimizer moves its states to its parameters' device, so a run
    saved on a GPU resumes on a CPU and the other way round. A sharded checkpoint also
    restores ``model``'s weights (see the module doc); a sharded ``model`` takes a
    single-process checkpoint's optimizer state as a full state dict."""
    from opd.models import fsdp

    state = torch.load(path / STATE_FILE, weights_only=False, map_location="cpu")
    if method_state is not None and state.get("method_state") is not None:
        method_state.load_state_dict(state["method_state"])
    if is_sharded_checkpoint(path):
        load_sharded_weights(path, model, optimizer)
    elif model is not None and fsdp.is_sharded(model):
        _load_full_optimizer(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["counters"]
