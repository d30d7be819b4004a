"""Local Hugging Face causal LMs: loading, completion logits, and the teacher interface.

Logits are computed only on the completion columns of a :class:`opd.batch.SeqBatch`
(the decoder runs on the whole sequence, the LM head only where a loss needs it).
The teacher's default scoring is :func:`opd.models.scoring.lean_scores` (length buckets,
the head on kept positions only, in chunks: no ``[B, T, V]`` tensor).
"""

from __future__ import annotations

from pathlib import Path

from opd.errors import UserError

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from opd.batch import SeqBatch
from opd.losses.chunked import default_chunk_size
from opd.models.base import Scores
from opd.models.scoring import BUCKET_TOKENS, CALL_COST, chunk_scores, lean_scores

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path_or_id: str, dtype: str = "float32") -> PreTrainedModel:
    """``from_pretrained`` from a local directory or a hub id, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=DTYPES[dtype])
    return model.eval()


def load_tokenizer(path_or_id: str):
    tok = AutoTokenizer.from_pretrained(str(path_or_id))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_same_vocab(student: PreTrainedModel, teacher_vocab_size: int, tokenizer_len: int) -> None:
    """Teacher and student must share token ids (METHODS rule 7); never resize silently."""
    student_v = student.get_output_embeddings().weight.shape[0]
    if student_v != teacher_vocab_size:
        raise UserError(
            f"student and teacher vocabularies differ ({student_v} vs {teacher_vocab_size} ids); "
            "on-policy distillation needs one shared tokenizer. Pick a teacher from the same model "
            "family, or a student whose tokenizer matches the teacher's."
        )
    if tokenizer_len > student_v:
        raise UserError(
            f"the tokenizer has {tokenizer_len} tokens but the model only {student_v} output ids; "
            "check that model and tokenizer paths belong together."
        )


def completion_hidden(model: PreTrainedModel, batch: SeqBatch) -> torch.Tensor:
    """Final hidden states that predict each completion token: ``[B, T, H]``."""
    out = model.get_decoder()(
        input_ids=batch.input_ids_BL,
        attention_mask=batch.attention_mask_BL,
        position_ids=batch.position_ids_BL,
        use_cache=False,
    )
    P = batch.prompt_len
    return out.last_hidden_state[:, P - 1 : -1]


def completion_logits(model: PreTrainedModel, batch: SeqBatch) -> torch.Tensor:
    """Next-token logits at the completion columns: ``[B, T, V]`` (float32)."""
    return model.get_output_embeddings()(completion_hidden(model, batch)).float()


def scores_from_logits(
    logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, *, topk: int, full: bool, temperature: float,
    chunk_size: int | None = None,
) -> Scores:
    """Token log-probs, entropy and top-K of ``softmax(logits / temperature)`` at every
    position, ``chunk_size`` positions at a time (no ``[B, T, V]`` temporaries beside
    ``logits_BTV``); the logits themselves are returned when ``full``."""
    B, T, V = logits_BTV.shape
    k, C = min(topk, V), chunk_size or default_chunk_size(V)
    logits_NV, tokens_N = logits_BTV.reshape(B * T, V), tokens_BT.reshape(B * T)
    parts = [chunk_scores(logits_NV[s : s + C], tokens_N[s : s + C], k, temperature) for s in range(0, max(B * T, 1), C)]
    token_N, entropy_N, ids_NK, topk_N = (torch.cat(p) for p in zip(*parts))
    return Scores(
        token_N.view(B, T), entropy_N.view(B, T), ids_NK.view(B, T, k), topk_N.view(B, T, k),
        logits_BTV if full else None,
    )


class HFTeacher:
    """A local causal LM as a teacher: one no-grad scoring pass per ``score`` call.

    Without ``full``, :func:`opd.models.scoring.lean_scores`: packed length buckets of at
    most ``bucket_tokens`` padded cells (``call_cost``: an extra decoder call's worth in
    cells), the LM head on kept positions only, chunk by chunk. With ``full``, the plain
    padded pass (every completion column's logits are returned, padding included)."""

    def __init__(self, model: PreTrainedModel, *, eos_id: int, pad_id: int,
                 bucket_tokens: int = BUCKET_TOKENS, call_cost: int = CALL_COST):
        self.model = model.eval()
        self.eos_id, self.pad_id = eos_id, pad_id
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.full_logits = True  # can return full next-token logits (a server may not)
        self.bucket_tokens, self.call_cost = bucket_tokens, call_cost

    @torch.no_grad()
    def score(self, batch: SeqBatch, *, topk: int = 8, full: bool = False, temperature: float = 1.0) -> Scores:
        if not full:
            return lean_scores(self.model, batch, topk=topk, temperature=temperature,
                               max_tokens=self.bucket_tokens, call_cost=self.call_cost)
        logits_BTV = completion_logits(self.model, batch)
        return scores_from_logits(
            logits_BTV, batch.completion_ids_BT, topk=topk, full=full, temperature=temperature
        )

    def generate(self, prompts: list[list[int]], *, prefix_ids_list=None, **sampling) -> list[list[int]]:
        """Sample completions (``sample``'s keywords). ``prefix_ids_list``: completion tokens
        already written, continued but not returned (as :meth:`OracleTeacher.generate`)."""
        from opd.models.sampler import sample

        if prefix_ids_list is not None:
            prompts = [list(p) + list(q) for p, q in zip(prompts, prefix_ids_list)]
        out = sample(self.model, prompts, eos_id=self.eos_id, pad_id=self.pad_id, **sampling)
        return out.batch.completions()


def save_pretrained(model: PreTrainedModel, tokenizer, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
