"""Rollout throughput: opd's student sampler vs ``model.generate`` of transformers.

    python bench/rollout.py [--batch 32] [--prompt-len 32] [--new-tokens 128] [--reps 3]
                            [--threads N] [--sizes tiny small]
    make bench-rollout

Same model (a randomly initialized Llama-shaped causal LM, V = 32000, saved to disk and
loaded with ``from_pretrained``), same left-padded prompts (``prompt-len/2 .. prompt-len``
tokens), same length cap and sampling settings (temperature 1, top-p 1, no EOS so both
sides generate every token), same dtype (float32) and torch threads (``--threads``,
default: all cores), for two model sizes: tiny (d=128, 2 layers) and small (d=512, 8
layers). The two sides run alternately (one warm-up each, then ``--reps`` timed runs of
each, interleaved so both see the same machine load); printed: generated tokens per
second, wall clock, median per side, and the ratio, plus the 1-minute load average.

opd's sampler takes its direct Llama-family decoder (``opd.models.fast_decode``; the
``path`` column says which decoder ran) and draws by inverse CDF instead of
``torch.multinomial``; the tokens follow the same distribution (not the same random
stream). Correctness is checked by ``tests/test_sampler.py`` (greedy equal to
``generate``; fast decoder equal to the generic HF one).

Where the speed-up is bounded: both sides do the same matrix multiplications (the
decoder's linear layers and the ``[B, d] x [d, V]`` LM head, plus attention), and those
are most of a step of a larger model. The ``matmul ms`` column times one decode step's
linear layers alone (every ``nn.Linear`` of the model once on a ``[B, in]`` input, fastest
of 5 runs; attention left out: an optimistic lower bound of any step), and
``ceiling`` = generate's time per step / that: the ratio no sampler doing the same
matmuls can exceed.

Cost (estimated): about 3-4 minutes with the defaults on 2 quiet cores, most of it
``generate`` on the small model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from opd.models.sampler import Decoder, sample

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8),
}
VOCAB, PAD, EOS = 32000, 0, 1


def load(arch: dict, folder: str):
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, pad_token_id=PAD, eos_token_id=EOS, **arch)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def prompts(batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(length // 2, length + 1, (batch,), generator=g).tolist()
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lens]


def run_opd(model, xs, new_tokens: int) -> int:
    out = sample(model, xs, max_new_tokens=new_tokens, eos_id=-1, pad_id=PAD, temperature=1.0, top_p=1.0,
                 generator=torch.Generator().manual_seed(0))
    return int(out.batch.completion_mask_BT.sum())


@torch.no_grad()
def run_generate(model, xs, new_tokens: int) -> int:
    P = max(len(x) for x in xs)
    ids = torch.tensor([[PAD] * (P - len(x)) + x for x in xs])
    attn = (torch.arange(P)[None, :] >= torch.tensor([P - len(x) for x in xs])[:, None]).long()
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=PAD, eos_token_id=None)
    return int(out[:, P:].numel())


def rates(model, xs, new_tokens: int, reps: int) -> tuple[float, float]:
    """Median generated tokens/s of (opd, generate), runs interleaved after one warm-up each."""
    sides = (run_opd, run_generate)
    got: dict = {fn: [] for fn in sides}
    for rep in range(reps + 1):
        for fn in sides:
            t0 = time.perf_counter()
            n = fn(model, xs, new_tokens)
            if rep:
                got[fn].append(n / (time.perf_counter() - t0))
    return statistics.median(got[run_opd]), statistics.median(got[run_generate])


@torch.no_grad()
def matmul_seconds(model, batch: int) -> float:
    """One decode step's linear layers (LM head included) in model order: fastest of 5 runs."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(batch, m.in_features) for m in linears]
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        for m, x in zip(linears, xs):
            m(x)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all usable cores")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xs = prompts(args.batch, args.prompt_len)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, prompts "
          f"{args.prompt_len // 2}-{args.prompt_len} tokens, {args.new_tokens} new tokens, V={VOCAB}, float32, "
          f"median of {args.reps} interleaved runs")
    print(f"{'model':24s} {'path':>5s} {'opd tok/s':>10s} {'generate tok/s':>15s} {'ratio':>7s} "
          f"{'matmul ms':>10s} {'ceiling':>8s} {'load1':>6s}")
    for name in args.sizes:
        arch = SIZES[name]
        label = f"{name} (d={arch['hidden_size']}, {arch['num_hidden_layers']} layers)"
        with tempfile.TemporaryDirectory() as folder:
            model = load(arch, folder)
            path = Decoder(model, xs[:1], PAD, max_new_tokens=1).path
            ours, theirs = rates(model, xs, args.new_tokens, args.reps)
            mm = matmul_seconds(model, args.batch)
            ceiling = args.batch / theirs / mm  # generate's seconds per step / matmul seconds per step
            print(f"{label:24s} {path:>5s} {ours:10.0f} {theirs:15.0f} {ours / theirs:7.2f}x "
                  f"{mm * 1e3:10.1f} {ceiling:7.2f}x {os.getloadavg()[0]:6.2f}", flush=True)


if __name__ == "__main__":
    main()
