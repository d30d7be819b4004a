"""What every section of ``bench/gpu.py`` shares: sizes and budgets, timing and memory
measurement, one case's error capture, the benchmark models and their FLOP counts."""

from __future__ import annotations

import functools
import gc
import time
import traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

QWEN_05B = dict(vocab=151_936, hidden=896, inter=4864, layers=24, heads=14, kv_heads=2)
QWEN_15B = dict(vocab=151_936, hidden=1536, inter=8960, layers=28, heads=12, kv_heads=2)
SIZES = {
    "gpu": dict(
        model=QWEN_05B,
        mfu=dict(batch=4, seq=4096, prompt=256, warmup=2, reps=5),
        loss=dict(n=16_384, hidden=896, vocab=151_936, warmup=1, reps=3),
        rollout=dict(batch=64, prompt=128, new=256, warmup=1, reps=2, static=True),
        qwen_15b=QWEN_15B,
        train=dict(student="model", teacher="qwen_15b", tokenizer_ids=151_665, batch=16, prompt=128, new=512,
                   micro_batch=8, steps=20, methods=("opd", "gkd")),
    ),
    "cpu": dict(
        model=dict(vocab=512, hidden=64, inter=128, layers=2, heads=4, kv_heads=2),
        mfu=dict(batch=2, seq=64, prompt=16, warmup=1, reps=2),
        loss=dict(n=64, hidden=32, vocab=512, warmup=1, reps=2),
        rollout=dict(batch=4, prompt=8, new=8, warmup=1, reps=2, static=False),
        teacher=dict(vocab=512, hidden=96, inter=192, layers=2, heads=4, kv_heads=2),
        train=dict(student="model", teacher="teacher", tokenizer_ids=500, batch=4, prompt=8, new=8,
                   micro_batch=2, steps=3, methods=("opd", "gkd")),
        # a correctness check, not a guard of device time: a CPU shared with other work (a test
        # suite beside an experiment) ran a 3-step training out of the GPU budget's 60 s
        budget_scale=4.0,
    ),
}
BUDGET_S = {"loss": 90.0, "mfu": 45.0, "rollout": 85.0, "train": 150.0, "total": 340.0}


def budgets_s(size: dict) -> dict:
    """:data:`BUDGET_S` for ``size`` (times its ``budget_scale``, if any)."""
    return {name: seconds * size.get("budget_scale", 1.0) for name, seconds in BUDGET_S.items()}
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
             ("H800", 989.4e12), ("A100", 312e12))  # dense bf16 FLOP/s by device-name substring
NAIVE_BYTES_PER_LOGIT = 48  # ~12 float32 [N, V] tensors live at the naive JSD's peak
PAD, EOS, BETA, GIB = 0, 1, 0.5, 2**30
log = functools.partial(print, flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:  # seconds
        return self.end - time.perf_counter()


def elapsed_s(fn, device: torch.device) -> float:
    """Seconds of one ``fn()``: CUDA events on the GPU, the host clock on the CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def timed(fn, device, warmup: int, reps: int, budget: Budget) -> list[float]:
    """Seconds of each timed ``fn()`` after ``warmup`` calls; stops early when out of budget."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out: list[float] = []
    for _ in range(reps):
        if out and budget.left() < 1.5 * out[-1]:
            break
        out.append(elapsed_s(fn, device))
    return out


def peak_extra_bytes(fn, device: torch.device):
    """Peak allocated memory during ``fn()`` above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        return fn()  # None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()  # a no-op where CUDA was never initialized


def attempt(name: str, fn) -> dict:
    """``fn()``, or ``{"error", "traceback"}`` (one case failing, e.g. OOM, must not hide the others)."""
    try:
        r = fn()
    except Exception as e:  # noqa: BLE001
        r = {"error": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc()[-1500:]}
    log(f"  {name}: { {k: v for k, v in r.items() if k != 'traceback'} }")
    return r


def build_model(arch: dict, dtype: torch.dtype, device: torch.device, family: str = "qwen2"):
    """A randomly initialized Qwen2 causal LM of the given shape, made on ``device``; with
    ``family="llama"``, the Llama architecture at the same shape with q/k/v/o biases."""
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=arch["vocab"], hidden_size=arch["hidden"], intermediate_size=arch["inter"],
            num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"], num_key_value_heads=arch["kv_heads"],
            tie_word_embeddings=True, max_position_embeddings=32_768, attention_bias=True, rope_theta=1e6,
            pad_token_id=PAD, eos_token_id=EOS,
        )  # fmt: skip
        torch.manual_seed(0)
        with device:
            return LlamaForCausalLM(cfg).to(dtype)
    cfg = Qwen2Config(
        vocab_size=arch["vocab"], hidden_size=arch["hidden"], intermediate_size=arch["inter"],
        num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
        num_key_value_heads=arch["kv_heads"], tie_word_embeddings=True, max_position_embeddings=32_768,
        pad_token_id=PAD, eos_token_id=EOS,
    )  # fmt: skip
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype)



def step_flops(n_nonembed: int, arch: dict, batch: int, seq: int, completion: int) -> dict:
    """Model FLOPs of one forward+backward (module doc): dense, attention, head, total."""
    d, L, V = arch["hidden"], arch["layers"], arch["vocab"]
    dense, attention, head = 6 * n_nonembed * batch * seq, 6 * L * d * seq**2 * batch, 6 * batch * completion * V * d
    return {"dense": dense, "attention": attention, "head": head, "total": dense + attention + head}


def peak_flops(device: torch.device):
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None), name


def non_embedding_params(arch: dict, o_bias: bool = True) -> int:
    """Parameters outside the (tied) embedding of the train section's models (Qwen2's shape
    and q/k/v biases, plus an o bias unless ``o_bias=False``: Qwen2 itself), from the shape."""
    d, f, L = arch["hidden"], arch["inter"], arch["layers"]
    kv = d // arch["heads"] * arch["kv_heads"]
    attn = d * d + d + 2 * (d * kv + kv) + d * d + (d if o_bias else 0)  # q, k, v (+biases), o
    return L * (attn + 3 * d * f + 2 * d) + d
