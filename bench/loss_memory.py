"""Peak extra memory and time: every divergence and method statistic, naive full logits vs opd's chunked form.

Not a test. At V = 151,936 (Qwen's vocabulary), N token positions, hidden size H, each case
runs in a fresh subprocess (float32, CPU), once with the naive form and once with the form
opd's methods use. Both sides get the same inputs, allocated before measuring: the student's
hidden states ``h [N, H]`` and head ``W [V, H]`` (requiring grad) and the teacher as hidden
states and a head (a model teacher: what ``Scores`` carries; the naive side makes its
``[N, V]`` logits, the lean side one chunk at a time).

Cases (the naive form is what a user would write with full logits; ``fwd+bwd`` unless said):

- ``fkl``, ``rkl``, ``jsd0.5``, ``jsd0.9``: ``divergence(h W^T, floored_logp_V(t))`` vs
  ``chunked_divergence_loss(..., teacher_floor=-100)`` (GKD, MiniLLM, SKD, TRD, OPSD, TIP's loss;
  the teacher's log-prob floor, GKD's, applied per chunk in the same pass);
- ``rkl_clip``: OPSD's per-entry clip (``entry_clip=0.05``);
- ``ref_kl``: StableOPD's reverse KL to the reference, unfloored, at loss temperature 2;
- ``topk8``: a top-8 teacher support inside ``divergence`` (``support="teacher_topk"``);
- ``support8``: top-K LSM / EOPD: the teacher's top-8 support with ties (``tied_topk_mask``,
  a ``[N, V]`` mask) and the divergence renormalized on it, vs ``teacher_support_BTK`` (ids
  ``[N, K']``) and ``support_divergence_BTK`` (student logits gathered per chunk);
- ``sparse_tail``: a server teacher's top-8 ids and log-probs with the tail bucket
  (``sparse_divergence`` on the full logits vs ``chunked_sparse_divergence``);
- ``tip_stats`` (no grad): TIP's signal, the student's entropy and its reverse KL to the
  teacher, vs ``token_logp_and_stats`` and ``chunked_divergence`` under ``no_grad``;
- ``student_stats`` (no grad): the frozen student's entropy and top-8 ids (DASD's router,
  Prune-OPD's and suffix fade's candidates, the loop's ``diag/``), vs ``token_logp_and_stats``;
- ``overlap8`` (no grad): Prune-OPD's tied top-8 overlap of the student's ids with the
  teacher's, vs :func:`opd.methods.full_vocab.per_position`;
- ``cand8`` (no grad): suffix fade's teacher log-probs at the student's top-8 ids, likewise;
- ``token_logp``: sampled-token log-probs (OPD, GRPO, ...), ``log_softmax(h W^T)[y]`` vs
  ``token_logp`` (:mod:`opd.losses.selective`).

"Peak extra" is the process's peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs`` once the inputs exist) minus its resident memory at that point:
everything the case allocates, including ``h.grad`` and ``W.grad`` (``V·H`` floats, the same
on both sides). Time: one run, wall clock, page faults included on both sides. ``load1``: the
1-minute load average after the case (compare times only between rows of similar load).

    python bench/loss_memory.py                       # N=1024, H=256, every case (~7 min on 2 cores)
    python bench/loss_memory.py --quick               # N=512, H=128 (~3 min)
    python bench/loss_memory.py --n 4096 --hidden 1024 --cases jsd0.5 support8

Target (issue 14): the lean form's peak extra memory at most 1/8 of the naive form's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from opd.losses import chunked_sparse_divergence, divergence, sparse_divergence
from opd.losses.chunked import chunked_divergence, chunked_divergence_loss, default_chunk_size
from opd.losses.selective import token_logp, token_logp_and_stats
from opd.methods.base import StudentView
from opd.methods.full_vocab import per_position, support_divergence_BTK, teacher_support_BTK
from opd.methods.topk_lsm import support_divergence
from opd.signals.teacher_logp import TEACHER_LOGP_FLOOR, Head, floored_logp_V
from opd.signals.prune import tied_topk_overlap_BT
from opd.signals.suffix_fade import candidate_logp_BTK
from opd.signals.topk_lsm import teacher_support
from procmem import available_mib, reset_peak, status_kib  # bench/procmem.py

FLOOR = TEACHER_LOGP_FLOOR
DIVERGENCES = {
    "fkl": dict(kind="fkl"), "rkl": dict(kind="rkl"), "jsd0.5": dict(kind="jsd", beta=0.5),
    "jsd0.9": dict(kind="jsd", beta=0.9), "rkl_clip": dict(kind="rkl", entry_clip=0.05),
    "ref_kl": dict(kind="rkl", temperature=2.0), "topk8": dict(kind="rkl", support="teacher_topk", k=8),
}
FLOORS = {"ref_kl": None}  # StableOPD's reference KL: the reference's log-probs as they are
STATS = ("tip_stats", "student_stats", "overlap8", "cand8")  # no gradient
CASES = (*DIVERGENCES, "support8", "sparse_tail", *STATS, "token_logp")
NAIVE_TENSORS = {"jsd0.5": 10, "jsd0.9": 10, "support8": 10, "topk8": 8}  # ~[N, V] float32 tensors live at the naive peak


def inputs(n: int, hidden: int, vocab: int):
    torch.manual_seed(0)
    h = torch.randn(n, hidden, requires_grad=True)
    W = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_()
    th, tW = torch.randn(n, hidden), torch.randn(vocab, hidden) * (3.0 / hidden**0.5)
    ids = torch.randint(0, vocab, (n,))
    return h, W, th, tW, ids, torch.full((n,), 1.0 / n)


def _student_ids(n: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, 8), generator=torch.Generator().manual_seed(1))


def _sparse_teacher(th, tW):
    """A server teacher's top-8 ids and log-probs (made before measuring, a few positions at a time)."""
    parts = [floored_logp_V(th[i : i + 64] @ tW.T).topk(8, -1) for i in range(0, th.shape[0], 64)]
    return torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts])


def naive_stats(case: str, h, W, th, tW, ids) -> float:
    """The no-gradient statistics from the full ``[N, V]`` logits."""
    logits = h @ W.T
    if case == "tip_stats":
        lp = logits.log_softmax(-1)
        return float(-(lp.exp() * lp).sum(-1).sum() + divergence(logits, floored_logp_V(th @ tW.T), "rkl").sum())
    if case == "student_stats":
        lp = logits.log_softmax(-1)
        return float(-(lp.exp() * lp).sum(-1).sum() + lp.topk(8, -1).indices.sum())
    t = th @ tW.T
    if case == "overlap8":
        return float(tied_topk_overlap_BT(_student_ids(h.shape[0], W.shape[0]), floored_logp_V(t)).sum())
    return float(candidate_logp_BTK(t, _student_ids(h.shape[0], W.shape[0])).sum())


def lean_stats(case: str, h, W, th, tW, ids, chunk: int) -> float:
    if case == "tip_stats":
        _, entropy, _ = token_logp_and_stats(h, W, ids, topk=0, chunk_size=chunk)
        return float(entropy.sum() + chunked_divergence(h, W, (th, tW), "rkl", chunk_size=chunk, teacher_floor=FLOOR).sum())
    if case == "student_stats":
        _, entropy, top = token_logp_and_stats(h, W, ids, topk=8, chunk_size=chunk)
        return float(entropy.sum() + top.sum())
    signal = {"teacher_hidden_BTH": th[None], "teacher_head": Head(tW, None)}
    if case == "overlap8":
        return float(per_position(signal, lambda t_CV, s_CK: tied_topk_overlap_BT(s_CK, t_CV), _student_ids(h.shape[0], W.shape[0])[None]).sum())
    return float(per_position(signal, candidate_logp_BTK, _student_ids(h.shape[0], W.shape[0])[None], floored=False).sum())


def naive(case: str, h, W, th, tW, ids, w, sparse=None) -> float:
    if case in STATS:
        with torch.no_grad():
            return naive_stats(case, h, W, th, tW, ids)
    if case in DIVERGENCES:
        t = th @ tW.T
        t = floored_logp_V(t) if FLOORS.get(case, FLOOR) is not None else t
        loss = (divergence(h @ W.T, t, **DIVERGENCES[case]) * w).sum()
    elif case == "support8":
        t_logp = floored_logp_V(th @ tW.T)
        support = teacher_support(t_logp, 8)
        loss = (support_divergence(h @ W.T, t_logp, support, "rkl") * w).sum()
    elif case == "sparse_tail":
        loss = (sparse_divergence(h @ W.T, *sparse, "rkl", tail_bucket=True) * w).sum()
    else:
        loss = -(torch.log_softmax(h @ W.T, -1).gather(-1, ids[:, None]).squeeze(-1) * w).sum()
    loss.backward()
    return float(loss)


def lean(case: str, h, W, th, tW, ids, w, chunk: int, sparse=None) -> float:
    if case in STATS:
        with torch.no_grad():
            return lean_stats(case, h, W, th, tW, ids, chunk)
    if case in DIVERGENCES:
        loss, _ = chunked_divergence_loss(h, W, (th, tW), weights_N=w, chunk_size=chunk, teacher_floor=FLOORS.get(case, FLOOR),
                                          **DIVERGENCES[case])
    elif case == "support8":
        signal = {"teacher_hidden_BTH": th[None], "teacher_head": Head(tW, None)}
        ids_BTK, logp_BTK = teacher_support_BTK(signal, (1, h.shape[0]), 8, chunk_size=chunk)
        head = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        head.weight = torch.nn.Parameter(W)  # the same leaf: W gets the gradient
        view = StudentView.from_hidden(h[None], head, ids[None], chunk_size=chunk)
        loss = (support_divergence_BTK(view, ids_BTK, logp_BTK, "rkl")[0] * w).sum()
    elif case == "sparse_tail":
        loss = (chunked_sparse_divergence(h, W, *sparse, "rkl", tail_bucket=True, chunk_size=chunk) * w).sum()
    else:
        loss = -(token_logp(h, W, ids, chunk_size=chunk) * w).sum()
    loss.backward()
    return float(loss)


def run_case(side: str, case: str, n: int, hidden: int, vocab: int, chunk: int) -> dict:
    args = inputs(n, hidden, vocab)
    sparse = _sparse_teacher(args[2], args[3]) if case == "sparse_tail" else None
    need = NAIVE_TENSORS.get(case, 6) * n * vocab * 4 / 2**20
    if side == "naive" and need > available_mib() - 1024:
        return {"skipped": f"needs ~{need / 1024:.1f} GiB, {available_mib() / 1024:.1f} GiB available"}
    base_kib, exact = status_kib("VmRSS:"), reset_peak()
    base_kib = base_kib if exact else status_kib("VmHWM:")
    t0 = time.perf_counter()
    value = naive(case, *args, sparse=sparse) if side == "naive" else lean(case, *args, chunk=chunk, sparse=sparse)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "extra_mib": (status_kib("VmHWM:") - base_kib) / 1024, "value": value}


def child(side: str, case: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{side}:{case}", "--n", str(args.n), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--chunk", str(args.chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), load=os.getloadavg()[0])


def row(case: str, naive_r: dict, lean_r: dict) -> str:
    if "extra_mib" not in naive_r or "extra_mib" not in lean_r:
        bad = naive_r if "extra_mib" not in naive_r else lean_r
        return f"{case:>10}  {bad.get('error') or 'skipped: ' + bad['skipped']}"
    ratio = lean_r["extra_mib"] / naive_r["extra_mib"]
    agree = abs(lean_r["value"] - naive_r["value"]) / max(abs(naive_r["value"]), 1e-30)
    return (f"{case:>10} {naive_r['extra_mib']:>10.0f} {lean_r['extra_mib']:>9.0f} {ratio:>8.3f} {'yes' if ratio <= 1 / 8 else 'no':>6}"
            f" {naive_r['seconds']:>8.2f} {lean_r['seconds']:>7.2f} {lean_r['seconds'] / naive_r['seconds']:>6.2f}"
            f" {max(naive_r['load'], lean_r['load']):>6.1f} {agree:>9.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1024, help="token positions")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--chunk", type=int, default=0, help="positions per chunk (0: the library's default)")
    p.add_argument("--quick", action="store_true", help="N=512, H=128 (about 3 minutes on 2 cores)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.n, args.hidden = 512, 128
    args.chunk = args.chunk or default_chunk_size(args.vocab)
    if args.child:
        side, case = args.child.split(":")
        print(json.dumps(run_case(side, case, args.n, args.hidden, args.vocab, args.chunk)))
        return
    print(f"V={args.vocab} N={args.n} H={args.hidden} chunk={args.chunk} float32 threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()}; extra = peak resident memory above the inputs (MiB)")
    print(f"{'case':>10} {'naive_MiB':>10} {'lean_MiB':>9} {'ratio':>8} {'<=1/8':>6} {'naive_s':>8} {'lean_s':>7} {'t_rat':>6}"
          f" {'load1':>6} {'rel_diff':>9}")
    start = time.perf_counter()
    for case in args.cases:
        print(row(case, child("naive", case, args), child("lean", case, args)), flush=True)
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
