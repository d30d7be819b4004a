"""Where the lean JSD loss spends its time on a GPU, and what its chunk size and the
precision of its ``dW`` matmul cost (one process, every side printed, ratios against
Liger-Kernel's fused linear JSD and against the current default).

    PYTHONPATH=src python bench/gpu_loss_probe.py [--size gpu|cpu] [--out FILE]

bench/gpu.sh measured the lean fused loss at 2.1x Liger's time (N=16,384, H=896, V=151,936,
bf16) and the student update at 12% MFU. Three candidate causes, each measured here:

- ``dW`` in float32: ``_accumulate`` computes ``g_W += G^T h`` with ``h`` cast to float32, a
  float32 matmul of ``2·N·V·H`` FLOPs (no tensor cores). Variants: ``bf16`` (the product in
  bf16, float32 accumulation inside the GEMM, each chunk's partial rounded to bf16 and added to
  the float32 accumulator: what Liger does) and ``mm_f32`` (``torch.mm(..., out_dtype=float32)``:
  bf16 inputs, a float32 partial; CUDA only).
- the chunk size: the default holds ``2**24`` logits (110 rows at V=151,936); 4x and 16x.
- the per-chunk elementwise math: the profiler's top kernels for the default.

Then the MFU section's step (the 0.5B model, 4 x 4,096 tokens) with the default and the best
variant, and without the head and loss (``decoder_only``: the decoder's share; its MFU counts
the head's FLOPs too, so it is an upper bound, not a comparable MFU). Writes JSON (``--out``); the error of each variant's ``h`` and ``W`` gradients
against the current code is in it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import opd.losses.chunked as chunked  # noqa: E402
from gpu import loss_methods, mfu_batch  # noqa: E402
from gpu_common import BETA, GIB, SIZES, Budget, build_model, log, peak_extra_bytes, peak_flops, step_flops, timed  # noqa: E402
from opd.models.hf import completion_hidden  # noqa: E402

CURRENT = chunked._accumulate


def accumulate_bf16(grad_CV, h_CH, w_VH, grads, lo, hi):
    """``g_W += G^T h`` as a product in the hidden's dtype, rounded, added in float32."""
    g_h, g_w, g_b = grads
    g_lp = grad_CV.to(w_VH.dtype)
    if g_h is not None:
        torch.mm(g_lp, w_VH, out=g_h[lo:hi])
    if g_w is not None:
        g_w.add_(torch.mm(g_lp.t(), h_CH.to(w_VH.dtype)))
    if g_b is not None:
        g_b.add_(grad_CV.sum(0))


def accumulate_mm_f32(grad_CV, h_CH, w_VH, grads, lo, hi):
    """``g_W += G^T h`` from bf16 inputs with a float32 product (``out_dtype``)."""
    g_h, g_w, g_b = grads
    g_lp = grad_CV.to(w_VH.dtype)
    if g_h is not None:
        torch.mm(g_lp, w_VH, out=g_h[lo:hi])
    if g_w is not None:
        g_w.add_(torch.mm(g_lp.t(), h_CH.to(w_VH.dtype), out_dtype=g_w.dtype))
    if g_b is not None:
        g_b.add_(grad_CV.sum(0))


VARIANTS = {"current": CURRENT, "bf16": accumulate_bf16, "mm_f32": accumulate_mm_f32}


def loss_inputs(cfg: dict, device, dtype):
    n, H, V = cfg["n"], cfg["hidden"], cfg["vocab"]
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, H, generator=g, device=device, dtype=dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g, device=device, dtype=torch.float32) / H**0.5).requires_grad_()
    th = torch.randn(n, H, generator=g, device=device, dtype=dtype)
    tW = torch.randn(V, H, generator=g, device=device, dtype=dtype) * (2.0 / H**0.5)
    return h, W, th, tW, torch.full((n,), 1.0 / n, device=device)


def one_case(inputs, chunk: int | None, device, cfg, budget) -> dict:
    """ms (median), peak extra GiB and the gradients of one lean-fused call (float32 master W)."""
    h, W, th, tW, w = inputs

    def step():
        h.grad = W.grad = None
        with torch.autocast(device.type, dtype=h.dtype, enabled=device.type == "cuda"):
            loss, _ = chunked.chunked_divergence_loss(h, W, (th, tW), "jsd", w, beta=BETA, chunk_size=chunk)
        loss.backward()

    secs = timed(step, device, cfg["warmup"], cfg["reps"], budget)
    peak = peak_extra_bytes(step, device)
    return {"ms": statistics.median(secs) * 1e3, "peak_extra_gib": None if peak is None else peak / GIB,
            "grads": (h.grad.float().clone(), W.grad.float().clone())}  # fmt: skip


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sweep(cfg: dict, device, dtype, budget: Budget) -> dict:
    inputs = loss_inputs(cfg, device, dtype)
    default = chunked.default_chunk_size(cfg["vocab"])
    rows, ref = {}, None
    for name, fn in VARIANTS.items():
        for mult in (1, 4, 16):
            chunked._accumulate = fn
            key = f"{name}/chunk{default * mult}"
            try:
                r = one_case(inputs, default * mult, device, cfg, budget)
            except Exception as e:  # noqa: BLE001 (out_dtype may be missing: recorded)
                rows[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
                log(f"  {key}: {rows[key]['error']}")
                continue
            finally:
                chunked._accumulate = CURRENT
            ref = ref or r["grads"]
            gh, gw = r.pop("grads")
            rows[key] = r | {"grad_h_rel_err": rel(gh, ref[0]), "grad_W_rel_err": rel(gw, ref[1])}
            log(f"  {key}: {rows[key]}")
    liger = loss_methods(device, {}).get("liger")
    if liger is not None:
        h, W, th, tW, w = inputs
        Wb = W.detach().to(dtype).requires_grad_()

        def liger_step():
            h.grad = Wb.grad = None
            liger(h, Wb, th, tW, w).backward()

        rows["liger"] = {"ms": statistics.median(timed(liger_step, device, cfg["warmup"], cfg["reps"], budget)) * 1e3,
                         "peak_extra_gib": (peak_extra_bytes(liger_step, device) or 0) / GIB}  # fmt: skip
        log(f"  liger: {rows['liger']}")
    return {"default_chunk": default, "cases": rows}


def profile_default(cfg: dict, device, dtype) -> list:
    """The profiler's top 15 kernels (CUDA time) of one default lean-fused call."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    h, W, th, tW, w = loss_inputs(cfg, device, dtype)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=dtype):
            loss, _ = chunked.chunked_divergence_loss(h, W, (th, tW), "jsd", w, beta=BETA)
        loss.backward()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0.0))
    return [{"name": e.key[:90], "calls": e.count, "device_ms": getattr(e, "device_time_total", 0.0) / 1e3,
             "cpu_ms": e.cpu_time_total / 1e3} for e in events[:15]]  # fmt: skip


def mfu_steps(size: dict, device, dtype, budget: Budget, variants: list) -> dict:
    """The MFU section's update (a bf16 model, as bench/gpu.py's) with each ``(accumulate,
    chunk)`` variant."""
    arch, cfg = size["model"], size["mfu"]
    model = build_model(arch, dtype, device).train()
    batch, teacher_NV, w_N = mfu_batch(cfg, arch["vocab"], device, dtype)
    W = model.get_output_embeddings().weight
    n_nonembed = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    flops = step_flops(n_nonembed, arch, cfg["batch"], cfg["seq"], cfg["seq"] - cfg["prompt"])["total"]
    peak, _ = peak_flops(device)
    out = {"flops": flops, "dtype": str(dtype)}
    for name, chunk in variants:
        chunked._accumulate = VARIANTS.get(name, CURRENT)

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            h_BTH = completion_hidden(model, batch)
            if name == "decoder_only":  # no head, no loss: the decoder's share of the step
                loss = h_BTH.float().square().mean()
            else:
                loss, _ = chunked.chunked_divergence_loss(h_BTH, W, teacher_NV, "jsd", w_N, beta=BETA, chunk_size=chunk)
            loss.backward()

        try:
            secs = statistics.median(timed(fwd_bwd, device, cfg["warmup"], cfg["reps"], budget))
            out[f"{name}/chunk{chunk}"] = {"ms": secs * 1e3, "mfu": None if peak is None else flops / secs / peak}
        except Exception as e:  # noqa: BLE001
            out[f"{name}/chunk{chunk}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            chunked._accumulate = CURRENT
        log(f"  mfu {name}/chunk{chunk}: {out[f'{name}/chunk{chunk}']}")
    return out


def best_variant(cases: dict) -> tuple[str, int]:
    timed_ok = {k: v for k, v in cases.items() if "ms" in v and "/" in k}
    key = min(timed_ok, key=lambda k: timed_ok[k]["ms"])
    name, chunk = key.split("/chunk")
    return name, int(chunk)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=sorted(SIZES), default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/results/gpu_loss_probe.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size, budget = SIZES[args.size], Budget(240.0)
    t0 = time.perf_counter()
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    log("== loss sweep")
    res["loss"] = sweep(size["loss"], device, dtype, budget)
    res["profile_default"] = profile_default(size["loss"], device, dtype)
    for row in res["profile_default"]:
        log(f"  {row}")
    best = best_variant(res["loss"]["cases"])
    default = res["loss"]["default_chunk"]
    log(f"== mfu step: current/chunk{default} against {best[0]}/chunk{best[1]}")
    res["mfu"] = mfu_steps(size, device, dtype, budget, [("current", default), best, ("decoder_only", 0)])
    res["total_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    log(f"wrote {args.out} after {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
