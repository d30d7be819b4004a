"""Build a run's components from its config (the only place the config is read).

Everything is checked before anything is written: a missing teacher, reference
solutions a method needs, or mismatched vocabularies fail here with a message that says
what is missing and how to provide it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opd.errors import UserError

import torch

from opd.methods import build_method
from opd.methods.base import Method, RolloutEnv
from opd.methods.degeneracy import warn_at_setup
from opd.models.hf import HFTeacher, check_same_vocab, load_model, load_tokenizer
from opd.run.sources import lookup, task_source
from opd.tasks.base import Problem
from opd.config.train import TrainConfig


@dataclass
class Setup:
    env: RolloutEnv
    method: Method
    tokenizer: object
    train_pool: list[Problem]
    eval_problems: list[Problem]


def make_task(cfg: TrainConfig):
    """The run's task: the dataset when one is given, else the named task (``task=addition``)."""
    if cfg.dataset:
        from opd.tasks.dataset import DatasetTask

        return DatasetTask(cfg.dataset, verifier=cfg.verifier, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    return task_source(cfg.task)(cfg.horizon)


def resolve_student(cfg: TrainConfig) -> str:
    """A model directory or hub id: ``student`` itself, or what a named source gives."""
    source = lookup("student", cfg.student)
    return cfg.student if source is None else str(source(vars(cfg)))


def make_teacher(cfg: TrainConfig, task, tokenizer):
    """None, a named source's teacher (``teacher=oracle``), or a model loaded from its path."""
    source = lookup("teacher", cfg.teacher)
    if cfg.teacher is None:
        return None
    made = cfg.teacher if source is None else source(vars(cfg), task, tokenizer)
    if not isinstance(made, (str, Path)):
        return made
    return HFTeacher(load_model(str(made), cfg.dtype), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)


PRIVILEGED_TEMPLATE = (
    "{prompt}\n\nHere is a reference solution:\n{solution}\n\n"
    "After reading it, solve the problem above in your own way."
)
REFINE_TEMPLATE = (
    "{prompt}\n\nHere is a draft solution:\n{draft}\n\nRewrite the draft: keep its structure and its "
    "correct steps, fix its errors, and output only the rewritten solution."
)


def _use_chat(tokenizer, chat_template: str, dataset: bool) -> bool:
    if chat_template == "on" and not tokenizer.chat_template:
        raise UserError("chat_template=on but the tokenizer has no chat template; use chat_template=off.")
    return dataset and (chat_template == "on" or (chat_template == "auto" and bool(tokenizer.chat_template)))


def text_encoder(tokenizer, use_chat: bool):
    """Text -> prompt ids, wrapped as a user turn of the chat template when ``use_chat``."""

    def encode(text: str) -> list[int]:
        if use_chat:
            msgs = [{"role": "user", "content": text}]
            out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        return tokenizer(text, add_special_tokens=True)["input_ids"]

    return encode


def prompt_encoder(tokenizer, chat_template: str, dataset: bool):
    encode = text_encoder(tokenizer, _use_chat(tokenizer, chat_template, dataset))
    return lambda problem: encode(problem.prompt)


def context_encoders(tokenizer, chat_template: str, dataset: bool):
    """(privileged, refine) prompt encoders for OPSD/DASD and TRD teacher contexts.

    Datasets: the problem, then the reference solution (or the draft) and an instruction,
    as text (chat-wrapped like the prompt). Testbed: the solution's (or the draft's) words
    in front of the problem, ``<bos> y* x``; the oracle reads the problem from its last
    task keyword, so it scores these contexts exactly as it scores ``x``.
    """
    encode = text_encoder(tokenizer, _use_chat(tokenizer, chat_template, dataset))
    special = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}

    def draft_text(draft_ids: list[int]) -> str:
        return tokenizer.decode([i for i in draft_ids if i not in special], skip_special_tokens=True)

    if dataset:
        return (
            lambda p: encode(PRIVILEGED_TEMPLATE.format(prompt=p.prompt, solution=p.solution)),
            lambda p, draft: encode(REFINE_TEMPLATE.format(prompt=p.prompt, draft=draft_text(draft))),
        )
    return (
        lambda p: encode(f"{p.solution} {p.prompt}"),
        lambda p, draft: encode(f"{draft_text(draft)} {p.prompt}".strip()),
    )


def solution_encoder(tokenizer):
    def encode(problem: Problem) -> list[int]:
        return tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    return encode


def completion_verifier(task, tokenizer):
    def verify(problem: Problem, completion_ids: list[int]) -> bool:
        return task.verify(problem, tokenizer.decode(completion_ids, skip_special_tokens=True))

    return verify


def check_needs(method: Method, teacher, train_pool: list[Problem], group_size: int) -> None:
    if group_size < method.min_group_size:
        raise UserError(f"method {method.name!r} needs group_size >= {method.min_group_size} rollouts per prompt; got {group_size}.")
    if "teacher" in method.needs and teacher is None:
        raise UserError(f"method {method.name!r} needs a teacher; set teacher=PATH_OR_HUB_ID (or teacher=oracle on the testbed).")
    if "verifier" in method.needs and not all(p.answer for p in train_pool):
        n = sum(not p.answer for p in train_pool)
        raise UserError(
            f"method {method.name!r} needs a verifier, but {n} of {len(train_pool)} training rows have no 'answer' "
            "field to check completions against; add answers to the dataset, or use a method that needs only a "
            "teacher (opd, topk_lsm, tip, eopd, gkd, ...)."
        )
    if "full_teacher" in method.needs and teacher is not None and not getattr(teacher, "full_logits", True):
        raise UserError(
            f"method {method.name!r} computes a full-vocabulary loss, but the teacher only returns top-K "
            "log-probs; use a local teacher model, or a method that needs only sampled-token log-probs (opd, trunc, gopd)."
        )
    if "teacher_generate" in method.needs and teacher is not None and not hasattr(teacher, "generate"):
        raise UserError(f"method {method.name!r} needs a teacher that can generate text; this teacher only scores.")
    if "solutions" in method.needs and not all(p.solution for p in train_pool):
        n = sum(not p.solution for p in train_pool)
        raise UserError(
            f"method {method.name!r} needs reference solutions, but {n} of {len(train_pool)} training rows have no "
            "'solution' field; add it to the dataset, or use a setting that does not need it "
            "(sft_source=teacher, gkd with lmbda=1 or seq_kd=true)."
        )


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def special_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's special ids except EOS (stopping is a real decision, it is trained)."""
    ids = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    return tuple(sorted(i for i in ids if i is not None))


SENTENCE_ENDS = (".", "!", "?", ";", "\u3002", "\uff01", "\uff1f", "\uff1b")


def boundary_ids(tokenizer) -> tuple[int, ...]:
    """Ids whose text ends a sentence, a line or a testbed step: the decoded token holds a
    newline or, right-stripped, ends with one of :data:`SENTENCE_ENDS` (special ids never)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    special = set(tokenizer.all_special_ids)
    return tuple(
        i for i, t in enumerate(texts) if i not in special and ("\n" in t or t.rstrip().endswith(SENTENCE_ENDS))
    )


def build_setup(cfg: TrainConfig, student=None) -> Setup:
    """Student, tokenizer, teacher, data and the method, checked against each other."""
    task = make_task(cfg)
    student_path = resolve_student(cfg)
    tokenizer = load_tokenizer(student_path)
    student = student if student is not None else load_model(student_path, cfg.dtype)
    method = build_method(cfg.method, vars(cfg))
    # a method that never asks a teacher (sft on solutions, grpo, opsd) runs on a dataset
    # with the default teacher=oracle; the oracle is still built on the testbed (reports use it)
    unused_oracle = cfg.teacher == "oracle" and bool(cfg.dataset) and "teacher" not in method.needs
    teacher = None if unused_oracle else make_teacher(cfg, task, tokenizer)
    if teacher is not None:
        check_same_vocab(student, teacher.vocab_size, len(tokenizer))
    reference = frozen(load_model(student_path, cfg.dtype)) if "reference" in method.needs else None
    train_pool = task.problems("train", None, cfg.seed) if cfg.dataset else task.problems("train", 4096, cfg.seed)
    check_needs(method, teacher, train_pool, cfg.group_size)
    privileged, refine = context_encoders(tokenizer, cfg.chat_template, bool(cfg.dataset))
    env = RolloutEnv(
        student=student, teacher=teacher, encode_prompt=prompt_encoder(tokenizer, cfg.chat_template, bool(cfg.dataset)),
        encode_solution=solution_encoder(tokenizer), verify=completion_verifier(task, tokenizer),
        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, group_size=cfg.group_size,
        encode_privileged=privileged, encode_refine=refine, reference=reference,
        special_ids=special_ids(tokenizer), vocab_size=len(tokenizer),
        boundary_ids=boundary_ids(tokenizer) if "boundaries" in method.needs else (),
    )
    warn_at_setup(method, env)  # a method that reduces to another one here says so (opd.methods.degeneracy)
    eval_n = None if cfg.dataset else cfg.eval_size
    eval_problems = task.problems(cfg.eval_split, eval_n, 0)[: cfg.eval_size]  # one held-out set for all seeds
    return Setup(env, method, tokenizer, train_pool, eval_problems)
