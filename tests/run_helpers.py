"""Shared by the tests that run ``opd`` in a subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import opd


def subprocess_env() -> dict:
    """The subprocess imports this ``opd``, with one thread like the tests."""
    src = str(Path(opd.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def tiny_cli_args(student: str, run_dir: Path) -> list[str]:
    """``tiny_cfg``'s settings as ``key=value``."""
    return [f"student={student}", "teacher=oracle", "prompts_per_step=4", "group_size=2", "micro_batch_size=3",
            "max_new_tokens=40", "eval_every=0", "eval_size=8", "eval_k=2", f"run_dir={run_dir}", "progress=false", "lr=1e-3"]
