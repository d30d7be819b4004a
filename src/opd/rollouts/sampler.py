"""The student sampler: batched autoregressive sampling with a KV cache.

One prefill over the left-padded prompts, then one decoder step per new token on the
cached keys and values. Finished rows keep emitting padding. The log-probs recorded for
each sampled token are the policy's own, ``log softmax(logits)`` at temperature 1 (the
learner's scoring temperature, METHODS rule 3), not the tempered/top-p sampling
distribution: they are what the importance ratio ``exp(log pi_theta - log pi_sampler)``
needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from opd.batch import SeqBatch, make_batch


@dataclass
class Sampled:
    batch: SeqBatch
    sampler_logp_BT: torch.Tensor  # log pi(y_t | c_t) at temperature 1, 0 on padding


def pick_tokens(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Greedy when ``temperature == 0``, else temperature + nucleus (top-p) sampling."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs_BV.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order, sorted_p)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _decoder_step(model, ids_BL, attn_BL, pos_BL, cache):
    out = model.get_decoder()(
        input_ids=ids_BL, attention_mask=attn_BL, position_ids=pos_BL, cache=cache, use_cache=True
    )
    return model.get_output_embeddings()(out.last_hidden_state[:, -1]).float()


class Decoder:
    """Incremental decoding of a batch: one prefill, then one cached step per token.

    ``logits_BV`` always holds the next-token logits of every row; :meth:`advance` feeds
    the tokens just chosen (finished rows feed padding, masked out of attention).
    """

    def __init__(self, model: PreTrainedModel, prompts: list[list[int]], pad_id: int):
        prompt_batch = make_batch(prompts, [[] for _ in prompts], pad_id)
        P = prompt_batch.prompt_len
        self.model = model
        self.attn_BL = prompt_batch.attention_mask_BL[:, :P]
        pos_BL = (self.attn_BL.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=model.config)
        self.logits_BV = _decoder_step(model, prompt_batch.input_ids_BL[:, :P], self.attn_BL, pos_BL, self.cache)
        self.next_pos_B = pos_BL[:, -1] + 1

    def advance(self, tok_B: torch.Tensor, live_B: torch.Tensor) -> None:
        """Append ``tok_B``; ``live_B`` marks rows whose token is real (attended to)."""
        self.attn_BL = torch.cat([self.attn_BL, live_B.long()[:, None]], dim=1)
        self.logits_BV = _decoder_step(self.model, tok_B[:, None], self.attn_BL, self.next_pos_B[:, None], self.cache)
        self.next_pos_B = self.next_pos_B + 1


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Sampled:
    """Sample one completion per prompt (up to ``max_new_tokens``, stopping at EOS)."""
    dec = Decoder(model, prompts, pad_id)
    tokens, logps = [], []
    done_B = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        tok_B = pick_tokens(dec.logits_BV, temperature, top_p, generator)
        tok_B = tok_B.masked_fill(done_B, pad_id)
        logp_B = torch.log_softmax(dec.logits_BV, -1).gather(-1, tok_B[:, None]).squeeze(-1)
        tokens.append(tok_B)
        logps.append(logp_B.masked_fill(done_B, 0.0))
        live_B = ~done_B
        done_B = done_B | (tok_B == eos_id)
        if bool(done_B.all()):
            break
        dec.advance(tok_B, live_B)
    return assemble(prompts, torch.stack(tokens, 1), torch.stack(logps, 1), eos_id, pad_id)


def assemble(prompts, tokens_BT, logp_BT, eos_id, pad_id) -> Sampled:
    """Cut each row after its EOS and build the shared layout."""
    completions, T = [], tokens_BT.shape[1]
    for row in tokens_BT.tolist():
        end = row.index(eos_id) + 1 if eos_id in row else T
        completions.append(row[:end])
    batch = make_batch(prompts, completions, pad_id)
    width = batch.completion_mask_BT.shape[1]
    out_BT = torch.zeros(batch.completion_mask_BT.shape)
    out_BT[:, : min(width, T)] = logp_BT[:, :width]
    return Sampled(batch, out_BT.masked_fill(~batch.completion_mask_BT, 0.0))
