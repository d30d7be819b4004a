"""Training metrics: one JSON line per ``log`` call, optional TensorBoard, a tqdm bar.

``run_dir/metrics.jsonl`` is the record of a run: each line is
``{"step": int, "time": unix_seconds, "<name>": float | null, ...}``. Metric names are
namespaced strings (``loss/rkl``, ``teacher/entropy``). Values are converted to float
(tensors and numpy scalars included). JSON has no NaN or infinity, so a non-finite value
is written as ``null``; TensorBoard and the progress bar get the float itself (nan/inf).
Each line is flushed as it is written, so a crashed process loses nothing already logged.

(Named ``metrics_log`` rather than ``logging`` so that it can never shadow the standard
library's ``logging``, e.g. for a script or tool run from inside ``src/opd``.)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

__all__ = ["MetricLogger", "read_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"
_RESERVED = ("step", "time")


def _to_float(name: str, value: Any) -> float:
    """A Python float from a number, a one-element tensor or a numpy scalar."""
    if hasattr(value, "item"):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            raise TypeError(f"metric {name!r} must be a scalar, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
    return float(value)


def _json_value(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _complete_rows(path: Path) -> list[tuple[dict, str]]:
    """``(row, line)`` for each complete line of a metrics file.

    Text after the last newline (a write cut short by a crash) is not a row.
    """
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    out = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append((json.loads(line), line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {i} is not valid JSON: {line[:80]!r}") from None
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All complete rows of ``run_dir/metrics.jsonl`` (or of that file, if given)."""
    path = Path(run_dir)
    path = path / METRICS_FILE if path.is_dir() else path
    return [row for row, _ in _complete_rows(path)] if path.exists() else []


def _truncate(path: Path, resume_step: int | None) -> None:
    """Drop an incomplete last line and, when resuming, rows with ``step > resume_step``."""
    if not path.exists():
        return
    rows = _complete_rows(path)
    keep = [line for row, line in rows if resume_step is None or row["step"] <= resume_step]
    new_text = "".join(line + "\n" for line in keep)
    if new_text != path.read_text(encoding="utf-8"):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(new_text, encoding="utf-8")
        os.replace(tmp, path)


def _summary_writer(log_dir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "MetricLogger(tensorboard=True) needs the tensorboard package: "
            "pip install tensorboard (or pip install 'opd[tensorboard]')"
        ) from e
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)


def _format(value: float) -> str:
    """Compact number for the progress bar: ``0.0123``, ``1.2e+04``, ``nan``."""
    return f"{value:.3g}"


class MetricLogger:
    """Append metrics to ``run_dir/metrics.jsonl``, TensorBoard (optional) and a tqdm bar.

    ``resume_step``: rows with ``step > resume_step`` are removed first (they belong to the
    part of the run being redone) and TensorBoard events after it are purged.
    The bar's position is the ``step`` last logged; ``progress_keys`` are shown beside it.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = False,
        progress: bool = True,
        progress_total: int | None = None,
        progress_keys: Iterable[str] = (),
        desc: str = "train",
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        _truncate(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        purge = None if resume_step is None else resume_step + 1
        self._writer = _summary_writer(self.run_dir, purge) if tensorboard else None
        self._progress_keys = list(progress_keys)
        self._shown: dict[str, str] = {}
        self._bar = self._make_bar(progress, progress_total, desc, resume_step or 0)

    @staticmethod
    def _make_bar(enabled: bool, total: int | None, desc: str, initial: int) -> Any:
        is_tty = sys.stderr.isatty()
        return tqdm(
            total=total,
            desc=desc,
            initial=initial,
            disable=not enabled,
            dynamic_ncols=True,
            mininterval=0.5 if is_tty else 30.0,
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` at ``step`` in every sink."""
        if self._file.closed:
            raise ValueError("MetricLogger.log() called after close()")
        clash = [k for k in _RESERVED if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved in metrics.jsonl")
        values = {name: _to_float(name, v) for name, v in metrics.items()}
        self._write_json(int(step), values)
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, int(step))
        self._update_bar(int(step), values)

    def _write_json(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({name: _json_value(v) for name, v in values.items()})
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def _update_bar(self, step: int, values: dict[str, float]) -> None:
        if self._bar.disable:
            return
        shown = {k: _format(values[k]) for k in self._progress_keys if k in values}
        if shown:
            self._shown.update(shown)
            text = " ".join(f"{k}={v}" for k, v in self._shown.items())
            self._bar.set_postfix_str(text, refresh=False)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._bar.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
