"""Where the lean JSD loss spends its time on a GPU: its per-chunk kernel and its chunk size,
against Liger-Kernel's fused linear JSD (one process, every side printed).

    PYTHONPATH=src python bench/gpu_loss_probe.py [--size gpu|cpu] [--out FILE]

History. The first H200 run of bench/gpu.sh measured the lean fused loss at 2.1x Liger's time
(N=16,384, H=896, V=151,936, bf16) and the student update at 12% MFU. This probe's first run
(commit cec9b72, docs/performance/gpu_loss_probe_h200.json) found a third of that in a float32
``dW`` matmul, since made from bf16 inputs (1.75x faster, _after.json). What was left: the
per-chunk elementwise passes (about thirty over ``[C, V]`` float32) and their launches.

Now the cases are the two chunk kernels of :mod:`opd.losses.chunked`: ``eager`` (the in-place
passes) and ``compiled`` (:mod:`opd.losses.fused_chunk` through ``torch.compile``), each at
chunks of 1, 4 and 16 times the CPU default (110 positions at V=151,936), with the error of
their ``h`` and ``W`` gradients against the first case and each one's first call (which, for
``compiled``, compiles); Liger; the profiler's top kernels of each kernel at the device's
default chunk. Then the MFU section's step (the 0.5B model, 4 x 4,096 tokens): eager and
compiled at the device default, the fastest case, and without head and loss
(``decoder_only``: the decoder's share; its "MFU" still counts the head's FLOPs, so it is an
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
from gpu_common import BETA, GIB, SIZES, Budget, build_model, elapsed_s, log, peak_extra_bytes, peak_flops, step_flops, timed  # noqa: E402
from opd.models.hf import completion_hidden  # noqa: E402

KERNELS = ("eager", "compiled")


def loss_inputs(cfg: dict, device, dtype):
    n, H, V = cfg["n"], cfg["hidden"], cfg["vocab"]
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, H, generator=g, device=device, dtype=dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g, device=device, dtype=torch.float32) / H**0.5).requires_grad_()
    th = torch.randn(n, H, generator=g, device=device, dtype=dtype)
    tW = torch.randn(V, H, generator=g, device=device, dtype=dtype) * (2.0 / H**0.5)
    return h, W, th, tW, torch.full((n,), 1.0 / n, device=device)


def one_case(inputs, kernel: str, chunk: int | None, device, cfg, budget) -> dict:
    """First-call s, ms (median), peak extra GiB and the gradients of one lean-fused call
    (float32 master W)."""
    h, W, th, tW, w = inputs

    def step():
        h.grad = W.grad = None
        with torch.autocast(device.type, dtype=h.dtype, enabled=device.type == "cuda"):
            loss, _ = chunked.chunked_divergence_loss(h, W, (th, tW), "jsd", w, beta=BETA, chunk_size=chunk, kernel=kernel)
        loss.backward()

    first_s = elapsed_s(step, device)
    secs = timed(step, device, cfg["warmup"], cfg["reps"], budget)
    peak = peak_extra_bytes(step, device)
    return {"first_call_s": first_s, "ms": statistics.median(secs) * 1e3,
            "peak_extra_gib": None if peak is None else peak / GIB,
            "grads": (h.grad.float().clone(), W.grad.float().clone())}  # fmt: skip


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sweep(cfg: dict, device, dtype, budget: Budget) -> dict:
    inputs = loss_inputs(cfg, device, dtype)
    default = chunked.default_chunk_size(cfg["vocab"])  # the CPU default: 110 at V=151,936
    rows, ref = {}, None
    for name in KERNELS:
        for mult in (1, 4, 16):
            key = f"{name}/chunk{default * mult}"
            try:
                r = one_case(inputs, name, default * mult, device, cfg, budget)
            except Exception as e:  # noqa: BLE001 (a compiler may be missing: recorded)
                rows[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
                log(f"  {key}: {rows[key]['error']}")
                continue
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


def profile_default(cfg: dict, device, dtype, kernel: str) -> list:
    """The profiler's top 15 kernels (CUDA time) of one lean-fused call at the default chunk
    (after a first call: a compile is not profiled)."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    h, W, th, tW, w = loss_inputs(cfg, device, dtype)

    def step():
        with torch.autocast("cuda", dtype=dtype):
            loss, _ = chunked.chunked_divergence_loss(h, W, (th, tW), "jsd", w, beta=BETA, kernel=kernel)
        loss.backward()
        torch.cuda.synchronize()

    step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0.0))
    return [{"name": e.key[:90], "calls": e.count, "device_ms": getattr(e, "device_time_total", 0.0) / 1e3,
             "cpu_ms": e.cpu_time_total / 1e3} for e in events[:15]]  # fmt: skip


def mfu_steps(size: dict, device, dtype, budget: Budget, variants: list) -> dict:
    """The MFU section's update (a bf16 model, as bench/gpu.py's) with each ``(kernel, chunk)``
    variant."""
    arch, cfg = size["model"], size["mfu"]
    model = build_model(arch, dtype, device).train()
    batch, teacher_NV, w_N = mfu_batch(cfg, arch["vocab"], device, dtype)
    W = model.get_output_embeddings().weight
    n_nonembed = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    flops = step_flops(n_nonembed, arch, cfg["batch"], cfg["seq"], cfg["seq"] - cfg["prompt"])["total"]
    peak, _ = peak_flops(device)
    out = {"flops": flops, "dtype": str(dtype)}
    for name, chunk in variants:

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            h_BTH = completion_hidden(model, batch)
            if name == "decoder_only":  # no head, no loss: the decoder's share of the step
                loss = h_BTH.float().square().mean()
            else:
                loss, _ = chunked.chunked_divergence_loss(h_BTH, W, teacher_NV, "jsd", w_N, beta=BETA, chunk_size=chunk,
                                                          kernel=name)  # fmt: skip
            loss.backward()

        try:
            secs = statistics.median(timed(fwd_bwd, device, cfg["warmup"], cfg["reps"], budget))
            out[f"{name}/chunk{chunk}"] = {"ms": secs * 1e3, "mfu": None if peak is None else flops / secs / peak}
        except Exception as e:  # noqa: BLE001
            out[f"{name}/chunk{chunk}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        log(f"  mfu {name}/chunk{chunk}: {out[f'{name}/chunk{chunk}']}")
    return out


def best_variant(cases: dict) -> tuple[str, int]:
    timed_ok = {k: v for k, v in cases.items() if "ms" in v and "/" in k}
    key = min(timed_ok, key=lambda k: timed_ok[k]["ms"])
    name, chunk = key.split("/chunk")
    return name, int(chunk)


def attempt_list(fn) -> list:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (recorded; the rest still runs)
        return [{"error": f"{type(e).__name__}: {e}"[:300]}]


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
    for kernel in KERNELS:
        res[f"profile_{kernel}"] = rows = attempt_list(lambda: profile_default(size["loss"], device, dtype, kernel))
        log(f"== profile, {kernel}")
        for row in rows:
            log(f"  {row}")
    best = best_variant(res["loss"]["cases"])
    new = res["loss"]["device_default_chunk"]
    log(f"== mfu step: eager and compiled at chunk {new}, and the fastest case, {best[0]}/chunk{best[1]}")
    variants = [("eager", new), ("compiled", new)] + ([best] if best[1] != new else []) + [("decoder_only", 0)]
    res["mfu"] = mfu_steps(size, device, dtype, budget, variants)
    res["total_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    log(f"wrote {args.out} after {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
