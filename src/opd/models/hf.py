"""Local Hugging Face causal LMs: loading, completion logits, and the teacher interface.

Logits are computed only on the completion columns of a :class:`opd.batch.SeqBatch`
(the decoder runs on the whole sequence, the LM head only where a loss needs it).
The teacher's default scoring is :func:`opd.models.scoring.lean_scores` (length buckets,
the head on kept positions only, in chunks: no ``[B, T, V]`` tensor).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from opd.errors import UserError

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from opd.batch import SeqBatch
from opd.losses.chunked import default_chunk_size
from opd.models.fsdp import decoder_of
from opd.models.base import Scores
from opd.models.device import model_device
from opd.models.head import head_params, head_rows
from opd.models.scoring import BUCKET_TOKENS, CALL_COST, chunk_scores, lean_scores

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


HUB_TIMEOUT_S = 5.0  # one look-up of a hub id, no retries: no network fails in seconds
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_model(path_or_id: str, dtype: str = "float32", *, what: str = "model") -> PreTrainedModel:
    """``from_pretrained`` from a local directory or a hub id (see :func:`locate`), in eval mode."""
    where, local_only = locate(path_or_id, what)
    return _pretrained(AutoModelForCausalLM, where, local_only, what, dtype=DTYPES[dtype]).eval()


def load_tokenizer(path_or_id: str, *, what: str = "tokenizer"):
    """The tokenizer of a model directory or hub id. It must have an eos token (a rollout
    ends there); without a pad token it pads with eos (a one-line note on stderr)."""
    where, local_only = locate(path_or_id, what)
    if Path(where).is_dir() and not any((Path(where) / f).exists() for f in TOKENIZER_FILES):
        raise UserError(
            f"{where} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); save the tokenizer "
            "there (tokenizer.save_pretrained(DIR)) or copy those files from the model it comes from"
        )
    tok = _pretrained(AutoTokenizer, where, local_only, "tokenizer")
    if tok.eos_token_id is None:
        nor_pad = " (nor a pad token)" if tok.pad_token_id is None else ""
        raise UserError(
            f"the tokenizer of {path_or_id} has no eos token{nor_pad}, so no rollout could end before "
            'max_new_tokens; set "eos_token" in its tokenizer_config.json to the model\'s end-of-text token'
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        print(f"opd: note: the tokenizer of {path_or_id} has no pad token; padding with its eos token {tok.eos_token!r}",
              file=sys.stderr)
    return tok


def _pretrained(cls, where: str, local_only: bool, what: str, **kwargs):
    """``cls.from_pretrained``; what it cannot load (missing or damaged files) is one line."""
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(where, local_files_only=local_only, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        raise UserError(f"cannot load the {what} from {where}: {' '.join(str(err).split())}") from err


def looks_local(text: str) -> bool:
    """A path rather than a hub id (``name`` or ``org/name``): it starts with ``/``, ``./``,
    ``../`` or ``~``, has more than one ``/``, or holds this system's other separator."""
    return text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or text.count("/") > 1 or (
        os.sep != "/" and os.sep in text
    )


def locate(path_or_id, what: str) -> tuple[str, bool]:
    """``(where, local_only)``: an existing directory, or a hub id that was looked up once;
    ``local_only``: load without the network. A path that does not exist, an unknown hub id,
    or no network without a cached copy is one :class:`UserError`."""
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise UserError(f"{what} {text} is a file; give the model's directory (the one holding config.json)")
    if looks_local(text):
        raise UserError(f"{what} {text}: no such directory; check the path (a hub id looks like org/name)")
    return text, _hub_local_only(text, what)


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_local_only(repo_id: str, what: str) -> bool:
    """Whether to load hub id ``repo_id`` from the local cache only (offline, or the hub is
    unreachable and a copy is cached); otherwise it exists on the hub. Else one line."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"{what} {repo_id}: neither a local directory nor a valid hub id (org/name); check the path") from None
    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    if _offline():
        if cached:
            return True
        raise UserError(
            f"{what} {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it "
            f"where there is a network (hf download {repo_id}), unset HF_HUB_OFFLINE, or give a local directory"
        )
    problem = _hub_lookup(repo_id)
    if problem is None:
        return False
    if cached and problem.startswith("unreachable"):
        print(f"opd: note: the Hugging Face hub is {problem}; loading {repo_id} from the local cache", file=sys.stderr)
        return True
    if problem.startswith("unreachable"):
        raise UserError(
            f"{what} {repo_id}: the Hugging Face hub is {problem} and the model is not in the local cache; "
            "check the network, or download it where there is one and give its directory"
        )
    raise UserError(f"{what} {repo_id}: {problem}")


@functools.lru_cache(maxsize=64)
def _hub_lookup(repo_id: str) -> str | None:
    """None if the hub knows ``repo_id``; else what is wrong (one look-up per id and process)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return "a gated model; accept its terms on its hub page and log in (hf auth login)"
    except RepositoryNotFoundError:
        return "no such model on the Hugging Face hub (a private one needs hf auth login); check the id, or give a local directory"
    except Exception as err:  # no network, DNS, proxy, timeout, a server error
        return f"unreachable ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
    return None


def check_vocabularies(student: PreTrainedModel, tokenizer, teacher=None, teacher_tokenizer=None) -> None:
    """Student and teacher must share one tokenizer (METHODS rule 7); never resize silently.

    The tokenizers are compared (:func:`check_same_tokenizer`), not the embedding sizes: a
    model's output rows may be padded past its tokenizer (:mod:`opd.models.head`), and each
    side is then cut to the tokenizer's ``len(tokenizer)`` ids at set-up. A model with fewer
    rows than the tokenizer has ids, or a program teacher of another size, is an error."""
    n = len(tokenizer)
    student_v = student.get_output_embeddings().weight.shape[0]
    if n > student_v:
        raise UserError(
            f"the tokenizer has {n} tokens but the model only {student_v} output ids; "
            "check that model and tokenizer paths belong together."
        )
    if teacher_tokenizer is not None:
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    model = getattr(teacher, "model", None)
    teacher_v = None if teacher is None else (model.get_output_embeddings().weight.shape[0] if model is not None else teacher.vocab_size)
    # a server that does not report its vocabulary (vLLM) cannot be checked here
    if teacher_v is not None and (teacher_v < n or (model is None and teacher_v != n)):
        raise UserError(
            f"student and teacher vocabularies differ ({n} tokenizer ids vs {teacher_v} teacher ids); "
            "on-policy distillation needs one shared tokenizer. Pick a teacher from the same model "
            "family, or a student whose tokenizer matches the teacher's."
        )


def _describe_difference(a: dict, b: dict) -> str:
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    moved = sorted(t for t in a.keys() & b.keys() if a[t] != b[t])
    parts = [f"{len(a)} vs {len(b)} tokens"]
    if only_a:
        parts.append(f"{len(only_a)} only in the student's (e.g. {only_a[0]!r})")
    if only_b:
        parts.append(f"{len(only_b)} only in the teacher's (e.g. {only_b[0]!r})")
    if moved:
        parts.append(f"{len(moved)} with other ids (e.g. {moved[0]!r}: {a[moved[0]]} vs {b[moved[0]]})")
    return ", ".join(parts)


SPECIAL_ROLES = ("eos_token", "bos_token", "unk_token")


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """One line if the two tokenizers map any token to different ids (added tokens included);
    a note on stderr when a special-token role differs (an instruct model's ``eos`` is often
    ``<|im_end|>`` where its base model's is ``<|endoftext|>``: both ids exist on both sides,
    and the rollout stops at the student's)."""
    a, b = student_tok.get_vocab(), teacher_tok.get_vocab()
    if a != b:
        raise UserError(
            f"student and teacher tokenizers differ ({_describe_difference(a, b)}); on-policy distillation "
            "needs one shared tokenizer. Pick a teacher from the same model family, or a student whose "
            "tokenizer matches the teacher's."
        )
    roles = [r for r in SPECIAL_ROLES if getattr(student_tok, r, None) != getattr(teacher_tok, r, None)]
    for role in roles:
        print(f"opd: note: student and teacher tokenizers share their ids but not their {role} "
              f"({getattr(student_tok, role, None)!r} vs {getattr(teacher_tok, role, None)!r}); the student's is used",
              file=sys.stderr)


def optional_tokenizer(path: str | Path):
    """The tokenizer saved in model directory ``path``, or None when it holds none."""
    where = Path(path).expanduser()
    if where.is_dir() and not any((where / f).exists() for f in TOKENIZER_FILES):
        return None
    return load_tokenizer(str(path), what="teacher")


def completion_hidden(model: PreTrainedModel, batch: SeqBatch) -> torch.Tensor:
    """Final hidden states that predict each completion token: ``[B, T, H]``, on the model's
    device (the batch is moved there if it is elsewhere)."""
    batch = batch.to(model_device(model))
    out = decoder_of(model)(
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


def scores_from_hidden(hidden_BTH: torch.Tensor, head: tuple, tokens_BT: torch.Tensor, *, topk: int,
                       temperature: float, chunk_size: int | None = None) -> Scores:
    """Token log-probs, entropy and top-K of ``softmax(head(h) / temperature)`` at every
    position, ``chunk_size`` positions at a time, plus the hidden states and the head
    themselves (``full``: any consumer makes the logits chunk by chunk)."""
    weight_VH, bias_V = (t.detach() for t in head) if head[1] is not None else (head[0].detach(), None)
    B, T, H = hidden_BTH.shape
    V = weight_VH.shape[0]
    k, C = min(topk, V), chunk_size or default_chunk_size(V)
    h_NH, tokens_N = hidden_BTH.reshape(B * T, H), tokens_BT.reshape(B * T)
    parts = [chunk_scores(torch.nn.functional.linear(h_NH[s : s + C], weight_VH, bias_V), tokens_N[s : s + C], k, temperature)
             for s in range(0, max(B * T, 1), C)]
    token_N, entropy_N, ids_NK, topk_N = (torch.cat(p) for p in zip(*parts))
    return Scores(token_N.view(B, T), entropy_N.view(B, T), ids_NK.view(B, T, k), topk_N.view(B, T, k),
                  hidden_BTH=hidden_BTH.detach(), head=(weight_VH, bias_V))


class HFTeacher:
    """A local causal LM as a teacher: one no-grad scoring pass per ``score`` call.

    Without ``full``, :func:`opd.models.scoring.lean_scores`: packed length buckets of at
    most ``bucket_tokens`` padded cells (``call_cost``: an extra decoder call's worth in
    cells), the LM head on kept positions only, chunk by chunk. With ``full``, the plain
    padded pass, returning the completion hidden states and the LM head (cut to the
    tokenizer's ids) instead of ``[B, T, V]`` logits (:meth:`Scores.full_logits_BTV`)."""

    def __init__(self, model: PreTrainedModel, *, eos_id: int, pad_id: int,
                 bucket_tokens: int = BUCKET_TOKENS, call_cost: int = CALL_COST):
        self.model = model.eval()
        self.eos_id, self.pad_id = eos_id, pad_id
        self.full_logits = True  # can return full next-token logits (a server may not)
        self.bucket_tokens, self.call_cost = bucket_tokens, call_cost

    @property
    def vocab_size(self) -> int:
        """The ids the teacher scores: its head's rows, or the tokenizer's after set-up
        cut a padded head (:func:`opd.models.head.restrict_head`)."""
        return head_rows(self.model.get_output_embeddings())

    @torch.no_grad()
    def score(self, batch: SeqBatch, *, topk: int = 8, full: bool = False, temperature: float = 1.0) -> Scores:
        """Scores on the teacher's device (the batch is moved there)."""
        batch = batch.to(model_device(self.model))
        if not full:
            return lean_scores(self.model, batch, topk=topk, temperature=temperature,
                               max_tokens=self.bucket_tokens, call_cost=self.call_cost)
        return scores_from_hidden(self.hidden_in_groups(batch), head_params(self.model.get_output_embeddings()),
                                  batch.completion_ids_BT, topk=topk, temperature=temperature)

    def hidden_in_groups(self, batch: SeqBatch) -> torch.Tensor:
        """``completion_hidden`` of the batch, its rows in groups of at most ``bucket_tokens``
        padded cells per decoder call (the teacher scored in micro-batches)."""
        B, L = batch.input_ids_BL.shape
        rows = max(1, self.bucket_tokens // max(L, 1))
        return torch.cat([completion_hidden(self.model, batch.select(slice(s, s + rows))) for s in range(0, B, rows)])

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
