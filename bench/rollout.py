"""Rollout throughput: opd's student sampler vs ``model.generate`` of transformers.

    python bench/rollout.py [--batch 32] [--prompt-len 32] [--new-tokens 128] [--reps 5]

Same model (a randomly initialized Llama-shaped causal LM, saved to disk and loaded with
``from_pretrained``), same left-padded prompts, same length cap and sampling settings
(temperature 1, top-p 1, no EOS so both sides generate every token), for two model sizes.
Prints generated tokens per second for each side (median over ``--reps`` timed runs after
one warm-up run) and the ratio. Greedy equality of the two is checked by
``tests/test_sampler.py::test_greedy_matches_generate``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from opd.rollouts.sampler import sample

SIZES = {
    "tiny (d=128, 2 layers)": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
    "small (d=512, 8 layers)": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8),
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


def tokens_per_s(fn, model, xs, new_tokens: int, reps: int) -> float:
    fn(model, xs, new_tokens)  # warm-up
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        n = fn(model, xs, new_tokens)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    xs = prompts(args.batch, args.prompt_len)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, prompts "
          f"{args.prompt_len // 2}-{args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.reps}")
    print(f"{'model':26s} {'opd tok/s':>10s} {'generate tok/s':>15s} {'ratio':>7s}")
    for name, arch in SIZES.items():
        with tempfile.TemporaryDirectory() as folder:
            model = load(arch, folder)
            ours = tokens_per_s(run_opd, model, xs, args.new_tokens, args.reps)
            theirs = tokens_per_s(run_generate, model, xs, args.new_tokens, args.reps)
        print(f"{name:26s} {ours:10.0f} {theirs:15.0f} {ours / theirs:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
