"""``bench/gpu.py``'s fourth section: training steps through ``opd train`` (a real run in a
subprocess, on models saved with ``save_pretrained``), split into rollout, scoring and
update, with the update's MFU."""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

from gpu_common import Budget, attempt, build_model, free_memory, non_embedding_params, peak_flops, step_flops
# ---------------------------------------------------------------- 4. training steps through `opd train`


def save_tokenizer(path: Path, n_ids: int) -> None:
    """A word-level tokenizer of ``n_ids`` ids (``<pad>``, ``<eos>``, ``<unk>``, ``t3`` ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"t{i}" for i in range(3, n_ids)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(path)  # fmt: skip


def train_files(root: Path, size: dict, device, dtype) -> dict:
    """Student and teacher saved with ``save_pretrained`` (random weights, the tokenizer cut
    below the padded head as Qwen2.5's 151,665 ids under 151,936 rows), and a JSONL dataset
    of prompts of exactly ``prompt`` words. The models are Llama-architecture at Qwen2.5's
    shapes (with its q/k/v biases, plus an o bias): transformers 5 loads a ``qwen2``
    checkpoint's tokenizer as ``Qwen2Tokenizer``, which a word-level tokenizer.json does not
    survive (every word encodes to nothing)."""
    cfg = size["train"]
    paths = {"student": root / "student", "teacher": root / "teacher", "dataset": root / "data.jsonl"}
    for side in ("student", "teacher"):
        model = build_model(size[cfg[side]], dtype, device, family="llama")
        model.save_pretrained(paths[side])
        save_tokenizer(paths[side], cfg["tokenizer_ids"])
        del model
        free_memory()
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(3, cfg["tokenizer_ids"], (64, cfg["prompt"]), generator=g).tolist()
    paths["dataset"].write_text("".join(json.dumps({"prompt": " ".join(f"t{i}" for i in r), "answer": "t3"}) + "\n" for r in rows))
    return paths


def train_args(paths: dict, cfg: dict, method: str, run_dir: Path, device, dtype) -> list[str]:
    return [
        f"method={method}", f"student={paths['student']}", f"teacher={paths['teacher']}", f"dataset={paths['dataset']}",
        f"steps={cfg['steps']}", f"prompts_per_step={cfg['batch']}", "group_size=1", f"max_new_tokens={cfg['new']}",
        f"max_prompt_tokens={cfg['prompt']}", f"micro_batch_size={cfg['micro_batch']}", f"device={device.type}",
        f"dtype={str(dtype).removeprefix('torch.')}", "eval_size=1", "eval_k=1", "eval_every=0", "progress=false",
        "lr=1e-6", f"run_dir={run_dir}", "chat_template=off", *(["lmbda=1"] if method == "gkd" else []),
    ]  # fmt: skip


def run_train(paths: dict, cfg: dict, method: str, run_dir: Path, device, dtype, seconds: float) -> dict:
    """``python -m opd train`` in a subprocess, SIGTERM at ``seconds`` (the run checkpoints and
    stops); the per-step rows of its metrics.jsonl after the first (warm-up) step."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "opd", "train", *train_args(paths, cfg, method, run_dir, device, dtype)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text, _ = proc.communicate(timeout=max(seconds, 1.0))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
    wall = time.perf_counter() - t0
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [r for r in rows if "time/update_s" in r]
    return {"returncode": proc.returncode, "wall_s": wall, "steps": steps, "log_tail": text[-1500:]}


def train_summary(run: dict, size: dict, cfg: dict, device) -> dict:
    """Per-step medians after the first step: the split, tokens/s, the update's MFU, peak memory."""
    steps = run["steps"][1:] or run["steps"]
    if not steps:
        return {"error": f"no step finished (exit {run['returncode']})", "log_tail": run["log_tail"]}
    med = lambda key: statistics.median(r[key] for r in steps) if all(key in r for r in steps) else None  # noqa: E731
    rollout, score, update = (med(f"time/{k}_s") for k in ("rollout", "score", "update"))
    # time/rollout_s runs from sampling to the signal (teacher scoring included); score apart
    split = {"sample": None if rollout is None or score is None else rollout - score, "score": score, "update": update}
    length = med("rollout/length") or cfg["new"]
    arch = size[cfg["student"]]
    n_nonembed = non_embedding_params(arch)
    flops = step_flops(n_nonembed, arch, cfg["batch"], int(cfg["prompt"] + length), int(length))["total"]
    step_s = (rollout or 0.0) + (update or 0.0)
    peak, _ = peak_flops(device)
    return {
        "steps_done": len(run["steps"]), "steps_timed": len(steps), "wall_s": run["wall_s"], "returncode": run["returncode"],
        "split_s": split, "step_s": step_s, "completion_tokens_per_step": cfg["batch"] * length,
        "tokens_per_s": cfg["batch"] * length / step_s if step_s else None,
        "update_flops": flops, "update_mfu": None if peak is None or not split["update"] else flops / split["update"] / peak,
        "peak_memory_gib": med("memory/peak_gib"), "loss": [next((v for k, v in sorted(r.items()) if k.startswith("loss/")), None) for r in run["steps"]],
    }  # fmt: skip


def section_train(size: dict, device, dtype, budget: Budget, out: dict) -> None:
    import tempfile

    cfg = size["train"]
    out.update(student=size[cfg["student"]], teacher=size[cfg["teacher"]], batch=cfg["batch"], prompt=cfg["prompt"],
               new_tokens=cfg["new"], steps=cfg["steps"], micro_batch=cfg["micro_batch"], dtype=str(dtype))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="opd-bench-") as tmp:
        paths = train_files(Path(tmp), size, device, dtype)
        methods = cfg["methods"]
        for i, method in enumerate(methods):
            seconds = budget.left() / (len(methods) - i) - 15  # room for the SIGTERM checkpoint
            run = run_train(paths, cfg, method, Path(tmp) / f"run_{method}", device, dtype, seconds)
            out[method] = attempt(f"train {method}", lambda: train_summary(run, size, cfg, device))


