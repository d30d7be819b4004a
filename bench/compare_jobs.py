"""``opd compare --jobs N`` against the serial comparison: wall clock of the same spec.

    python bench/compare_jobs.py [--jobs 2] [--budget 96]

One spec (a 2-layer testbed-shaped student, d=64, saved to disk and loaded with
``from_pretrained``, the oracle teacher; two labels, OPD and GRPO; two reported seeds, a
two-value lr grid on two tuning seeds with one widening: 2 x (2 x 2 + 2 x 1 + 2) = 16 runs at
most) runs twice in fresh folders in this one process: serially (one torch thread), then with
``--jobs`` workers of one thread each. Printed: each side's wall clock, the ratio, the runs
each did, and whether every reported number and every lr choice came out the same (they
must: the same configs at the same thread count). On N idle cores the ratio is bounded by
N (each run starts as soon as its config is known, so a worker idles only at the end) and
lowered by spawning the workers (about 5 s each here: they import torch and transformers).

Cost: about 90 s on 2 cores with the defaults (1.44x); about 230 s with ``--budget 480``
(1.75x).
Results: docs/PERFORMANCE.md, section 7.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from opd.compare.driver import compare
from opd.testbed.builder import save_initial


def write_spec(folder: Path, student: str, budget: int) -> str:
    spec = {
        "base": {"student": student, "teacher": "oracle", "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 40,
                 "eval_size": 64},
        "methods": {"opd": {"method": "opd"}, "grpo": {"method": "grpo"}},
        "seeds": [0, 1], "tuning_seed": [2, 3], "budget_kind": "sequences", "budget": budget, "lr_grid": [1e-3, 3e-3],
        "lr_extend": 1, "eval_every": 2,
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def numbers(summary: dict) -> dict:
    return {(label, seed): [{k: v for k, v in row.items() if k != "usage/wall_s"} for row in run["history"]]
            for label, entry in summary["labels"].items() for seed, run in entry["runs"].items()}


def timed(spec: str, out: Path, jobs: int) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = compare(spec, str(out), jobs=jobs)
    return time.perf_counter() - start, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--budget", type=int, default=96)
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="opd-bench-jobs-"))
    student = save_initial(folder / "student", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4), seed=0)
    spec = write_spec(folder, str(student), args.budget)
    serial_s, serial = timed(spec, folder / "serial", 1)
    parallel_s, parallel = timed(spec, folder / "parallel", args.jobs)
    runs = {name: len(list((folder / name).glob("*/*/*/result.json"))) for name in ("serial", "parallel")}
    same = numbers(serial) == numbers(parallel) and serial["lr_info"] == parallel["lr_info"]
    print(f"\ncores: {os.cpu_count()}, load average (1 min): {os.getloadavg()[0]:.2f}")
    print(f"serial:  {serial_s:7.1f} s  ({runs['serial']} runs)")
    print(f"jobs={args.jobs}:  {parallel_s:7.1f} s  ({runs['parallel']} runs)")
    print(f"ratio serial / jobs={args.jobs}: {serial_s / parallel_s:.2f}x; the same numbers and lrs: {same}")


if __name__ == "__main__":
    main()
