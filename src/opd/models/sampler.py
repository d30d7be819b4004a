"""The student sampler: batched autoregressive sampling with a KV cache.

One prefill over the left-padded prompts, then one decoder step per new token on the
cached keys and values. Finished rows emit padding (and are dropped from the decoded
batch once enough of them have finished). The log-probs recorded for each sampled token
are the policy's own, ``log softmax(logits)`` at temperature 1 (the learner's scoring
temperature, METHODS rule 3), not the tempered/top-p sampling distribution: they are what
the importance ratio ``exp(log pi_theta - log pi_sampler)`` needs.

Two decoders give the next-token logits: a direct one for the Llama family
(:mod:`opd.models.fast_decode`, static KV cache, no per-step framework overhead) and the
generic Hugging Face one (``model.get_decoder()`` with a ``DynamicCache``), taken for any
other model or configuration. Both feed the same token picker, so a seeded run picks the
same tokens on either (up to float rounding of the logits).

Sampling is by inverse CDF with one uniform ``u ~ U[0,1)`` per row and step (drawn from
``generator`` for every row of the batch, finished or not, so the draws do not depend on
how the batch is decoded): the token is the first ``i`` with ``F_i >= (1-u)·F_V``, where
``F_i = sum_{j<=i} w_j`` and ``w = softmax(logits / temperature)`` (restricted to the top-p
nucleus). ``F`` runs in float64 over blocks of the vocabulary and inside the chosen block
(block sums in float32: relative rounding ~1e-7 of a block's mass, the precision of the
float32 probabilities themselves), so a small probability after a large running sum is not
rounded away as it would be by a float32 running sum over 32k entries. The draws are
distributed like ``torch.multinomial(w, 1)`` (what ``model.generate`` uses), with a
different random stream: ``multinomial`` draws ``V`` exponentials per row (serially in
torch's CPU build), which dominated the step of small models on CPU.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from opd.batch import SeqBatch, make_batch
from opd.models import fast_decode
from opd.models.device import model_device
from opd.models.fsdp import decoder_of

BLOCK = 128  # vocabulary block of the two-level inverse CDF


@dataclass
class Sampled:
    batch: SeqBatch
    sampler_logp_BT: torch.Tensor  # log pi(y_t | c_t) at temperature 1, 0 on padding


def draw(w_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: row ``b`` gives ``i`` with probability ``w_bi / sum_j w_bj``.

    ``w_BV >= 0`` (any scale, each row with a positive finite sum), ``u_B`` float64 in
    ``[0, 1)``. Two levels: the running sum (float64) of the block sums (float32) picks a
    block of ``BLOCK`` tokens, the running sum inside that block (float64) the token. The
    target ``(1-u)·total`` lies in ``(0, total]``, so the first index whose running sum
    reaches it is always a token with ``w > 0``.
    """
    B, V = w_BV.shape
    nb = -(-V // BLOCK)
    if nb * BLOCK != V:
        w_BV = F.pad(w_BV, (0, nb * BLOCK - V))
    w_BNK = w_BV.reshape(B, nb, BLOCK)
    cdf_BN = w_BNK.sum(-1).double().cumsum(-1)
    target_B = (1.0 - u_B) * cdf_BN[:, -1]
    blk_B = torch.searchsorted(cdf_BN, target_B[:, None]).squeeze(-1).clamp(max=nb - 1)
    before_B = cdf_BN.gather(1, (blk_B - 1).clamp(min=0)[:, None]).squeeze(-1) * (blk_B > 0)
    local_BK = w_BNK[torch.arange(B, device=w_BV.device), blk_B].double().cumsum(-1)
    rest_B = torch.minimum(target_B - before_B, local_BK[:, -1])
    return blk_B * BLOCK + torch.searchsorted(local_BK, rest_B[:, None]).squeeze(-1).clamp(max=BLOCK - 1)


def _check_finite(ok: torch.Tensor) -> None:
    if not bool(ok):
        raise ValueError("the logits hold nan or inf: nothing to sample from")


def _nucleus(probs_BV: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of most likely tokens reaching ``top_p``: (sorted kept probs, order)."""
    sorted_p, order = probs_BV.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p
    return sorted_p.masked_fill(drop, 0.0), order


def pick_tokens_logp(
    logits_BV: torch.Tensor, temperature: float, top_p: float, u_B: torch.Tensor | None, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens and their log-probs ``log softmax(logits)[tok]`` (temperature 1).

    Greedy when ``temperature == 0`` (``u_B`` unused), else a draw (:func:`draw`, one
    uniform per row in ``u_B``) from ``softmax(logits / temperature)``, cut to its top-p
    nucleus when ``top_p < 1``. At temperature 1 the sampling softmax is reused for the
    log-prob: ``log p_tok`` (a sampled token has ``p_tok > 0``). ``check``: raise on
    non-finite logits here (a host sync); the decode loop checks them in batches instead.
    """
    if temperature == 0:
        tok_B = logits_BV.argmax(-1)
        return tok_B, logits_BV.gather(-1, tok_B[:, None]).squeeze(-1) - logits_BV.logsumexp(-1)
    probs_BV = torch.softmax(logits_BV if temperature == 1.0 else logits_BV / temperature, dim=-1)
    if check:
        _check_finite(torch.isfinite(probs_BV.sum()))
    if top_p < 1.0:
        kept_BV, order_BV = _nucleus(probs_BV, top_p)
        tok_B = order_BV.gather(-1, draw(kept_BV, u_B)[:, None]).squeeze(-1)
    else:
        tok_B = draw(probs_BV, u_B)
    if temperature == 1.0:
        return tok_B, probs_BV.gather(-1, tok_B[:, None]).squeeze(-1).log()
    return tok_B, logits_BV.gather(-1, tok_B[:, None]).squeeze(-1) - logits_BV.logsumexp(-1)


def pick_tokens(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Greedy when ``temperature == 0``, else temperature + nucleus (top-p) sampling."""
    u_B = None if temperature == 0 else host_uniforms((logits_BV.shape[0],), generator).to(logits_BV.device)
    return pick_tokens_logp(logits_BV, temperature, top_p, u_B)[0]


def host_uniforms(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """float64 uniforms in ``[0, 1)`` from ``generator`` (a host generator: a seed gives the
    same draws whatever device the model is on)."""
    return torch.rand(shape, generator=generator, dtype=torch.float64, device="cpu")


def cache_argument(decoder: torch.nn.Module) -> str:
    """The decoder's keyword for its KV cache: ``cache`` in newer transformers, ``past_key_values``
    before. Passing the wrong one is silent: the decoder makes a fresh cache per call and each step
    sees one token, so the tokens are wrong."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class HFDecoder:
    """Generic incremental decoding through the Hugging Face model (any causal LM).

    The attention mask is preallocated (``capacity`` columns, doubled when full).
    """

    def __init__(self, model: PreTrainedModel, prompts: list[list[int]], pad_id: int, capacity: int = 0):
        prompt_batch = make_batch(prompts, [[] for _ in prompts], pad_id).to(model_device(model))
        P = self.length = prompt_batch.prompt_len
        self.model = model
        self.attn_BL = torch.zeros(len(prompts), max(capacity, 2 * P), dtype=torch.long, device=model_device(model))
        self.attn_BL[:, :P] = prompt_batch.attention_mask_BL[:, :P]
        pos_BL = (self.attn_BL[:, :P].cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=model.config)
        self.cache_arg = cache_argument(decoder_of(model))
        self.logits_BV = self._step(prompt_batch.input_ids_BL[:, :P], pos_BL)
        self.next_pos_B = pos_BL[:, -1] + 1

    def _step(self, ids_BS: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
        out = decoder_of(self.model)(
            input_ids=ids_BS, attention_mask=self.attn_BL[:, : self.length], position_ids=pos_BS,
            use_cache=True, **{self.cache_arg: self.cache},
        )
        return self.model.get_output_embeddings()(out.last_hidden_state[:, -1]).float()

    def advance(self, tok_B: torch.Tensor, live_B: torch.Tensor) -> None:
        if self.length == self.attn_BL.shape[1]:
            self.attn_BL = torch.cat([self.attn_BL, torch.zeros_like(self.attn_BL)], dim=1)
        self.attn_BL[:, self.length] = live_B.long()
        self.length += 1
        self.logits_BV = self._step(tok_B[:, None], self.next_pos_B[:, None])
        self.next_pos_B = self.next_pos_B + 1

    def keep_rows(self, rows_A: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows_A)
        self.attn_BL, self.next_pos_B, self.logits_BV = self.attn_BL[rows_A], self.next_pos_B[rows_A], self.logits_BV[rows_A]


class Decoder:
    """Incremental decoding of a batch: one prefill, then one cached step per token.

    ``logits_BV`` always holds the next-token logits (float32) of every row; :meth:`advance`
    feeds the tokens just chosen (finished rows feed padding, masked out of attention);
    :meth:`keep_rows` drops rows from the batch. The direct Llama-family decoder is used
    when ``fast`` and the model supports it (``path == "fast"``), else the generic one
    (``path == "hf"``, ``fallback`` says why). ``max_new_tokens`` (optional) sizes the caches.
    """

    def __init__(self, model: PreTrainedModel, prompts: list[list[int]], pad_id: int,
                 max_new_tokens: int | None = None, fast: bool = True, step: str = "auto"):
        max_len = None if max_new_tokens is None else max(len(p) for p in prompts) + max_new_tokens
        self.fallback = fast_decode.unsupported(model, max_len) if fast else "fast=False"
        self.path = "hf" if self.fallback else "fast"
        if self.fallback:
            self.impl = HFDecoder(model, prompts, pad_id, capacity=max_len or 0)
        else:
            self.impl = fast_decode.FastDecoder(model, prompts, pad_id, capacity=max_len or 0, step=step)

    @property
    def logits_BV(self) -> torch.Tensor:
        return self.impl.logits_BV

    def advance(self, tok_B: torch.Tensor, live_B: torch.Tensor) -> None:
        """Append ``tok_B``; ``live_B`` marks rows whose token is real (attended to)."""
        self.impl.advance(tok_B, live_B)

    def keep_rows(self, rows_A: torch.Tensor) -> None:
        """Keep only rows ``rows_A`` (indices into the current batch), in that order."""
        self.impl.keep_rows(rows_A)


def _worth_compacting(n_done: int, n_active: int) -> bool:
    """Drop finished rows once they are a quarter of the decoded batch (a cache copy each time)."""
    return n_done > 0 and 4 * n_done >= n_active


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
    fast: bool = True,
    step: str = "auto",
) -> Sampled:
    """Sample one completion per prompt (up to ``max_new_tokens``, stopping at EOS).

    ``fast=False`` forces the generic Hugging Face decoder (same tokens, slower); ``step``:
    how the direct decoder runs a step (:class:`opd.models.fast_decode.FastDecoder`; "auto":
    a CUDA graph on a GPU). Decoding runs in inference mode; the returned tensors are
    ordinary ones.
    """
    with torch.inference_mode():
        dec = Decoder(model, prompts, pad_id, max_new_tokens=max_new_tokens, fast=fast, step=step)
        tokens_BT, logp_BT = _decode(dec, len(prompts), max_new_tokens, eos_id, pad_id, temperature, top_p, generator)
    return assemble(prompts, tokens_BT, logp_BT, eos_id, pad_id)


SYNC_EVERY = 8  # on an accelerator, decode steps between host reads of the finished rows


def _decode(dec: Decoder, B: int, max_new_tokens: int, eos_id: int, pad_id: int, temperature: float, top_p: float,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling loop: ``[B, steps]`` tokens (padding after EOS) and their log-probs (0 there).

    Everything stays on the model's device: the uniforms of every step are drawn on the host
    up front (one copy), and the host reads the finished rows (to stop, or to drop them from
    the batch) every step on the CPU but only every ``SYNC_EVERY`` steps on an accelerator;
    a finished row emits padding meanwhile, so the tokens are the same either way. The
    generator ends as if each step had drawn its ``B`` uniforms (the steps until every row
    finished), whatever the device."""
    dev = dec.logits_BV.device
    sync_every = 1 if dev.type == "cpu" else SYNC_EVERY
    state = None if generator is None else generator.get_state()
    u_TB = None if temperature == 0 else host_uniforms((max_new_tokens, B), generator).to(dev)
    tokens_BT = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    logp_BT = torch.zeros(B, max_new_tokens, device=dev)
    finite = torch.ones((), dtype=torch.bool, device=dev)
    rows_A = torch.arange(B, device=dev)  # batch rows still decoded
    done_A = torch.zeros(B, dtype=torch.bool, device=dev)
    steps = 0
    for t in range(max_new_tokens):
        u_A = None if u_TB is None else u_TB[t, rows_A]
        tok_A, lp_A = pick_tokens_logp(dec.logits_BV, temperature, top_p, u_A, check=False)
        finite &= torch.isfinite(lp_A).all()
        live_A = ~done_A
        tok_A = tok_A.masked_fill(done_A, pad_id)
        tokens_BT[rows_A, t], logp_BT[rows_A, t] = tok_A, lp_A.masked_fill(done_A, 0.0)
        done_A = done_A | (tok_A == eos_id)
        steps = t + 1
        if steps == max_new_tokens:
            break
        if steps % sync_every == 0:
            _check_finite(finite)
            n_done = int(done_A.sum())
            if n_done == len(rows_A):
                break
            if _worth_compacting(n_done, len(rows_A)):
                keep_A = (~done_A).nonzero().squeeze(-1)
                dec.keep_rows(keep_A)
                rows_A, tok_A, live_A, done_A = rows_A[keep_A], tok_A[keep_A], live_A[keep_A], done_A[keep_A]
        dec.advance(tok_A, live_A)
    _check_finite(finite)
    steps = _steps_taken(tokens_BT[:, :steps], eos_id)
    if state is not None and u_TB is not None:  # consume exactly what a draw per step would have
        generator.set_state(state)
        host_uniforms((steps, B), generator)
    return tokens_BT[:, :steps].cpu(), logp_BT[:, :steps].cpu()


def _steps_taken(tokens_BT: torch.Tensor, eos_id: int) -> int:
    """Steps until every row had emitted EOS (the full width when one never did)."""
    T = tokens_BT.shape[1]
    is_eos_BT = tokens_BT == eos_id
    if T == 0 or not bool(is_eos_BT.any(1).all()):
        return T
    return int(is_eos_BT.float().argmax(1).max()) + 1


def assemble(prompts, tokens_BT, logp_BT, eos_id, pad_id) -> Sampled:
    """Cut each row after its EOS and build the shared layout."""
    completions, T = [], tokens_BT.shape[1]
    for row in tokens_BT.tolist():
        end = row.index(eos_id) + 1 if eos_id in row else T
        completions.append(row[:end])
    batch = make_batch(prompts, completions, pad_id)
    width = batch.completion_mask_BT.shape[1]
    out_BT = torch.zeros(batch.completion_mask_BT.shape, device=batch.device)
    out_BT[:, : min(width, T)] = logp_BT[:, :width]
    return Sampled(batch, out_BT.masked_fill(~batch.completion_mask_BT, 0.0))
