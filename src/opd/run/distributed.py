"""Data-parallel runs under ``torchrun``: the process group, the split of each step's
prompts, and the reductions the loop and the runner need.

``torchrun --nproc_per_node N -m opd train ...`` starts N ranks of the same config. Each
step, every rank draws the same problems (the step's seeded generator), takes its
``problems[rank::N]`` share, samples and scores it with its own random stream, and
computes its loss with the step's global token count, so the averaged gradient is the
single-process one on the global batch (METHODS rule 4). Metrics are means over ranks,
usage counters sums; rank 0 alone writes the log, the progress bar and the checkpoint's
single-file parts. Without ``torchrun`` (no ``WORLD_SIZE`` > 1) nothing here does
anything: a single process runs exactly as before.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from opd.errors import UserError


def launched() -> bool:
    """Whether ``torchrun`` (or any launcher setting ``WORLD_SIZE``) started several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str) -> None:
    """Join the process group torchrun set up (NCCL when ``device`` is a GPU, else gloo);
    no-op otherwise. ``device=auto`` is this rank's GPU (:func:`opd.models.device.resolve_device`)."""
    from opd.models.device import resolve_device

    if not launched() or dist.is_initialized():
        return
    target = resolve_device(device)
    cuda = target.type == "cuda"
    if cuda:
        torch.cuda.set_device(target)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))


def finish(ok: bool = True) -> None:
    """Leave the process group: after every rank got here when ``ok`` (a rank leaving while
    another still talks to it aborts), at once after an error (the others may never come;
    torchrun stops them when this rank exits)."""
    if not dist.is_initialized():
        return
    try:
        if ok:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def split(items: list, what: str = "prompts_per_step") -> list:
    """This rank's share ``items[rank::world]``; the shares must be equal (the same number
    of prompts, so that no rank waits on padding micro-batches more than needed)."""
    if world() > 1 and len(items) % world():
        raise UserError(f"{what}={len(items)} does not split evenly over {world()} ranks; use a multiple of {world()}")
    return items[rank()::world()]


def share(items: list) -> list:
    """This rank's share of a list that need not split evenly (evaluation problems)."""
    return items[rank()::world()]


def rank_generator(generator: torch.Generator) -> torch.Generator:
    """This rank's random stream for the step: ``generator`` itself on one rank (a single
    process is unchanged), else the rank's own of ``world`` seeds drawn from it (the same
    draw on every rank). Not ``seed + rank``: the first draws of generators seeded with
    neighbouring integers are correlated."""
    if world() == 1:
        return generator
    seeds = torch.randint(2**62, (world(),), generator=generator, device="cpu")
    return torch.Generator().manual_seed(int(seeds[rank()]))


def _reduced(value: float, op) -> float:
    if not active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return float(t)


def total(value: float | torch.Tensor) -> float:
    """The sum over ranks (the value itself on one rank)."""
    return _reduced(value, dist.ReduceOp.SUM)


def most(value: float) -> float:
    """The largest value over ranks (the value itself on one rank)."""
    return _reduced(value, dist.ReduceOp.MAX)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (so that every rank decides the same)."""
    return total(1.0 if flag else 0.0) > 0 if active() else flag


def _gather(obj) -> list:
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def mean_metrics(metrics: dict, weight: float = 1.0) -> dict:
    """Each key's mean over the ranks that report it, weighted by ``weight`` (one rank: as is)."""
    if not active():
        return metrics
    rows = _gather((metrics, float(weight)))
    out = {}
    for key in dict.fromkeys(k for m, _ in rows for k in m):
        pairs = [(m[key], w) for m, w in rows if key in m]
        mass = sum(w for _, w in pairs)
        out[key] = sum(float(v) * w for v, w in pairs) / mass if mass > 0 else float(pairs[0][0])
    return out


def sum_counts(counts: dict) -> dict:
    """Each counter summed over ranks."""
    return {k: total(v) if isinstance(v, float) else int(total(v)) for k, v in counts.items()}
