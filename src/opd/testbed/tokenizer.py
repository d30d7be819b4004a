"""The testbed's one shared tokenizer: word-level over space-separated tokens.

Every testbed task (addition, modchain, ring) writes its prompts and solutions as words from
:data:`VOCAB`, separated by single spaces, so one model can be trained on any of them.
The tokenizer is a real ``transformers.PreTrainedTokenizerFast`` built locally (no hub),
saved and loaded with ``save_pretrained`` / ``from_pretrained`` like any other.

Conventions:
- No special token is added automatically: ``tok("add 1 + 2 =").input_ids`` is exactly the
  five word ids. Whoever builds training sequences appends ``eos_token_id`` to completions.
- ``decode(ids)`` gives the space-separated text back (``skip_special_tokens=True`` drops
  ``<pad>``/``<bos>``/``<eos>``/``<unk>``).
- ``padding_side="left"`` (prompts are left-padded, see :mod:`opd.batch`).
"""

from __future__ import annotations

from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
DIGITS = [str(i) for i in range(10)]
WAIT = "wait"  # correction onset: the step in progress (or the one just closed) is redone
ANS = "ans"  # starts the final answer
SEP = ";"  # ends a step
EQ = "="
OPS = ["+", "-", "*"]
WORDS = ["add", "mod", "start", *OPS, EQ, SEP, ANS, WAIT]
VOCAB = SPECIALS + DIGITS + WORDS  # id = index; 24 tokens


def build_tokenizer(extra_words: tuple[str, ...] = ()):
    """A fresh ``PreTrainedTokenizerFast`` over :data:`VOCAB` (word level, whitespace split).

    ``extra_words`` extend it for a task family that needs words of its own (the ring walk's
    ``ring``): they get the ids after :data:`VOCAB`, so every shared word keeps its id, and the
    models of the other families (and their cached bases) keep their vocabulary of 24."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = VOCAB + [w for w in extra_words if w not in VOCAB]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def save_tokenizer(path: str | Path):
    """Build the tokenizer and ``save_pretrained`` it to ``path``; returns the tokenizer."""
    tok = build_tokenizer()
    tok.save_pretrained(str(path))
    return tok


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained`` on a directory written by :func:`save_tokenizer`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
