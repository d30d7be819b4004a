"""Local Hugging Face causal LMs: loading, completion logits, and the teacher interface.

Logits are computed only on the completion columns of a :class:`opd.batch.SeqBatch`
(the decoder runs on the whole sequence, the LM head only where a loss needs it).
"""

from __future__ import annotations

from pathlib import Path

from opd.errors import UserError

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from opd.batch import SeqBatch
from opd.models.base import Scores

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
    logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, *, topk: int, full: bool, temperature: float
) -> Scores:
    """Token log-probs, entropy and top-K of ``softmax(logits / temperature)``."""
    logp_BTV = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    token_logp_BT = logp_BTV.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).nan_to_num().sum(-1)
    k = min(topk, logp_BTV.shape[-1])
    topk_logp_BTK, topk_ids_BTK = logp_BTV.topk(k, dim=-1)
    return Scores(token_logp_BT, entropy_BT, topk_ids_BTK, topk_logp_BTK, logits_BTV if full else None)


class HFTeacher:
    """A local causal LM as a teacher: one batched no-grad forward pass per ``score`` call."""

    def __init__(self, model: PreTrainedModel, *, eos_id: int, pad_id: int):
        self.model = model.eval()
        self.eos_id, self.pad_id = eos_id, pad_id
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.full_logits = True  # can return full next-token logits (a server may not)

    @torch.no_grad()
    def score(self, batch: SeqBatch, *, topk: int = 8, full: bool = False, temperature: float = 1.0) -> Scores:
        logits_BTV = completion_logits(self.model, batch)
        return scores_from_logits(
            logits_BTV, batch.completion_ids_BT, topk=topk, full=full, temperature=temperature
        )

    def generate(self, prompts: list[list[int]], *, prefix_ids_list=None, **sampling) -> list[list[int]]:
        """Sample completions (``sample``'s keywords). ``prefix_ids_list``: completion tokens
        already written, continued but not returned (as :meth:`OracleTeacher.generate`)."""
        from opd.rollouts.sampler import sample

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
