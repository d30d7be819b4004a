"""Teacher scoring: the plain padded full-logits pass vs opd's lean scoring, time and memory.

    python bench/teacher_scoring.py                     # V in {32000, 151936}, both cases
    python bench/teacher_scoring.py --vocabs 32000 --repeat 3 --threads 2
    python bench/teacher_scoring.py --methods naive lean lean-1bucket full
    python bench/teacher_scoring.py --hidden 512 --layers 8   # a decoder-heavier teacher

Not a test. The teacher is a randomly initialized causal LM (Llama-shaped for V=32,000,
Qwen2-shaped for V=151,936; d=256, 4 layers by default) saved to disk and loaded with
``from_pretrained``, float32 on CPU. Its scores (log-prob of the given tokens, entropy,
top-8) of one :class:`opd.batch.SeqBatch` with uneven lengths (prompts of 32..128 tokens):

- ``uniform``: B rows, completion lengths drawn from 16..Lmax;
- ``skewed``: one row of Lmax completion tokens, the others drawn from 16..64.

(B, Lmax) = (16, 512) at V=32k and (8, 256) at V=152k, so that the plain pass's
``[B, T, V]`` tensors fit in memory (``--batch``/``--max-len`` override both).

Methods, all under ``torch.no_grad`` on the same model, batch, dtype and threads:

- ``naive``: what ``HFTeacher.score`` did before: the decoder over the padded batch, the
  LM head on every completion column (``[B, T, V]`` float32), ``log_softmax`` of it, the
  gather, ``-(exp(logp)·logp).sum`` for the entropy, ``topk``.
- ``lean``: ``HFTeacher.score`` (:func:`opd.models.scoring.lean_scores`): packed
  length buckets, the head on kept positions only, chunk by chunk.
- ``lean-1bucket``: the same with one packed decoder call (no length bucketing): what
  the head-on-kept-positions part alone gives.
- ``full``: ``HFTeacher.score(full=True)`` (methods that need the logits): the padded pass
  and the ``[B, T, V]`` logits, scores computed from them in chunks.

Each (case, method) runs in a fresh subprocess: model and batch are loaded, one warm-up
call on a 2-row batch, then ``/proc/self/clear_refs`` resets the peak; "peak extra" is
``VmHWM`` after the first timed call minus ``VmRSS`` before it (all it allocates: decoder
activations, logits, outputs). Time: wall clock of the call, median of ``--repeat``
calls in that process. ``check`` is the sum of the kept positions' token log-probs (the
same across methods up to float rounding; ``tests/test_scoring.py`` checks equality).
``load1``: the 1-minute load average after the case; compare times only under similar
load. The default run should take about 3-4 minutes on 2 quiet cores (~280 s of CPU
time; it took 12 minutes at a load average of 8-10).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from transformers.utils import logging as hf_logging

from opd.batch import make_batch
from opd.models.hf import HFTeacher, completion_logits
from procmem import available_mib as _available_mib, reset_peak as _reset_peak, status_kib as _status_kib  # bench/procmem.py

METHODS = ("naive", "lean", "lean-1bucket", "full")
CASES = ("uniform", "skewed")
SHAPES = {32000: (16, 512), 151936: (8, 256)}  # vocab -> (rows, longest completion)
TOPK, PAD, EOS = 8, 0, 1


def save_teacher(folder: str, vocab: int, hidden: int, layers: int) -> None:
    """A random teacher, Llama-shaped (V=32k) or Qwen2-shaped (other V), saved to ``folder``."""
    arch = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                num_key_value_heads=max(1, hidden // 128), max_position_embeddings=1024,
                pad_token_id=PAD, eos_token_id=EOS, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**arch)) if vocab == 32000 else Qwen2ForCausalLM(Qwen2Config(**arch))
    model.save_pretrained(folder)


def lengths(case: str, rows: int, max_len: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(prompt lengths, completion lengths) of a case."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(32, 129, (rows,), generator=g).tolist()
    if case == "uniform":
        comps = torch.randint(16, max_len + 1, (rows,), generator=g).tolist()
    else:
        comps = [max_len] + torch.randint(16, 65, (rows - 1,), generator=g).tolist()
    return prompts, comps


def build_batch(case: str, rows: int, max_len: int, vocab: int, seed: int = 0):
    p_lens, c_lens = lengths(case, rows, max_len, seed)
    g = torch.Generator().manual_seed(seed + 1)
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in p_lens]
    comps = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in c_lens]
    return make_batch(prompts, comps, PAD)


@torch.no_grad()
def naive_score(model, batch, topk: int = TOPK, temperature: float = 1.0):
    """The plain pass (``HFTeacher.score`` before the lean path), full [B, T, V] tensors."""
    logits_BTV = completion_logits(model, batch)
    logp_BTV = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    token_BT = logp_BTV.gather(-1, batch.completion_ids_BT.unsqueeze(-1)).squeeze(-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).nan_to_num().sum(-1)
    topk_logp_BTK, topk_ids_BTK = logp_BTV.topk(min(topk, logp_BTV.shape[-1]), dim=-1)
    return token_BT, entropy_BT, topk_ids_BTK, topk_logp_BTK


def scorer(method: str, model):
    """``batch -> token log-probs [B, T]`` running ``method``'s whole scoring pass."""
    if method == "naive":
        return lambda batch: naive_score(model, batch)[0]
    one_bucket = dict(bucket_tokens=1 << 40, call_cost=1 << 40) if method == "lean-1bucket" else {}
    teacher = HFTeacher(model, eos_id=EOS, pad_id=PAD, **one_bucket)
    return lambda batch: teacher.score(batch, topk=TOPK, full=method == "full").token_logp_BT


def naive_estimate_mib(rows: int, width: int, vocab: int) -> float:
    """The plain pass holds ~4 float32 [B, T, V] tensors (logits, logp, exp, product)."""
    return 4.2 * rows * width * vocab * 4 / 2**20


def run_case(method: str, case: str, vocab: int, args) -> dict:
    torch.set_num_threads(args.threads)
    rows, max_len = args.batch or SHAPES[vocab][0], args.max_len or SHAPES[vocab][1]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(args.models, str(vocab))).eval()
    batch = build_batch(case, rows, max_len, vocab)
    T = batch.completion_mask_BT.shape[1]
    need, have = naive_estimate_mib(rows, T, vocab), _available_mib() - 1024
    if method in ("naive", "full") and (need if method == "naive" else need / 4) > have:
        return {"skipped": f"needs ~{need / 1024:.1f} GiB, {have / 1024:.1f} GiB available"}
    score = scorer(method, model)
    score(build_batch(case, 2, 16, vocab, seed=1))  # warm-up
    base_kib, exact = _status_kib("VmRSS:"), _reset_peak()
    base_kib = base_kib if exact else _status_kib("VmHWM:")
    times, check, peak_kib = [], None, 0
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        token_BT = score(batch)
        times.append(time.perf_counter() - t0)
        if check is None:  # the first timed call sets the peak
            peak_kib = _status_kib("VmHWM:")
            check = float(token_BT[batch.completion_mask_BT].double().sum())
        del token_BT
    return {"seconds": statistics.median(times), "extra_mib": (peak_kib - base_kib) / 1024, "check": check,
            "T": T, "kept": batch.num_tokens}


def _child(method: str, case: str, vocab: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{method}:{case}:{vocab}", "--models", args.models,
           "--threads", str(args.threads), "--repeat", str(args.repeat),
           "--batch", str(args.batch), "--max-len", str(args.max_len)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), load=os.getloadavg()[0])


def _row(vocab: int, case: str, method: str, r: dict, ref: dict | None) -> str:
    head = f"{vocab:>7} {case:>8} {method:>13}"
    if "extra_mib" not in r:
        return f"{head}  {r.get('error') or 'skipped: ' + r['skipped']}"
    has_ref = ref is not None and "extra_mib" in ref
    mem_ratio = r["extra_mib"] / ref["extra_mib"] if has_ref else float("nan")
    time_ratio = r["seconds"] / ref["seconds"] if has_ref else float("nan")
    return (f"{head} {r['T']:>5} {r['kept']:>6} {r['extra_mib']:>10.0f} {r['seconds']:>8.2f}"
            f" {mem_ratio:>9.3f} {time_ratio:>8.3f} {r['load']:>6.1f} {r['check']:>14.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocabs", type=int, nargs="+", default=list(SHAPES))
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--methods", nargs="+", default=["naive", "lean", "lean-1bucket"], choices=METHODS)
    p.add_argument("--batch", type=int, default=0, help="rows (0: per-vocab default)")
    p.add_argument("--max-len", type=int, default=0, help="longest completion (0: per-vocab default)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=1, help="timed calls per case (median)")
    p.add_argument("--models", default="", help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    hf_logging.disable_progress_bar()
    if args.child:
        method, case, vocab = args.child.split(":")
        print(json.dumps(run_case(method, case, int(vocab), args)))
        return
    print(f"torch {torch.__version__} float32 threads={args.threads} cpus={os.cpu_count()} d={args.hidden} "
          f"layers={args.layers} top-K={TOPK} repeat={args.repeat}")
    print(f"{'V':>7} {'case':>8} {'method':>13} {'T':>5} {'kept':>6} {'extra_MiB':>10} {'time_s':>8}"
          f" {'mem/naive':>9} {'t/naive':>8} {'load1':>6} {'check':>14}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as models:
        args.models = models
        for vocab in args.vocabs:
            save_teacher(os.path.join(models, str(vocab)), vocab, args.hidden, args.layers)
            rows, max_len = args.batch or SHAPES[vocab][0], args.max_len or SHAPES[vocab][1]
            for case in args.cases:
                print(f"# V={vocab} {case}: B={rows} completions {lengths(case, rows, max_len)[1]}", flush=True)
                results = {m: _child(m, case, vocab, args) for m in args.methods}
                for method, r in results.items():
                    print(_row(vocab, case, method, r, results.get("naive")), flush=True)
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
