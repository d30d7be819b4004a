"""Scaling of one training update: step time and peak memory as rollouts grow longer and
the vocabulary grows larger, the lean student view vs the eager full-logits one.

    python bench/scaling.py                         # both sweeps, OPD, lean vs naive
    python bench/scaling.py --methods opd gkd       # plus GKD (a full-vocabulary loss)
    python bench/scaling.py --sweeps vocab --vocabs 32768 151936 --repeat 3
    python bench/scaling.py --out /tmp/scaling.png --threads 2

What is timed: ``opd.run.loop.update`` itself (the loop's real path: micro-batch student
forward, ``method.loss``, backward, the student ``diag/`` statistics, gradient clipping,
one AdamW step), for OPD (``opd`` defaults: importance-sampling loss on
``view.logp_BT`` only) and optionally GKD (JSD over the full vocabulary, so it reads
``view.logits_BTV``). Each method runs in two modes on identical inputs:

- ``lean``: ``update(..., lean=True)``, the default: the student view holds the
  completion hidden states and the LM head; ``logp_BT`` is made chunk by chunk
  (``opd.losses.selective.token_logp``), the diag statistics too; the full
  ``[B, T, V]`` logits only when a loss reads them;
- ``naive``: ``update(..., lean=False)``: the full logits and ``log_softmax(logits).gather``
  for every micro-batch (the path before the lean view).

Sweeps (random-init Llama-shaped students, float32, all completion tokens real, one
micro-batch per update unless ``--micro-batch``):

1. ``length``: the testbed-shaped student (``opd.testbed.STUDENT_ARCH``, the testbed
   vocabulary) with ``--batch`` rows, prompt ``--prompt-len`` and completions of
   ``--lengths`` tokens (64 -> 1024, doubling);
2. ``vocab``: the same architecture with vocabularies ``--vocabs`` (1k -> 152k),
   ``--vocab-batch`` rows of ``--vocab-len`` tokens.

Inputs (the experience, the teacher's top-K and token log-probs, GKD's teacher logits)
exist before measuring, and so does AdamW's state (one step on zero gradients: no
weight changes). Each case (sweep point, method, mode) runs in a fresh process (forked
from this one after imports, before any torch computation).

- ``peak`` (MiB): the process's peak resident memory during its first update
  (``VmHWM``, reset through ``/proc/self/clear_refs`` just before) minus its resident
  memory at that point: everything one update allocates, gradients included. The first
  update, because memory freed by an earlier one stays resident and hides later peaks.
- ``act`` (MiB): the same peak but only up to the optimizer step (read by a step
  pre-hook), minus the size of the parameter gradients (``[V, H]`` and the rest, which
  any path must hold): the working memory of forward, backward and the diag statistics.
  (AdamW's step itself needs temporaries of the parameters' size, in both modes.)
- ``s``: the fastest of ``--repeat`` further updates, wall clock (the minimum is the
  least disturbed by other processes). ``cpu``: the least CPU time (user + system, all
  threads) of one of them; with ``--threads 1`` a steadier measure than the wall clock
  on a loaded machine (with more threads, OpenMP's spin-waiting inflates it there).
- slopes: least-squares fits of log(y) on log(x) over a sweep (1 = linear).
- ``load1``: the highest 1-minute load average seen after a case: on a shared machine,
  compare times only between rows run under similar load.

Cost of the default run (22 cases, 4 updates each): 7 min wall on 2 cores shared with a
load average of ~9; the length sweep alone took 33 s with ``--threads 1`` under that
load, the 152k-vocabulary cases are the largest (about 5 s of CPU per naive update).
Expect 1-3 min on 2 quiet cores.
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing
import os
import resource
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd.batch import make_batch
from opd.methods import build_method
from opd.methods.base import Experience
from opd.models.base import Scores
from opd.testbed.builder import STUDENT_ARCH
from opd.run.loop import make_optimizer, update
from procmem import reset_peak as _reset_peak, status_kib as _status_kib  # bench/procmem.py

MODES = ("lean", "naive")
COLUMNS = {"seconds": (7, 3), "cpu_s": (8, 3), "peak_mib": (9, 1), "act_mib": (8, 1)}  # width, decimals of the lean column
QWEN_VOCAB = 151_936
TOPK = 8


# ---------------------------------------------------------------- one case (in a child)


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _model(vocab: int, max_len: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=max_len, num_key_value_heads=STUDENT_ARCH["num_attention_heads"],
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, **STUDENT_ARCH)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _inputs(method_name: str, vocab: int, B: int, P: int, T: int):
    """The experience (all T completion tokens real), the teacher's scores, the signal."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, vocab, (B, P), generator=g).tolist()
    completions = torch.randint(3, vocab, (B, T), generator=g).tolist()
    batch = make_batch(prompts, completions, pad_id=0)
    sampler_BT = -torch.rand(B, T, generator=g) * 3
    exp = Experience(batch=batch, problems=[None] * B, group_B=torch.arange(B), sampler_logp_BT=sampler_BT)
    top_lp_BTK = (-torch.rand(B, T, TOPK, generator=g) * 5).sort(-1, descending=True).values
    top_ids_BTK = torch.randint(0, vocab, (B, T, TOPK), generator=g)
    full_BTV = torch.randn(B, T, vocab, generator=g) * 2 if method_name == "gkd" else None
    scores = Scores(-torch.rand(B, T, generator=g) * 3, torch.rand(B, T, generator=g), top_ids_BTK, top_lp_BTK, full_BTV)
    method = build_method(method_name, {"lmbda": 1.0})
    return exp, scores, method, method.signal(exp, scores)


def _init_optimizer_state(model, opt) -> None:
    """Allocate AdamW's state with one step on zero gradients (no weight changes: the
    moments stay 0, the update is 0/(0+eps), weight decay is 0)."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_case(case: dict) -> dict:
    """Peak memory of the first update (optimizer state made before), then the least
    time of ``case["repeat"]`` further updates."""
    torch.set_num_threads(case["threads"])
    B, P, T, V, mode = case["batch"], case["prompt_len"], case["length"], case["vocab"], case["mode"]
    model = _model(V, P + T)
    exp, scores, method, signal = _inputs(case["method"], V, B, P, T)
    opt = make_optimizer(model, lr=1e-5, weight_decay=0.0)
    kw = dict(micro_batch_size=case["micro_batch"] or B, max_grad_norm=1.0, scores=scores, lean=mode == "lean")
    _init_optimizer_state(model, opt)
    gc.collect()
    grad_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    before_step_kib = []
    hook = opt.register_step_pre_hook(lambda *_: before_step_kib.append(_status_kib("VmHWM:")))
    base_kib, exact = _status_kib("VmRSS:"), _reset_peak()
    base_kib = base_kib if exact else _status_kib("VmHWM:")
    metrics = update(model, opt, exp, signal, method, **kw)
    peak_mib = (_status_kib("VmHWM:") - base_kib) / 2**10
    act_mib = (before_step_kib[0] - base_kib) / 2**10 - grad_mib
    hook.remove()
    seconds, cpu = [], []
    for _ in range(case["repeat"]):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        update(model, opt, exp, signal, method, **kw)
        seconds.append(time.perf_counter() - t0)
        cpu.append(_cpu_seconds() - c0)
    return {"seconds": min(seconds, default=float("nan")), "cpu_s": min(cpu, default=float("nan")),
            "peak_mib": peak_mib, "act_mib": act_mib, "entropy": metrics.get("diag/student_entropy", float("nan"))}


def _child(case: dict, conn) -> None:
    try:
        conn.send(run_case(case))
    except Exception as err:  # reported in the table, the sweep goes on
        conn.send({"error": f"{type(err).__name__}: {err}"})
    conn.close()


def measure(case: dict) -> dict:
    """``run_case`` in a fresh forked process (no earlier allocation distorts its peak)."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(case, send))
    proc.start()
    send.close()
    try:
        out = recv.recv()
    except EOFError:
        out = {"error": "the case's process died (out of memory?)"}
    proc.join()
    return dict(out, load=os.getloadavg()[0])


# ---------------------------------------------------------------- sweeps, fits, output


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` on ``log x`` (nan with fewer than 2 usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else float("nan")


def _fmt(r: dict, key: str, spec: str) -> str:
    return format(r[key], spec) if key in r else "—"


def _ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / b[key]:.2f}" if key in a and key in b and b[key] > 0 else "—"


def run_sweep(name: str, xs: list[int], base: dict, args) -> dict:
    """All (x, method, mode) cases of a sweep; prints one row per (x, method)."""
    key = "length" if name == "length" else "vocab"
    print(f"\n[{name} sweep] {' '.join(f'{k}={v}' for k, v in base.items() if k != key)} ({key} varies)")
    print(f"{key:>7} {'method':>6} {'lean_s':>7} {'naive_s':>8} {'ratio':>5} | {'lean_cpu':>8} {'naive_cpu':>9} {'ratio':>5} |"
          f" {'lean_peak':>9} {'naive_peak':>10} {'ratio':>5} | {'lean_act':>8} {'naive_act':>9} {'ratio':>5} | {'load1':>5}"
          f"  entropy lean/naive")
    out = {}
    for x in xs:
        for method in args.methods:
            res = {mode: measure(dict(base, **{key: x}, method=method, mode=mode)) for mode in MODES}
            out[(x, method)] = res
            lean, naive = res["lean"], res["naive"]
            errors = [f"{m}: {r['error']}" for m, r in res.items() if "error" in r]
            parts = [f"{_fmt(lean, k, f'{w}.{d}f')} {_fmt(naive, k, f'{w + 1}.{d}f')} {_ratio(lean, naive, k):>5}"
                     for k, (w, d) in COLUMNS.items()]
            print(f"{x:>7} {method:>6} {' | '.join(parts)} | {max(lean['load'], naive['load']):>5.1f}"
                  f"  {_fmt(lean, 'entropy', '.5f')}/{_fmt(naive, 'entropy', '.5f')} {'; '.join(errors)}", flush=True)
    return out


def fits(results: dict, xs: list[int], methods: list[str]) -> dict:
    """``{(method, mode): {metric: slope}}`` over one sweep."""
    out = {}
    for method in methods:
        for mode in MODES:
            rows = [results[(x, method)][mode] for x in xs]
            out[(method, mode)] = {m: slope(xs, [r.get(m) for r in rows]) for m in ("seconds", "cpu_s", "peak_mib", "act_mib")}
    return out


def print_fits(name: str, slopes: dict) -> None:
    print(f"fitted growth exponents over the {name} sweep (log-log least squares; 1 = linear):")
    for (method, mode), s in slopes.items():
        print(f"  {method:>4} {mode:>5}: time {s['seconds']:5.2f}   cpu time {s['cpu_s']:5.2f}   peak memory {s['peak_mib']:5.2f}"
              f"   act (working memory before the step) {s['act_mib']:5.2f}")


def plot(sweeps: dict, methods: list[str], out: Path) -> None:
    """One row per sweep: time, peak memory and working memory against x, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sweeps), 3, figsize=(15, 4.2 * len(sweeps)), squeeze=False)
    labels = {"seconds": "time of one update (s)", "peak_mib": "peak extra memory (MiB)",
              "act_mib": "forward+backward memory beyond gradients (MiB)"}
    for row, (name, (xs, results, slopes)) in zip(axes, sweeps.items()):
        for ax, metric in zip(row, labels):
            for method in methods:
                for mode in MODES:
                    ys = [results[(x, method)][mode].get(metric, float("nan")) for x in xs]
                    s = slopes[(method, mode)][metric]
                    ax.plot(xs, ys, "o-" if mode == "lean" else "s--", label=f"{method} {mode} (slope {s:.2f})")
            ax.set(xscale="log", yscale="log", xlabel="completion tokens T" if name == "length" else "vocabulary V", ylabel=labels[metric])
            ax.set_title(f"{name} sweep: {labels[metric].split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"plot written to {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweeps", nargs="+", default=["length", "vocab"], choices=["length", "vocab"])
    p.add_argument("--methods", nargs="+", default=["opd"], choices=["opd", "gkd"])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--batch", type=int, default=8, help="rows of the length sweep")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--length-vocab", type=int, default=0, help="vocabulary of the length sweep (0: the testbed's)")
    p.add_argument("--vocabs", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, QWEN_VOCAB])
    p.add_argument("--vocab-batch", type=int, default=4, help="rows of the vocab sweep")
    p.add_argument("--vocab-len", type=int, default=128, help="completion tokens per row in the vocab sweep")
    p.add_argument("--micro-batch", type=int, default=0, help="rows per micro-batch (0: all rows at once)")
    p.add_argument("--repeat", type=int, default=3, help="timed updates per case after the measured first one (fastest)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scaling.png")
    args = p.parse_args()
    if args.length_vocab == 0:
        from opd.testbed.tokenizer import build_tokenizer

        args.length_vocab = len(build_tokenizer())
    common = dict(prompt_len=args.prompt_len, micro_batch=args.micro_batch, repeat=args.repeat, threads=args.threads)
    print(f"torch {torch.__version__}, threads={args.threads}, cpus={os.cpu_count()}, float32, student arch {STUDENT_ARCH}, "
          f"repeat={args.repeat} (+1 measuring memory), methods={args.methods}; ratios are lean/naive")
    start, sweeps = time.perf_counter(), {}
    plan = {"length": (args.lengths, dict(common, batch=args.batch, vocab=args.length_vocab)),
            "vocab": (args.vocabs, dict(common, batch=args.vocab_batch, length=args.vocab_len))}
    for name in args.sweeps:
        xs, base = plan[name]
        results = run_sweep(name, xs, base, args)
        slopes = fits(results, xs, args.methods)
        print_fits(name, slopes)
        sweeps[name] = (xs, results, slopes)
    plot(sweeps, args.methods, args.out)
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
