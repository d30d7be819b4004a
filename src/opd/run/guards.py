"""What stops a run cleanly: a signal (preemption, Ctrl-C) and non-finite weights.

:class:`StopSignals` turns the first SIGTERM or SIGINT into a request that the runner
honours at the end of its current step (checkpoint, logs closed, :class:`RunStopped`); a
second one raises :class:`RunStopped` at once, wherever the run is (a checkpoint being
written is abandoned: it appears atomically or not at all). Handlers are installed only
from the main thread (Python delivers signals there) and the previous ones are restored
on exit. The grace period of a scheduler (Kubernetes' 30 s, SLURM's ``--signal``) must
cover one step and one checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

import torch

from opd.errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(UserError):
    """The run stopped before its end (a signal, non-finite steps or weights); the message
    says at which step, what was saved, and how to go on."""


class StopSignals:
    """Context manager: while active, ``self.signum`` is the first stop signal received
    (None before). ``step()`` gives the step to name if a second signal stops the run."""

    def __init__(self, step: Callable[[], int]):
        self.step = step
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> StopSignals:
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            # os.write: a handler may interrupt a print (or the progress bar) on the same stream
            os.write(2, f"\n{name}: stopping after the current step, with a checkpoint; {name} again stops at once\n".encode())
            return
        raise RunStopped(f"stopped at once by a second {name} at step {self.step()}, without a new checkpoint; "
                         "resume with resume=true (from the latest checkpoint)")


def finite_params(model: torch.nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite (one reduction, one device sync)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # a sharded model: this rank's shards
    flags = [torch.isfinite(p).all() for p in local]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True
