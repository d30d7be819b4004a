"""Shared by the tests: running ``opd`` in a subprocess, a word-level tokenizer with a chat template."""

from __future__ import annotations

import os
from pathlib import Path

import opd


def subprocess_env() -> dict:
    """The subprocess imports this ``opd``, with one thread like the tests."""
    src = str(Path(opd.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def experiment_script(name: str):
    """``experiments/<name>.py`` imported as a module (the scripts import each other: probed, run)."""
    import importlib.util
    import sys

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    if str(experiments) not in sys.path:
        sys.path.insert(0, str(experiments))
    spec = importlib.util.spec_from_file_location(name, experiments / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_cli_args(student: str, run_dir: Path) -> list[str]:
    """``tiny_cfg``'s settings as ``key=value``."""
    return [f"student={student}", "teacher=oracle", "prompts_per_step=4", "group_size=2", "micro_batch_size=3",
            "max_new_tokens=40", "eval_every=0", "eval_size=8", "eval_k=2", f"run_dir={run_dir}", "progress=false", "lr=1e-3"]


CHAT = "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def word_tokenizer(words: list[str]):
    """A word-level ``PreTrainedTokenizerFast`` (id = index in ``words``) with a tiny chat
    template; ``words`` holds ``<pad>``, ``<eos>`` and ``<unk>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT
    return fast
