"""A direct decoder for Llama-family causal LMs (Llama, Qwen2, Mistral): the same math as
the Hugging Face forward, without its per-step framework overhead.

It reads the modules' weights (no copies, so a model updated in place between rollouts is
decoded with its current weights) and keeps a preallocated static KV cache
``[layers, B, kv_heads, capacity, head_dim]`` plus a boolean key mask ``[B, capacity]``.
Per layer, for the hidden states ``x``::

    h = RMSNorm(x) = w · (x / sqrt(mean(x²) + eps))        (in float32, cast back, as HF)
    q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv);  q, k = RoPE(q, pos), RoPE(k, pos)
    x = x + softmax(q kᵀ / sqrt(head_dim) + mask) v Wo      (GQA: kv head = q head // group)
    x = x + W_down (silu(W_gate h') * (W_up h')),  h' = RMSNorm(x)

then ``logits = lm_head(RMSNorm(x))`` (tied or untied, float32 out). Positions are
``cumsum(attention_mask) - 1`` as in :mod:`opd.batch`; the RoPE tables come from the model's
own rotary module (so its scaling config applies), evaluated once for all positions: exact
for the RoPE types whose tables do not depend on the sequence length.

:func:`unsupported` says why a model cannot take this path (then the caller uses the
generic HF decoder): another architecture, a RoPE type whose tables depend on the length
("dynamic", "longrope"), a sliding window shorter than the sequence, an activation other
than SiLU, attention dropout in training mode, or meta/offloaded weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opd.batch import make_batch
from opd.models.head import head_params

FAMILY = {"llama", "qwen2", "mistral"}
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


def _sliding_too_short(config, max_len: int | None) -> bool:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return False
    return max_len is None or max_len > window


def _expected_layout(model) -> bool:
    core = getattr(model, "model", None)
    if core is None or not all(hasattr(core, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "input_layernorm.variance_epsilon", "post_attention_layernorm.weight")
    for layer in core.layers:
        for part in parts:
            owner, name = part.split(".")
            if not hasattr(getattr(layer, owner, None), name):
                return False
    return isinstance(model.get_output_embeddings(), torch.nn.Linear) and hasattr(core.norm, "variance_epsilon")


def unsupported(model, max_len: int | None) -> str | None:
    """``None`` when :class:`FastDecoder` computes what the model's forward computes, else why not.

    ``max_len`` bounds prompt + completion (``None``: unknown).
    """
    config = model.config
    if getattr(config, "model_type", None) not in FAMILY:
        return f"model_type {getattr(config, 'model_type', None)!r} is not one of {sorted(FAMILY)}"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") not in STATIC_ROPE:  # also a per-layer-type dict (no "rope_type" key)
        return f"rope_type {rope.get('rope_type')!r} is not one of {sorted(STATIC_ROPE)}"
    if _sliding_too_short(config, max_len):
        return f"sliding window {config.sliding_window} may be shorter than the sequence ({max_len})"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} is not silu"
    if model.training and getattr(config, "attention_dropout", 0.0):
        return "attention dropout is active (training mode)"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if not _expected_layout(model):
        return "unexpected module layout"
    if any(p.is_meta for p in model.parameters()) or len({p.device for p in model.parameters()}) != 1:
        return "weights on the meta device or spread over devices"
    return None


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    """HF's RMSNorm: normalize in float32, cast back, scale by the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x32.to(x.dtype)


def _rope(x_BHSd: torch.Tensor, cos_B1Sd: torch.Tensor, sin_B1Sd: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = [-x2, x1]``."""
    half = x_BHSd.shape[-1] // 2
    rotated = torch.cat((-x_BHSd[..., half:], x_BHSd[..., :half]), dim=-1)
    return x_BHSd * cos_B1Sd + rotated * sin_B1Sd


def _linear(x: torch.Tensor, proj) -> torch.Tensor:
    return F.linear(x, proj.weight, proj.bias)


class FastDecoder:
    """Static-cache decoding of a left-padded batch (interface of ``sampler.Decoder``)."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int, capacity: int = 0):
        core = model.model
        self.layers, self.norm, self.head = list(core.layers), core.norm, model.get_output_embeddings()
        self.embed, self.rotary = core.embed_tokens, core.rotary_emb
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups
        self.kv_heads = model.config.num_key_value_heads
        prompt_batch = make_batch(prompts, [[] for _ in prompts], pad_id)
        P = self.length = prompt_batch.prompt_len
        self.dtype, self.device = self.embed.weight.dtype, self.embed.weight.device
        self._allocate(len(prompts), max(capacity, P + 1))
        self._rope_tables(self.valid_BL.shape[1])
        self.valid_BL[:, :P] = prompt_batch.attention_mask_BL[:, :P].bool()
        pos_BS = (prompt_batch.attention_mask_BL[:, :P].cumsum(-1) - 1).clamp(min=0)
        self.logits_BV = self._prefill(prompt_batch.input_ids_BL[:, :P].to(self.device), pos_BS.to(self.device))
        self.next_pos_B = pos_BS[:, -1].to(self.device) + 1

    def _allocate(self, B: int, capacity: int) -> None:
        shape = (len(self.layers), B, self.kv_heads, capacity, self.head_dim)
        # left unset: a column is written (prefill or step) before any query reads it
        self.k_LBKCd = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_LBKCd = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.valid_BL = torch.zeros(B, capacity, dtype=torch.bool, device=self.device)

    def _rope_tables(self, n: int) -> None:
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, torch.arange(n, device=self.device)[None])
        self.cos_Nd, self.sin_Nd = cos[0], sin[0]

    def _grow(self) -> None:
        """Double the cache's capacity (only when no capacity was given)."""
        k, v, valid = self.k_LBKCd, self.v_LBKCd, self.valid_BL
        self._allocate(valid.shape[0], 2 * valid.shape[1])
        self._rope_tables(2 * valid.shape[1])
        self.k_LBKCd[..., : k.shape[3], :], self.v_LBKCd[..., : v.shape[3], :] = k, v
        self.valid_BL[:, : valid.shape[1]] = valid

    def _prefill(self, ids_BS: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
        S = ids_BS.shape[1]
        causal_SS = torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
        own_SS = torch.eye(S, dtype=torch.bool, device=self.device)  # padding attends to itself: no empty rows
        mask_B1SS = (causal_SS & (self.valid_BL[:, None, :S] | own_SS))[:, None]
        return self._forward(ids_BS, pos_BS, mask_B1SS)

    def _attend(self, q_BHSd, k_BKLd, v_BKLd, mask_B1SL) -> torch.Tensor:
        B, H, S, d = q_BHSd.shape
        if S == 1:  # one query per head: group the query heads of each kv head, no kv copies
            q_BKGd = q_BHSd.reshape(B, self.kv_heads, self.groups, d)
            return F.scaled_dot_product_attention(q_BKGd, k_BKLd, v_BKLd, attn_mask=mask_B1SL).reshape(B, H, 1, d)
        k_BHLd, v_BHLd = (t.repeat_interleave(self.groups, dim=1) for t in (k_BKLd, v_BKLd))
        return F.scaled_dot_product_attention(q_BHSd, k_BHLd, v_BHLd, attn_mask=mask_B1SL)

    def _forward(self, ids_BS: torch.Tensor, pos_BS: torch.Tensor, mask_B1SL: torch.Tensor) -> torch.Tensor:
        """Run ``S`` new tokens per row, written to cache columns ``[length - S, length)``."""
        B, S = ids_BS.shape
        start, end = self.length - S, self.length
        cos_B1Sd, sin_B1Sd = self.cos_Nd[pos_BS][:, None], self.sin_Nd[pos_BS][:, None]
        x_BSD = self.embed(ids_BS)
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h_BSD = _rms(x_BSD, layer.input_layernorm)
            q_BHSd = _linear(h_BSD, attn.q_proj).view(B, S, -1, self.head_dim).transpose(1, 2)
            k_BKSd = _linear(h_BSD, attn.k_proj).view(B, S, -1, self.head_dim).transpose(1, 2)
            v_BKSd = _linear(h_BSD, attn.v_proj).view(B, S, -1, self.head_dim).transpose(1, 2)
            self.k_LBKCd[i, :, :, start:end] = _rope(k_BKSd, cos_B1Sd, sin_B1Sd)
            self.v_LBKCd[i, :, :, start:end] = v_BKSd
            o_BHSd = self._attend(_rope(q_BHSd, cos_B1Sd, sin_B1Sd), self.k_LBKCd[i, :, :, :end],
                                  self.v_LBKCd[i, :, :, :end], mask_B1SL)
            x_BSD = x_BSD + _linear(o_BHSd.transpose(1, 2).reshape(B, S, -1), attn.o_proj)
            h_BSD = _rms(x_BSD, layer.post_attention_layernorm)
            x_BSD = x_BSD + _linear(F.silu(_linear(h_BSD, mlp.gate_proj)) * _linear(h_BSD, mlp.up_proj), mlp.down_proj)
        return F.linear(_rms(x_BSD[:, -1], self.norm), *head_params(self.head)).float()  # cut to the tokenizer's ids

    def advance(self, tok_B: torch.Tensor, live_B: torch.Tensor) -> None:
        """Append ``tok_B``; ``live_B`` marks rows whose token is real (attended to)."""
        if self.length == self.valid_BL.shape[1]:
            self._grow()
        self.valid_BL[:, self.length] = live_B.to(self.device)
        self.length += 1
        mask_B11L = self.valid_BL[:, None, None, : self.length]
        self.logits_BV = self._forward(tok_B[:, None].to(self.device), self.next_pos_B[:, None], mask_B11L)
        self.next_pos_B = self.next_pos_B + 1

    def keep_rows(self, rows_A: torch.Tensor) -> None:
        """Keep only rows ``rows_A`` (copies the used part of the cache)."""
        rows_A, L = rows_A.to(self.device), self.length
        capacity = self.valid_BL.shape[1]
        k, v, valid = self.k_LBKCd[:, rows_A, :, :L], self.v_LBKCd[:, rows_A, :, :L], self.valid_BL[rows_A, :L]
        self._allocate(len(rows_A), capacity)
        self.k_LBKCd[..., :L, :], self.v_LBKCd[..., :L, :], self.valid_BL[:, :L] = k, v, valid
        self.next_pos_B, self.logits_BV = self.next_pos_B[rows_A], self.logits_BV[rows_A]
