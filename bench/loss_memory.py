"""Peak extra memory and time of forward+backward: naive full logits vs the chunked form.

Not a test. For V = 151,936 (Qwen's vocabulary) and N tokens, each case runs in a fresh
subprocess (float32, CPU):

- naive: ``z = h @ W.T`` materialized ``[N, V]``, log-softmax of both sides, the
  divergence summed over the vocabulary (TRL-style math), ``(w·D).sum().backward()``.
- lean-fused: ``chunked_divergence_loss`` (gradients made in the forward).
- lean-recompute: ``chunked_divergence`` then ``(w·D).sum().backward()`` (backward
  recomputes each chunk's logits).

Both sides get the same inputs: ``h [N, H]`` and ``W [V, H]`` requiring grad, and the
teacher either as precomputed logits ``[N, V]`` (``--teacher logits``, default) or as a
teacher hidden/LM head (``--teacher hidden``: the naive side then materializes the
teacher logits too, the lean side chunks them). Inputs are allocated before measuring.

"Peak extra" is the process's peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs`` once the inputs exist) minus its resident memory at that
point: everything forward+backward allocates, including ``h.grad`` and ``W.grad``
(``V·H`` floats, the same on both sides). Time is one forward+backward, wall clock,
first run in its process (page faults included on both sides); with ``--repeat R`` the
methods run interleaved R times and the median is printed. ``load1`` is the highest
1-minute load average seen after the case's runs: on a shared machine, compare times
only between rows run under similar load.

    python bench/loss_memory.py                 # V=151936, H=1024, N in {1024, 4096}
    python bench/loss_memory.py --n 1024 --repeat 3
    python bench/loss_memory.py --hidden 256 --methods naive lean-fused

Cost on a 2-core CPU (~40 GFLOP/s): one N=4096 forward+backward is >= 3 matmuls of
2·N·V·H = 1.3 TFLOP each, 1-2 min per case; the default run takes 13-17 min. The naive JSD
at N=4096 needs ~20 GiB of free memory (8 ``[N, V]`` float32 tensors): where the estimate
exceeds what is available the case is skipped rather than risk the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from opd.losses.chunked import chunked_divergence, chunked_divergence_loss, default_chunk_size
from procmem import available_mib as _available_mib, reset_peak as _reset_peak, status_kib as _status_kib  # bench/procmem.py

METHODS = ("naive", "lean-fused", "lean-recompute")


def naive_estimate_mib(kind: str, n: int, hidden: int, vocab: int) -> float:
    """Naive peak extra, from measurements: ~4 (rkl) / ~8 (jsd) ``[N, V]`` tensors + W.grad."""
    return ((4.1 if kind == "rkl" else 8.1) * n * vocab + vocab * hidden) * 4 / 2**20


def naive_values(h, W, teacher, kind: str, beta: float) -> torch.Tensor:
    """Plain full-logits per-token divergence (the baseline a user would write)."""
    t = teacher if isinstance(teacher, torch.Tensor) else teacher[0] @ teacher[1].T
    lp_s, lp_t = F.log_softmax(h @ W.T, dim=-1), F.log_softmax(t, dim=-1)
    if kind == "rkl":
        return (lp_s.exp() * (lp_s - lp_t)).sum(-1)
    lp_m = torch.logaddexp(lp_t + math.log(beta), lp_s + math.log1p(-beta))
    kl_t = (lp_t.exp() * (lp_t - lp_m)).sum(-1)
    return beta * kl_t + (1 - beta) * (lp_s.exp() * (lp_s - lp_m)).sum(-1)


def run_case(method, kind, n, hidden, vocab, chunk, teacher_mode, beta=0.5) -> dict:
    torch.manual_seed(0)
    h = torch.randn(n, hidden, requires_grad=True)
    W = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_()
    if teacher_mode == "logits":
        teacher = torch.randn(n, vocab) * 2.0
    else:
        teacher = (torch.randn(n, hidden), torch.randn(vocab, hidden) * (2.0 / hidden**0.5))
    w = torch.full((n,), 1.0 / n)
    need, have = naive_estimate_mib(kind, n, hidden, vocab), _available_mib() - 1024
    if method == "naive" and need > have:
        return {"skipped": f"needs ~{need / 1024:.1f} GiB, {have / 1024:.1f} GiB available"}
    base_kib, exact = _status_kib("VmRSS:"), _reset_peak()
    base_kib = base_kib if exact else _status_kib("VmHWM:")
    t0 = time.perf_counter()
    if method == "naive":
        loss = (naive_values(h, W, teacher, kind, beta) * w).sum()
        loss.backward()
    elif method == "lean-fused":
        loss, _ = chunked_divergence_loss(h, W, teacher, kind, w, beta=beta, chunk_size=chunk)
        loss.backward()
    else:
        loss = (chunked_divergence(h, W, teacher, kind, beta=beta, chunk_size=chunk) * w).sum()
        loss.backward()
    seconds = time.perf_counter() - t0
    peak_kib = _status_kib("VmHWM:")
    return {"seconds": seconds, "extra_mib": (peak_kib - base_kib) / 1024, "loss": float(loss)}


def _child(case: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--teacher", args.teacher]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), load=os.getloadavg()[0])


def _summary(runs: list[dict]) -> dict:
    """Median time, max memory and max 1-min load average over the repeats."""
    bad = [r for r in runs if "extra_mib" not in r]
    if bad:
        return bad[0]
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "extra_mib": max(r["extra_mib"] for r in runs),
        "loss": runs[0]["loss"],
        "load": max(r["load"] for r in runs),
    }


def _measure(n: int, kind: str, args) -> dict:
    """Each method ``args.repeat`` times, interleaved, so CPU contention hits all alike."""
    runs = {method: [] for method in args.methods}
    for _ in range(args.repeat):
        for method, got in runs.items():
            if not got or "extra_mib" in got[-1]:
                got.append(_child(f"{method}:{kind}:{n}", args))
    return {method: _summary(got) for method, got in runs.items()}


def _row(n, kind, method, r, ref) -> str:
    if "extra_mib" not in r:
        return f"{n:>6} {kind:>4} {method:>15}  {r.get('error') or 'skipped: ' + r['skipped']}"
    has_ref = ref is not None and "extra_mib" in ref
    mem_ratio = r["extra_mib"] / ref["extra_mib"] if has_ref else float("nan")
    time_ratio = r["seconds"] / ref["seconds"] if has_ref else float("nan")
    return (
        f"{n:>6} {kind:>4} {method:>15} {r['extra_mib']:>11.0f} {r['seconds']:>8.2f}"
        f" {mem_ratio:>9.3f} {time_ratio:>9.2f} {r['load']:>6.1f} {r['loss']:>12.6f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--kinds", nargs="+", default=["rkl", "jsd"], choices=["rkl", "jsd"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--chunk", type=int, default=0, help="tokens per chunk (0: library default)")
    p.add_argument("--teacher", default="logits", choices=["logits", "hidden"])
    p.add_argument("--repeat", type=int, default=1, help="runs per case (median time)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    chunk = args.chunk or default_chunk_size(args.vocab)
    if args.child:
        method, kind, n = args.child.split(":")
        result = run_case(method, kind, int(n), args.hidden, args.vocab, chunk, args.teacher)
        print(json.dumps(result))
        return
    print(f"V={args.vocab} H={args.hidden} chunk={chunk} teacher={args.teacher} float32 "
          f"threads={torch.get_num_threads()} cpus={os.cpu_count()} repeat={args.repeat}")
    print(f"{'N':>6} {'kind':>4} {'method':>15} {'extra_MiB':>11} {'time_s':>8}"
          f" {'mem/naive':>9} {'t/naive':>9} {'load1':>6} {'loss':>12}")
    start = time.perf_counter()
    for n in args.n:
        for kind in args.kinds:
            results = _measure(n, kind, args)
            for method, r in results.items():
                print(_row(n, kind, method, r, results.get("naive")), flush=True)
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
