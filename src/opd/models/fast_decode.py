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

from dataclasses import dataclass

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


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for the weight's device, else the weight's."""
    kind = weight.device.type
    if torch.is_autocast_enabled(kind) and weight.is_floating_point():
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` detached in ``dtype`` (the same storage when it already is)."""
    return None if t is None else t.detach().to(dtype)


@dataclass
class _Norm:
    weight: torch.Tensor
    variance_epsilon: float

    @classmethod
    def of(cls, norm, dtype) -> "_Norm":
        return cls(_cast(norm.weight, dtype), norm.variance_epsilon)


@dataclass
class _LayerWeights:
    """One decoder layer's weights in the compute dtype (views of the model's when the
    dtypes agree, so an in-place update between rollouts is seen)."""

    norm_in: _Norm
    norm_post: _Norm
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    wg: torch.Tensor
    wu: torch.Tensor
    wd: torch.Tensor

    @classmethod
    def of(cls, layer, dtype) -> "_LayerWeights":
        a, m = layer.self_attn, layer.mlp
        linear = lambda proj: (_cast(proj.weight, dtype), _cast(proj.bias, dtype))  # noqa: E731
        (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (linear(p) for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
        return cls(_Norm.of(layer.input_layernorm, dtype), _Norm.of(layer.post_attention_layernorm, dtype),
                   wq, bq, wk, bk, wv, bv, wo, bo, *(_cast(p.weight, dtype) for p in (m.gate_proj, m.up_proj, m.down_proj)))


def _pick_step(step: str, device: torch.device, capacity: int) -> str:
    if step not in ("auto", "dynamic", "static", "graph"):
        raise ValueError(f"step must be auto, dynamic, static or graph, got {step!r}")
    if step == "auto":
        return "graph" if device.type == "cuda" and capacity > 0 else "dynamic"
    if step == "graph" and device.type != "cuda":
        return "static"  # CUDA graphs need CUDA; the static step is what they would replay
    return step


class _Graph:
    """The static decode step of one batch size, captured as a CUDA graph.

    Inputs are copied into fixed buffers before each replay; the logits come out in a fixed
    buffer. Capture follows CUDA's rules: warm-up runs on a side stream first (they compute
    the real step for this column, which the replay then recomputes identically)."""

    def __init__(self, dec: "FastDecoder", tok_B1: torch.Tensor, pos_B1: torch.Tensor, col: int):
        self.tok_B1, self.pos_B1 = tok_B1.clone(), pos_B1.clone()
        self.col_1 = torch.full((1,), col, dtype=torch.long, device=dec.device)
        side = torch.cuda.Stream(dec.device)
        side.wait_stream(torch.cuda.current_stream(dec.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                dec._static_step(self.tok_B1, self.pos_B1, self.col_1)
        torch.cuda.current_stream(dec.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits_BV = dec._static_step(self.tok_B1, self.pos_B1, self.col_1)

    def replay(self, tok_B1: torch.Tensor, pos_B1: torch.Tensor, col: int) -> torch.Tensor:
        self.tok_B1.copy_(tok_B1), self.pos_B1.copy_(pos_B1), self.col_1.fill_(col)
        self.graph.replay()
        return self.logits_BV


class FastDecoder:
    """Static-cache decoding of a left-padded batch (interface of ``sampler.Decoder``).

    ``step``: how one decode step runs. ``"dynamic"``: attention over the written columns
    only (shapes grow by one column per token). ``"static"``: every shape fixed, the new
    column written through an index tensor and attention over the whole capacity under the
    key mask (unwritten columns are masked and hold zeros). ``"graph"`` (CUDA only): the
    static step captured once per batch size as a CUDA graph and replayed, so a step costs
    one launch instead of a few hundred; a capture that fails falls back to ``"static"``
    (``graph_fallback`` says why). ``"auto"``: ``"graph"`` on CUDA with a known capacity,
    else ``"dynamic"``. All three compute the same logits up to float rounding.

    Weights are read in the compute dtype: the model's own, or the autocast dtype when the
    decoder is built under ``torch.autocast`` (a bf16 student with float32 master weights):
    then each weight is cast once per rollout, not once per token.
    """

    def __init__(self, model, prompts: list[list[int]], pad_id: int, capacity: int = 0, step: str = "auto"):
        core = model.model
        embed = core.embed_tokens
        self.device = embed.weight.device
        self.dtype = _compute_dtype(embed.weight)
        self.embed_VD = _cast(embed.weight, self.dtype)
        self.layers = [_LayerWeights.of(layer, self.dtype) for layer in core.layers]
        self.norm = _Norm.of(core.norm, self.dtype)
        self.head = tuple(None if w is None else _cast(w, self.dtype) for w in head_params(model.get_output_embeddings()))
        self.rotary = core.rotary_emb
        attn = core.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups
        self.kv_heads = model.config.num_key_value_heads
        self.step = _pick_step(step, self.device, capacity)
        self.graphs: dict[int, _Graph] = {}
        self.graph_fallback: str | None = None
        prompt_batch = make_batch(prompts, [[] for _ in prompts], pad_id)
        P = self.length = prompt_batch.prompt_len
        self._allocate(len(prompts), max(capacity, P + 1))
        self._rope_tables(self.valid_BL.shape[1])
        self.valid_BL[:, :P] = prompt_batch.attention_mask_BL[:, :P].bool()
        pos_BS = (prompt_batch.attention_mask_BL[:, :P].cumsum(-1) - 1).clamp(min=0)
        self.logits_BV = self._prefill(prompt_batch.input_ids_BL[:, :P].to(self.device), pos_BS.to(self.device))
        self.next_pos_B = pos_BS[:, -1].to(self.device) + 1

    def _allocate(self, B: int, capacity: int) -> None:
        shape = (len(self.layers), B, self.kv_heads, capacity, self.head_dim)
        # zeros: the static step attends over every column (unwritten ones masked, and a
        # masked column must not hold a NaN that 0 * NaN would let through)
        self.k_LBKCd = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_LBKCd = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.valid_BL = torch.zeros(B, capacity, dtype=torch.bool, device=self.device)
        self.graphs.clear()  # a captured graph holds the old buffers' addresses

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

    def _layer(self, x_BSD, w: "_LayerWeights", cos_B1Sd, sin_B1Sd, write, keys_values, mask_B1SL):
        """One decoder layer; ``write(k, v)`` stores the new keys and values in the cache,
        ``keys_values()`` returns the cached ones attention reads."""
        B, S, _ = x_BSD.shape
        h_BSD = _rms(x_BSD, w.norm_in)
        q_BHSd = F.linear(h_BSD, w.wq, w.bq).view(B, S, -1, self.head_dim).transpose(1, 2)
        k_BKSd = F.linear(h_BSD, w.wk, w.bk).view(B, S, -1, self.head_dim).transpose(1, 2)
        v_BKSd = F.linear(h_BSD, w.wv, w.bv).view(B, S, -1, self.head_dim).transpose(1, 2)
        write(_rope(k_BKSd, cos_B1Sd, sin_B1Sd), v_BKSd)
        o_BHSd = self._attend(_rope(q_BHSd, cos_B1Sd, sin_B1Sd), *keys_values(), mask_B1SL)
        x_BSD = x_BSD + F.linear(o_BHSd.transpose(1, 2).reshape(B, S, -1), w.wo, w.bo)
        h_BSD = _rms(x_BSD, w.norm_post)
        return x_BSD + F.linear(F.silu(F.linear(h_BSD, w.wg)) * F.linear(h_BSD, w.wu), w.wd)

    def _logits(self, x_BD: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms(x_BD, self.norm), *self.head).float()  # the head cut to the tokenizer's ids

    def _forward(self, ids_BS: torch.Tensor, pos_BS: torch.Tensor, mask_B1SL: torch.Tensor) -> torch.Tensor:
        """Run ``S`` new tokens per row, written to cache columns ``[length - S, length)``."""
        start, end = self.length - ids_BS.shape[1], self.length
        cos_B1Sd, sin_B1Sd = self.cos_Nd[pos_BS][:, None], self.sin_Nd[pos_BS][:, None]
        x_BSD = F.embedding(ids_BS, self.embed_VD)
        for i, w in enumerate(self.layers):
            def write(k, v, i=i):
                self.k_LBKCd[i, :, :, start:end], self.v_LBKCd[i, :, :, start:end] = k, v

            def keys_values(i=i):
                return self.k_LBKCd[i, :, :, :end], self.v_LBKCd[i, :, :, :end]

            x_BSD = self._layer(x_BSD, w, cos_B1Sd, sin_B1Sd, write, keys_values, mask_B1SL)
        return self._logits(x_BSD[:, -1])

    def _static_step(self, tok_B1: torch.Tensor, pos_B1: torch.Tensor, col_1: torch.Tensor) -> torch.Tensor:
        """One token per row written to cache column ``col_1`` (a device tensor), attention
        over the whole capacity under ``valid_BL``: no shape depends on the step."""
        cos_B1Sd, sin_B1Sd = self.cos_Nd[pos_B1][:, None], self.sin_Nd[pos_B1][:, None]
        mask_B11C = self.valid_BL[:, None, None, :]
        x_BSD = F.embedding(tok_B1, self.embed_VD)
        for i, w in enumerate(self.layers):
            def write(k, v, i=i):
                self.k_LBKCd[i].index_copy_(2, col_1, k), self.v_LBKCd[i].index_copy_(2, col_1, v)

            def keys_values(i=i):
                return self.k_LBKCd[i], self.v_LBKCd[i]

            x_BSD = self._layer(x_BSD, w, cos_B1Sd, sin_B1Sd, write, keys_values, mask_B11C)
        return self._logits(x_BSD[:, -1])

    def advance(self, tok_B: torch.Tensor, live_B: torch.Tensor) -> None:
        """Append ``tok_B``; ``live_B`` marks rows whose token is real (attended to)."""
        if self.length == self.valid_BL.shape[1]:
            self._grow()
        self.valid_BL[:, self.length] = live_B.to(self.device)
        self.length += 1
        tok_B1, pos_B1 = tok_B[:, None].to(self.device), self.next_pos_B[:, None]
        if self.step == "dynamic":
            mask_B11L = self.valid_BL[:, None, None, : self.length]
            self.logits_BV = self._forward(tok_B1, pos_B1, mask_B11L)
        elif self.step == "graph" and self.graph_fallback is None:
            self.logits_BV = self._graph_step(tok_B1, pos_B1)
        else:
            col_1 = torch.full((1,), self.length - 1, dtype=torch.long, device=self.device)
            self.logits_BV = self._static_step(tok_B1, pos_B1, col_1)
        self.next_pos_B = self.next_pos_B + 1

    def _graph_step(self, tok_B1: torch.Tensor, pos_B1: torch.Tensor) -> torch.Tensor:
        """The static step through this batch size's CUDA graph (captured on first use).
        Its output buffer is overwritten by the next replay: the caller reads it first."""
        B = tok_B1.shape[0]
        graph = self.graphs.get(B)
        if graph is None:
            try:
                graph = self.graphs[B] = _Graph(self, tok_B1, pos_B1, self.length - 1)
            except Exception as err:  # noqa: BLE001 (any capture failure: the eager static step computes the same)
                self.graph_fallback = f"{type(err).__name__}: {err}"[:300]
                col_1 = torch.full((1,), self.length - 1, dtype=torch.long, device=self.device)
                return self._static_step(tok_B1, pos_B1, col_1)
        return graph.replay(tok_B1, pos_B1, self.length - 1)

    def keep_rows(self, rows_A: torch.Tensor) -> None:
        """Keep only rows ``rows_A`` (copies the used part of the cache)."""
        rows_A, L = rows_A.to(self.device), self.length
        capacity = self.valid_BL.shape[1]
        k, v, valid = self.k_LBKCd[:, rows_A, :, :L], self.v_LBKCd[:, rows_A, :, :L], self.valid_BL[rows_A, :L]
        self._allocate(len(rows_A), capacity)
        self.k_LBKCd[..., :L, :], self.v_LBKCd[..., :L, :], self.valid_BL[:, :L] = k, v, valid
        self.next_pos_B, self.logits_BV = self.next_pos_B[rows_A], self.logits_BV[rows_A]
