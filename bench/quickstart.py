"""``opd quickstart`` on a fresh cache: the base built and the runs one at a time (as it was)
against the shipped base and the runs on worker processes.

    python bench/quickstart.py [--jobs N]

Two subprocesses of ``opd quickstart`` run one after the other, each with an empty
``OPD_CACHE`` and its own output folder, both with one torch thread a run:

- before: ``OPD_SHIPPED_BASES=0 opd quickstart --jobs 1`` (the student base built from
  scratch, then the 15 reported runs one at a time);
- after: ``opd quickstart --jobs N`` (the base shipped with opd copied into the cache, the
  runs on N workers; default: one a core, at most 8).

Printed: each side's wall clock (the whole command: interpreter start, base, runs, report),
the ratio, and whether every logged number of every run (losses, gradient norms,
evaluations; not the clock) came out the same. They are the same when the base built here
is bit for bit the shipped one, which holds on the CPU that built it; on another CPU the
"before" base lands elsewhere, and the printout says the numbers differ.

Cost: 12 minutes on 2 cores (542 s before, 177 s after). Results: docs/PERFORMANCE.md, section 8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(out: Path, cache: Path, jobs: int, shipped: bool) -> float:
    env = dict(os.environ, OPD_CACHE=str(cache), OPD_SHIPPED_BASES="1" if shipped else "0", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "opd", "quickstart", "--out", str(out), "--jobs", str(jobs)], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def logged(out: Path) -> dict:
    """Every run's metrics rows without the clock, by run folder."""
    def timeless(row: dict) -> dict:
        return {k: v for k, v in row.items() if k != "time" and not k.startswith("time/") and "wall" not in k}

    return {str(p.parent.relative_to(out)): [timeless(json.loads(line)) for line in p.read_text().splitlines()]
            for p in sorted(out.glob("*/seed*/metrics.jsonl"))}


def main() -> None:
    from opd.compare.quickstart import default_jobs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=default_jobs())
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="opd-bench-quickstart-"))
    before_s = timed(folder / "before", folder / "cache_before", 1, shipped=False)
    after_s = timed(folder / "after", folder / "cache_after", args.jobs, shipped=True)
    before, after = logged(folder / "before"), logged(folder / "after")
    print(f"cores: {os.cpu_count()}, load average (1 min): {os.getloadavg()[0]:.2f}; folder: {folder}")
    print(f"before (base built, 1 run at a time):     {before_s:7.1f} s  ({len(before)} runs)")
    print(f"after (shipped base, {args.jobs} runs at a time): {after_s:7.1f} s  ({len(after)} runs)")
    print(f"ratio before / after: {before_s / after_s:.2f}x; every logged number the same: {before == after}")


if __name__ == "__main__":
    main()
