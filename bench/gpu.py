"""GPU benchmark: student-update MFU, memory-lean loss vs naive (and Liger), sampler vs generate.

    bash bench/gpu.sh                                    # the GPU machine: JSON to $OUT/gpu_results.json
    python bench/gpu.py --size gpu --out results.json    # the same, by hand (needs CUDA)
    python bench/gpu.py --size cpu --out results.json    # tiny sizes, any machine (make bench-gpu)

Not a test. Four sections (``loss``, ``mfu``, ``rollout``, ``train``: the last in ``gpu_train.py``; what
they share in ``gpu_common.py``) in one process; a failing one records
``error`` and ``traceback`` beside what it had filled, and the others still run; each keeps to its
budget (``BUDGET_S``, four times it at ``--size cpu``; parts that would overrun are skipped, saying so), so the GPU run stays under
8 minutes on one H100/H200. The JSON is rewritten after each section and on SIGTERM.

Model: Qwen2.5-0.5B's shape (hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV heads,
V = 151,936, tied embeddings), random init, bf16 on the GPU (float32 on the CPU), default SDPA
attention (causal, no mask: its flash kernel), no gradient checkpointing. ``cpu`` size: tiny.

1. ``mfu``: opd's student update: ``completion_hidden`` over ``[prompt 256 | completion]`` rows
   of S = 4096 tokens, ``chunked_divergence_loss`` (JSD, beta 0.5, weights ``1/(B*T)``) of those
   hidden states through the LM head against fixed random bf16 teacher logits ``[B*T, V]`` (as a
   teacher's scoring pass hands them over), ``backward``; ``AdamW.step`` timed apart. FLOPs of
   one forward+backward (6ND, attention and LM head apart; P_ne: non-embedding parameters)::

       F = 6 * P_ne * B * S  +  6 * L * d * S^2 * B  +  6 * B * T * V * d
           dense layers          attention: 12*L*d*S^2     LM head on the T = S - 256
                                 per row, causal: /2       completion positions

   MFU = F / median(fwd+bwd time) / peak dense bf16 FLOP/s (``PEAK_BF16``: H100 SXM and H200
   989.4e12; null on the CPU or an unknown device). ``mfu_with_optimizer`` adds the AdamW step;
   the measured rate of an 8192^3 bf16 matmul is recorded beside it, as a practical ceiling.
2. ``loss``: JSD (beta 0.5, mean over tokens) of student ``h W^T`` vs teacher ``h_t W_t^T``,
   N = 16,384, H = 896, V = 151,936, bf16 inputs, float32 softmax math, forward+backward
   w.r.t. ``h`` and ``W``: ``naive`` (full ``[N, V]`` logits, bench/loss_memory.py's naive
   math), opd's ``lean-fused`` (``chunked_divergence_loss`` with its default chunk kernel:
   compiled on a GPU, its compile in the warm-up), ``lean-eager`` (the same with
   ``kernel="eager"``, GPU only) and ``lean-recompute`` (``chunked_divergence``), and
   ``liger`` (``LigerFusedLinearJSD``, its defaults) when
   ``liger_kernel`` imports. Time: median of CUDA-event timings after a warm-up. Memory:
   ``max_memory_allocated`` minus what was allocated before (grads included; null on the CPU).
   Naive is skipped where its estimate exceeds the free memory. Losses and ``h.grad`` are
   compared across methods (relative differences recorded).
3. ``rollout``: opd's ``sample`` (its default: the decode step replayed as a CUDA graph; and
   ``opd_sampler_dynamic``, the eager step, to show what the graph buys) vs ``model.generate`` (default dynamic cache; on the GPU also
   ``cache_implementation="static"``, its compiling first call timed apart), same model, batch
   64, 128-token prompts, 256 new tokens, temperature 1, top-p 1, no EOS: generated tokens/s
   (median after a warm-up) and the ratio. ``greedy_agreement``: fraction of equal tokens of
   greedy ``sample`` vs greedy ``generate`` on 4 rows (1.0 expected in float32; bf16 near-ties
   may differ; a low value means the sampler does not compute what generate does).

4. ``train``: ``python -m opd train`` itself, 20 OPD steps and 20 GKD steps (each in its own
   subprocess, stopped by SIGTERM if it would overrun its half of the section's budget), bf16,
   ``device=cuda``: a student of the 0.5B shape above and a teacher of Qwen2.5-1.5B's shape
   (hidden 1536, 28 layers, 12 heads, 2 KV heads), Llama architecture with q/k/v/o biases
   (see ``train_files`` for why not Qwen2's class), both saved with ``save_pretrained`` and loaded from disk,
   a word-level tokenizer of 151,665 ids under their 151,936-row heads (as Qwen2.5's), batch
   16 x (128 prompt + 512 new tokens), micro-batches of 8. From the run's metrics.jsonl
   (medians over the steps after the first): the split sampling (``time/rollout_s`` minus
   ``time/score_s``) / teacher scoring / update, completion tokens/s of the whole step, the update's MFU (the ``mfu``
   section's FLOP formula at the rollouts' mean length) and ``memory/peak_gib``.

``summary``: the issue's GPU targets, as ratios from this one run (update MFU >= 35% at 16k
tokens per step; lean loss <= 1.2x Liger's time and <= 2x its memory; sampler >= 5x default
``generate``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from opd.batch import make_batch
from opd.losses.chunked import chunked_divergence, chunked_divergence_loss
from opd.models.hf import completion_hidden
from opd.models.sampler import sample

from gpu_common import (  # bench/ is the script's directory
    BETA, GIB, NAIVE_BYTES_PER_LOGIT, PAD, SIZES, Budget, attempt, budgets_s, build_model, elapsed_s, free_memory, log,
    peak_extra_bytes, peak_flops, step_flops, timed,
)
from gpu_train import section_train

# ---------------------------------------------------------------- 1. student update MFU


def matmul_rate(device: torch.device, dtype: torch.dtype, budget: Budget):
    """FLOP/s of an 8192^3 matmul (median of 10), a practical ceiling; None on the CPU."""
    if device.type != "cuda" or budget.left() < 20:
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=dtype) for _ in range(2))
    secs = timed(lambda: a @ b, device, warmup=3, reps=10, budget=budget)
    return 2 * 8192**3 / statistics.median(secs)


def mfu_batch(cfg: dict, vocab: int, device: torch.device, dtype: torch.dtype):
    """A full ``[prompt | completion]`` SeqBatch, teacher logits ``[B*T, V]`` and weights ``[B*T]``."""
    B, P, T = cfg["batch"], cfg["prompt"], cfg["seq"] - cfg["prompt"]
    ids = torch.randint(2, vocab, (B, P + T), generator=torch.Generator().manual_seed(0)).tolist()
    b = make_batch([r[:P] for r in ids], [r[P:] for r in ids], PAD)
    b = replace(b, input_ids_BL=b.input_ids_BL.to(device), attention_mask_BL=b.attention_mask_BL.to(device),
                completion_mask_BT=b.completion_mask_BT.to(device))  # fmt: skip
    teacher_NV = torch.randn(B * T, vocab, device=device, dtype=dtype) * 2.0
    return b, teacher_NV, torch.full((B * T,), 1.0 / (B * T), device=device)


def section_mfu(size: dict, device, dtype, budget: Budget, out: dict) -> None:
    arch, cfg = size["model"], size["mfu"]
    model = build_model(arch, dtype, device).train()
    batch, teacher_NV, w_N = mfu_batch(cfg, arch["vocab"], device, dtype)
    W = model.get_output_embeddings().weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        h_BTH = completion_hidden(model, batch)
        loss, _ = chunked_divergence_loss(h_BTH, W, teacher_NV, "jsd", w_N, beta=BETA)
        loss.backward()

    opt.zero_grad(set_to_none=True)
    peak_mem = peak_extra_bytes(fwd_bwd, device)  # first call: activations + grads, no optimizer state yet
    fwd_bwd_s, opt_s = [], []
    for i in range(cfg["warmup"] + cfg["reps"]):
        if fwd_bwd_s and budget.left() < 3 * (fwd_bwd_s[-1] + opt_s[-1]):
            break
        t = elapsed_s(fwd_bwd, device)
        t_opt = elapsed_s(opt.step, device)
        if i >= cfg["warmup"]:
            fwd_bwd_s.append(t), opt_s.append(t_opt)
        log(f"  mfu step {i}: fwd+bwd {t * 1e3:.1f} ms, optimizer {t_opt * 1e3:.1f} ms")
    n_nonembed = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    flops = step_flops(n_nonembed, arch, cfg["batch"], cfg["seq"], cfg["seq"] - cfg["prompt"])
    t, t_opt = statistics.median(fwd_bwd_s), statistics.median(opt_s)
    peak, device_name = peak_flops(device)
    mm = matmul_rate(device, dtype, budget)
    out.update({
        "arch": arch, "batch": cfg["batch"], "seq": cfg["seq"], "prompt": cfg["prompt"],
        "dtype": str(dtype), "attn_implementation": model.config._attn_implementation,
        "params": sum(p.numel() for p in model.parameters()), "params_nonembed": n_nonembed,
        "flops_per_step": flops, "fwd_bwd_ms": t * 1e3, "fwd_bwd_ms_all": [x * 1e3 for x in fwd_bwd_s],
        "optimizer_ms": t_opt * 1e3, "tokens_per_s": cfg["batch"] * cfg["seq"] / t,
        "achieved_flops_per_s": flops["total"] / t, "device": device_name, "peak_flops_per_s": peak,
        "mfu": None if peak is None else flops["total"] / t / peak,
        "mfu_with_optimizer": None if peak is None else flops["total"] / (t + t_opt) / peak,
        "matmul_8192_flops_per_s": mm, "fraction_of_matmul_rate": None if mm is None else flops["total"] / t / mm,
        "peak_extra_gib_first_step": None if peak_mem is None else peak_mem / GIB,
    })  # fmt: skip


# ---------------------------------------------------------------- 2. loss: naive vs lean vs Liger


def naive_jsd_loss(h, W, th, tW) -> torch.Tensor:
    """Mean over tokens of the JSD from full ``[N, V]`` logits (float32 softmax math)."""
    lp_s = F.log_softmax((h @ W.T).float(), dim=-1)
    lp_t = F.log_softmax((th @ tW.T).float(), dim=-1)
    lp_m = torch.logaddexp(lp_t + math.log(BETA), lp_s + math.log1p(-BETA))
    kl_t = (lp_t.exp() * (lp_t - lp_m)).sum(-1)
    kl_s = (lp_s.exp() * (lp_s - lp_m)).sum(-1)
    return (BETA * kl_t + (1 - BETA) * kl_s).mean()


def loss_methods(device, out: dict) -> dict:
    """name -> fn(h, W, th, tW, w_N) returning the scalar loss (mean over tokens)."""
    methods = {
        "lean-fused": lambda h, W, th, tW, w: chunked_divergence_loss(h, W, (th, tW), "jsd", w, beta=BETA)[0],
        "lean-recompute": lambda h, W, th, tW, w: (chunked_divergence(h, W, (th, tW), "jsd", beta=BETA) * w).sum(),
    }
    if device.type == "cuda":  # on the CPU, compiling would take most of the section's seconds
        methods["lean-eager"] = lambda h, W, th, tW, w: chunked_divergence_loss(h, W, (th, tW), "jsd", w, beta=BETA,
                                                                                 kernel="eager")[0]  # fmt: skip
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD

            liger = LigerFusedLinearJSD(jsd_beta=BETA)
            methods["liger"] = lambda h, W, th, tW, w: liger(h, W, th, tW, None)
        except Exception as e:  # noqa: BLE001 (absent or broken: recorded, the rest still runs)
            out["liger_unavailable"] = f"{type(e).__name__}: {e}"[:500]
    methods["naive"] = lambda h, W, th, tW, w: naive_jsd_loss(h, W, th, tW)
    return methods


def naive_skip_reason(n: int, hidden: int, vocab: int, device) -> str | None:
    """Why the naive case cannot run on this GPU (None: it fits; the cpu size is tiny)."""
    if device.type != "cuda":
        return None
    need, have = NAIVE_BYTES_PER_LOGIT * n * vocab + 4 * vocab * hidden, torch.cuda.mem_get_info(device)[0] * 0.95
    return None if need <= have else f"skipped: needs ~{need / GIB:.1f} GiB, {have / GIB:.1f} GiB free"


def run_loss_method(fn, inputs, device, cfg, budget: Budget, grads: dict, name: str) -> dict:
    """Timings, peak memory and loss of ``fn``; its ``h.grad`` goes to ``grads[name]``."""
    h, W, th, tW, w = inputs
    state = {}

    def step():
        h.grad = W.grad = None
        loss = fn(h, W, th, tW, w)
        loss.backward()
        state["loss"] = float(loss.detach())

    secs = timed(step, device, cfg["warmup"], cfg["reps"], budget)
    h.grad = W.grad = None
    peak = peak_extra_bytes(step, device)
    grads[name] = h.grad.detach().float().clone()
    return {"ms": statistics.median(secs) * 1e3, "ms_all": [s * 1e3 for s in secs],
            "peak_extra_gib": None if peak is None else peak / GIB, "loss": state["loss"]}  # fmt: skip


def section_loss(size: dict, device, dtype, budget: Budget, out: dict) -> None:
    cfg = size["loss"]
    n, H, V = cfg["n"], cfg["hidden"], cfg["vocab"]
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, H, generator=g, device=device, dtype=dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g, device=device, dtype=dtype) / H**0.5).requires_grad_()
    th = torch.randn(n, H, generator=g, device=device, dtype=dtype)
    tW = torch.randn(V, H, generator=g, device=device, dtype=dtype) * (2.0 / H**0.5)
    inputs = (h, W, th, tW, torch.full((n,), 1.0 / n, device=device))
    out.update(n=n, hidden=H, vocab=V, dtype=str(dtype), beta=BETA, methods={})
    grads = {}
    for name, fn in loss_methods(device, out).items():
        free_memory()
        skip = naive_skip_reason(n, H, V, device) if name == "naive" else None
        skip = skip or (f"skipped: {budget.left():.0f} s of the budget left" if budget.left() < 10 else None)
        run = lambda: run_loss_method(fn, inputs, device, cfg, budget, grads, name)  # noqa: E731
        out["methods"][name] = attempt(f"loss {name}", (lambda: {"skipped": skip}) if skip else run)
    h.grad = W.grad = None
    _compare_loss_methods(out["methods"], grads)


def _compare_loss_methods(results: dict, grads: dict) -> None:
    """Relative loss and ``h.grad`` differences against naive (else lean-fused)."""
    ref = "naive" if "naive" in grads else "lean-fused"
    if ref not in grads:
        return
    for name, g in grads.items():
        r = results[name]
        r["compared_to"] = ref
        r["loss_rel_diff"] = abs(r["loss"] - results[ref]["loss"]) / max(abs(results[ref]["loss"]), 1e-30)
        r["grad_h_rel_err"] = float((g - grads[ref]).norm() / grads[ref].norm().clamp_min(1e-30))


# ---------------------------------------------------------------- 3. rollout: sampler vs generate


def run_sampler(model, prompts, new: int, temperature: float = 1.0, step: str = "auto"):
    gen = torch.Generator().manual_seed(0)  # the sampler draws its uniforms on the host
    return sample(model, prompts, max_new_tokens=new, eos_id=-1, pad_id=PAD, temperature=temperature,
                  top_p=1.0, generator=gen, step=step)  # fmt: skip


@torch.no_grad()
def run_generate(model, prompts, new: int, do_sample: bool = True, **extra) -> torch.Tensor:
    """Generated ids ``[B, new]`` (prompts all of one length: no padding)."""
    ids = torch.tensor(prompts, device=model.device)
    torch.manual_seed(0)
    sampling = dict(temperature=1.0, top_p=1.0, top_k=0) if do_sample else {}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         min_new_tokens=new, do_sample=do_sample, pad_token_id=PAD, eos_token_id=None,
                         **sampling, **extra)  # fmt: skip
    return out[:, ids.shape[1] :]


def greedy_agreement(model, prompts, new: int) -> float:
    ours = run_sampler(model, prompts, new, temperature=0.0).batch.completion_ids_BT.cpu()
    theirs = run_generate(model, prompts, new, do_sample=False).cpu()
    return float((ours == theirs).float().mean()) if ours.shape == theirs.shape else 0.0


def transfers_per_token(model, prompts, new: int) -> dict:
    """Host<->device copies and host syncs per generated token in one ``sample`` call, counted
    by the profiler (``Memcpy HtoD`` / ``Memcpy DtoH`` device activities; ``aten::item`` and
    ``aten::_local_scalar_dense``, a tensor read on the host). The decode loop should add none
    per token beyond what stopping at EOS needs."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        run_sampler(model, prompts, new)
    counts: dict = {}
    for e in prof.events():
        for key in ("Memcpy HtoD", "Memcpy DtoH", "aten::_local_scalar_dense"):
            if key in e.name:
                counts[key] = counts.get(key, 0) + 1
    return {k: v / new for k, v in counts.items()} | {"new_tokens": new}


def rate(fn, n_tokens: int, device, cfg: dict, budget: Budget, compiles: bool = False) -> dict:
    """Generated tokens/s of ``fn`` (median); with ``compiles``, its first call is timed apart."""
    first_s = elapsed_s(fn, device) if compiles else None
    secs = timed(fn, device, cfg["warmup"], cfg["reps"], budget)
    return {"tokens_per_s": n_tokens / statistics.median(secs), "s_all": secs, "first_call_s": first_s}


def section_rollout(size: dict, device, dtype, budget: Budget, out: dict) -> None:
    arch, cfg = size["model"], size["rollout"]
    model = build_model(arch, dtype, device).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, arch["vocab"], (cfg["batch"], cfg["prompt"]), generator=g).tolist()  # one length
    B, new = cfg["batch"], cfg["new"]
    out.update(batch=B, prompt_len=cfg["prompt"], new_tokens=new, dtype=str(dtype), settings="T=1, top-p 1, no EOS")
    out["greedy_agreement"] = attempt("greedy", lambda: {"fraction": greedy_agreement(model, prompts[:4], 8)})
    out["transfers_per_token"] = attempt("transfers", lambda: transfers_per_token(model, prompts, min(new, 64)))
    cases = {
        "opd_sampler": (lambda: run_sampler(model, prompts, new), False),  # a CUDA graph per batch size on a GPU
        "opd_sampler_dynamic": (lambda: run_sampler(model, prompts, new, step="dynamic"), False),
        "generate_default": (lambda: run_generate(model, prompts, new), False),
    }
    if cfg["static"]:
        cases["generate_static"] = (lambda: run_generate(model, prompts, new, cache_implementation="static"), True)
    for name, (fn, compiles) in cases.items():
        if compiles and budget.left() < 90:
            out[name] = {"skipped": f"{budget.left():.0f} s of the section's budget left"}
            continue
        out[name] = attempt(name, lambda: rate(fn, B * new, device, cfg, budget, compiles))
    for key in ("generate_default", "generate_static", "opd_sampler_dynamic"):
        if "tokens_per_s" in out["opd_sampler"] and "tokens_per_s" in out.get(key, {}):
            out[f"ratio_sampler_vs_{key}"] = out["opd_sampler"]["tokens_per_s"] / out[key]["tokens_per_s"]


# ---------------------------------------------------------------- driver


SECTIONS = {"loss": section_loss, "mfu": section_mfu, "rollout": section_rollout, "train": section_train}


def meta(size_name: str, device, dtype) -> dict:
    liger = [d.version for d in metadata.distributions() if (d.name or "").lower().replace("_", "-") == "liger-kernel"]
    info = {
        "size": size_name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "budgets_s": budgets_s(SIZES[size_name]), "liger_kernel": liger[0] if liger else None,
    }  # fmt: skip
    if "cache" not in inspect.signature(transformers.Qwen2Model.forward).parameters:
        info["warning"] = "decoder has no `cache` argument: opd's sampler may run without a KV cache"
    return info


def summary(res: dict) -> dict:
    """The issue's GPU targets as ratios from this one run, each ``None`` where the numbers
    are missing: update MFU >= 35% at 16k tokens per step; the lean loss <= 1.2x Liger's time
    and <= 2x its memory; the sampler >= 5x ``generate`` with its default cache."""
    mfu = res.get("mfu", {}).get("mfu")
    methods = res.get("loss", {}).get("methods", {})
    lean, liger = methods.get("lean-fused", {}), methods.get("liger", {})
    has = "ms" in lean and "ms" in liger
    t_ratio = lean["ms"] / liger["ms"] if has else None
    m_ratio = (lean["peak_extra_gib"] / liger["peak_extra_gib"]
               if has and lean.get("peak_extra_gib") and liger.get("peak_extra_gib") else None)  # fmt: skip
    eager = methods.get("lean-eager", {})
    e_ratio = eager["ms"] / liger["ms"] if "ms" in eager and "ms" in liger else None
    s_ratio = res.get("rollout", {}).get("ratio_sampler_vs_generate_default")
    train = {m: res.get("train", {}).get(m, {}).get("tokens_per_s") for m in ("opd", "gkd")}
    out = {"mfu": mfu, "lean_vs_liger_time": t_ratio, "lean_vs_liger_memory": m_ratio, "lean_eager_vs_liger_time": e_ratio,
           "sampler_vs_generate_default": s_ratio, "train_tokens_per_s": train}  # fmt: skip
    if res["meta"]["size"] != "gpu":  # the targets are GPU targets: ratios only
        return out
    met = lambda x, ok: None if x is None else ok(x)  # noqa: E731
    return {**out, "mfu_ge_0.35": met(mfu, lambda x: x >= 0.35),
            "lean_time_le_1.2x_liger": met(t_ratio, lambda x: x <= 1.2),
            "lean_memory_le_2x_liger": met(m_ratio, lambda x: x <= 2.0),
            "sampler_ge_5x_generate": met(s_ratio, lambda x: x >= 5)}  # fmt: skip


class Stopped(BaseException):
    """SIGTERM (bench/gpu.sh's ``timeout``): the section records it, the JSON is written, the run ends."""


def _stop(signum, frame):
    raise Stopped(f"signal {signum}: stopped from outside")


def run_section(name: str, res: dict, size: dict, device, dtype, total: Budget) -> bool:
    """Run one section into ``res[name]`` (what it filled is kept on error); False once stopped."""
    seconds = min(budgets_s(size)[name], max(total.left(), 0.0))
    log(f"== {name} (budget {seconds:.0f} s)")
    t0, res[name] = time.perf_counter(), {}
    try:
        SECTIONS[name](size, device, dtype, Budget(seconds), res[name])
    except (Exception, Stopped) as e:  # noqa: BLE001 (a failing section is recorded; the others still run)
        res[name].update(error=f"{type(e).__name__}: {e}"[:1000], traceback=traceback.format_exc()[-3000:])
        log(res[name]["traceback"])
    res[name]["section_s"] = time.perf_counter() - t0
    free_memory()
    return "Stopped:" not in res[name].get("error", "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/results/gpu_results.json")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 gpu, fp32 cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _stop)
    if args.size == "gpu" and not torch.cuda.is_available():
        sys.exit("--size gpu needs CUDA; use --size cpu here")
    device = torch.device("cuda" if args.size == "gpu" else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.size == "gpu" else "float32"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"meta": meta(args.size, device, dtype)}
    log(json.dumps(res["meta"]))
    total_s = budgets_s(SIZES[args.size])["total"]
    total = Budget(total_s)
    for name in args.sections:
        go_on = run_section(name, res, size=SIZES[args.size], device=device, dtype=dtype, total=total)
        res["summary"] = summary(res)
        res["meta"]["total_s"] = total_s - total.left()
        out.write_text(json.dumps(res, indent=1, default=str))
        if not go_on:
            sys.exit(f"stopped by SIGTERM after {name}: partial results in {out}")
    log("== summary " + json.dumps(res["summary"]) + f"\nwrote {out} after {res['meta']['total_s']:.0f} s")


if __name__ == "__main__":
    main()
