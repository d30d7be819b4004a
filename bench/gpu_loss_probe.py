"""Where the lean JSD loss spends its time on a GPU: the precision of its ``dW`` product and
its chunk size, against Liger-Kernel's fused linear JSD (one process, every side printed).

    PYTHONPATH=src python bench/gpu_loss_probe.py [--size gpu|cpu] [--out FILE]

The first H200 run of bench/gpu.sh measured the lean fused loss at 2.1x Liger's time (N=16,384,
H=896, V=151,936, bf16) and the student update at 12% MFU. The first run of this probe (commit
cec9b72, docs/performance/gpu_loss_probe_h200.json) found a third of the loss's time in one
float32 matmul: ``g_W += G^T h`` with ``h`` cast up (no tensor cores). The library now makes that
product from bf16 inputs in float32 (``out_dtype``) on a GPU, in chunks of 2**26 logits.

Cases: ``f32`` (the old product, re-implemented here) and ``library`` (the code as it is), each
at chunks of 1, 4 and 16 times the CPU default (110 positions at V=151,936), with the error of
their ``h`` and ``W`` gradients against the first case; Liger; the profiler's top kernels of the
library at its default chunk on this device. Then the MFU section's step (the 0.5B model, 4 x 4,096 tokens):
before (``f32``, 110), now (``library``, the GPU default), the fastest case, and without head and
loss (``decoder_only``: the decoder's share; its "MFU" still counts the head's FLOPs, so it is an
upper bound, not a comparable MFU). Writes JSON (``--out``).
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

LIBRARY = chunked._accumulate


def accumulate_f32(grad_CV, h_CH, w_VH, grads, lo, hi):
    """What ``_accumulate`` did before: ``g_W += G^T h`` with ``h`` cast up to a float32 matmul."""
    g_h, g_w, g_b = grads
    if g_h is not None:
        torch.mm(grad_CV.to(w_VH.dtype), w_VH, out=g_h[lo:hi])
    if g_w is not None:
        g_w.addmm_(grad_CV.t(), h_CH.to(g_w.dtype))
    if g_b is not None:
        g_b.add_(grad_CV.sum(0))


VARIANTS = {"f32": accumulate_f32, "library": LIBRARY}


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
    default = chunked.default_chunk_size(cfg["vocab"])  # the CPU default: 110 at V=151,936
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
                chunked._accumulate = LIBRARY
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
    return {"cpu_default_chunk": default, "device_default_chunk": chunked.default_chunk_size(cfg["vocab"], device),
            "cases": rows}


def profile_default(cfg: dict, device, dtype) -> list:
    """The profiler's top 15 kernels (CUDA time) of one lean-fused call at the default chunk."""
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
        chunked._accumulate = VARIANTS.get(name, LIBRARY)

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
            chunked._accumulate = LIBRARY
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
    old, new = res["loss"]["cpu_default_chunk"], res["loss"]["device_default_chunk"]
    log(f"== mfu step: f32/chunk{old} (before) against library/chunk{new} (now) and {best[0]}/chunk{best[1]}")
    res["mfu"] = mfu_steps(size, device, dtype, budget, [("f32", old), ("library", new), best, ("decoder_only", 0)])
    res["total_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    log(f"wrote {args.out} after {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
