"""Build a run's components from its config (the only place the config is read).

Everything is checked before anything is written: a missing teacher, reference
solutions a method needs, or mismatched vocabularies fail here with a message that says
what is missing and how to provide it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from opd.errors import UserError

import torch

from opd.methods import build_method
from opd.methods.base import Method, RolloutEnv
from opd.methods.degeneracy import warn_at_setup
from opd.models import lora
from opd.models.device import autocast_dtype, resolve_device
from opd.models.head import restrict_head
from opd.models.http_teacher import HTTPTeacher, is_http
from opd.models.hf import HFTeacher, check_vocabularies, load_model, load_tokenizer, optional_tokenizer
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
    data_counts: dict[str, int] = field(default_factory=dict)  # data/prompts, data/prompts_too_long, data/eval_duplicates


def make_task(cfg: TrainConfig):
    """The run's task: the dataset when one is given, else the named task (``task=addition``)."""
    if cfg.dataset:
        from opd.tasks.dataset import DatasetTask

        return DatasetTask(cfg.dataset, verifier=cfg.verifier, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    return task_source(cfg.task)(cfg.horizon)


def resolve_student(cfg: TrainConfig) -> str:
    """A model directory or hub id: ``student`` itself, or what a named source gives."""
    source = lookup("student", cfg.student)
    if source is None and cfg.base_seed:
        raise UserError(f"base_seed={cfg.base_seed} picks the seed of a testbed student base (student=testbed, "
                        f"testbed-x4, ...); student={cfg.student} is a model of its own: drop base_seed")
    return cfg.student if source is None else str(source(vars(cfg)))


def make_teacher(cfg: TrainConfig, task, tokenizer):
    """``(teacher, its tokenizer)``: ``(None, None)``, a named source's teacher
    (``teacher=oracle``: a program, no tokenizer of its own), or a model loaded from its path
    with the tokenizer saved beside it (None when the directory holds none)."""
    if cfg.teacher is None:
        return None, None
    if is_http(cfg.teacher):
        return HTTPTeacher(cfg.teacher, timeout_s=cfg.teacher_timeout_s, retries=cfg.teacher_retries,
                           concurrency=cfg.teacher_concurrency, api_key=cfg.teacher_api_key), None
    source = lookup("teacher", cfg.teacher)
    made = cfg.teacher if source is None else source(vars(cfg), task, tokenizer)
    if not isinstance(made, (str, Path)):
        return made, None
    model = load_model(str(made), cfg.dtype, what="teacher").to(teacher_device(cfg))
    teacher_tok = optional_tokenizer(made) if Path(str(made)).expanduser().is_dir() else load_tokenizer(str(made), what="teacher")
    if teacher_tok is None:
        print(f"opd: note: the teacher directory {made} holds no tokenizer, so it cannot be compared with the "
              "student's; its ids are assumed to be the student tokenizer's", file=sys.stderr)
    return HFTeacher(model, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id), teacher_tok


def share_vocabulary(student, teacher, tokenizer, teacher_tokenizer, reference=None) -> None:
    """Check that both sides share the tokenizer, then cut every model's head to its
    ``len(tokenizer)`` ids (padded embedding rows are never sampled nor scored)."""
    check_vocabularies(student, tokenizer, teacher, teacher_tokenizer)
    for model in (student, getattr(teacher, "model", None), reference):
        if model is not None:
            restrict_head(model, len(tokenizer))


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
    """Refuse a method whose needs this run cannot meet (a pool drawn on demand is a
    synthetic task's: every problem has its answer and solution)."""
    train_pool = train_pool if isinstance(train_pool, list) else []
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
            "log-probs; use a local teacher model, or a method that works from top-K log-probs (opd, topk_lsm, trunc, gopd)."
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


def model_positions(*models) -> int | None:
    """The fewest positions among ``models`` (``config.max_position_embeddings``); None: unknown."""
    sizes = [getattr(getattr(m, "config", None), "max_position_embeddings", None) for m in models]
    sizes = [n for n in sizes if isinstance(n, int) and n > 0]
    return min(sizes) if sizes else None


def prompt_limit(max_prompt_tokens: int | None, max_new_tokens: int, positions: int | None) -> tuple[int | None, str]:
    """``(limit, why)``: the longest prompt in tokens, ``max_prompt_tokens``, by default what
    the model's ``positions`` leave beside ``max_new_tokens`` (None: no limit known). A prompt
    and its completion must fit the positions (a learned position table has no row beyond)."""
    if positions is None:
        return max_prompt_tokens, "max_prompt_tokens"
    room = positions - max_new_tokens
    if room < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {positions} "
                        f"positions; set max_new_tokens below {positions}")
    if max_prompt_tokens is None:
        return room, f"the model's {positions} positions minus max_new_tokens={max_new_tokens}; set max_prompt_tokens to choose"
    if max_prompt_tokens > room:
        raise UserError(f"max_prompt_tokens={max_prompt_tokens} plus max_new_tokens={max_new_tokens} exceeds the "
                        f"model's {positions} positions; lower one of them (max_prompt_tokens <= {room})")
    return max_prompt_tokens, "max_prompt_tokens"


def drop_long_prompts(problems: list[Problem], encode, limit: int | None, why: str, split: str) -> tuple[list[Problem], int]:
    """The problems whose encoded prompt has at most ``limit`` tokens, and how many were dropped.

    Dropped, not left-truncated: a prompt cut at the front loses its instruction or the
    question's start, and its answer would still be checked against the whole question."""
    if limit is None:
        return problems, 0
    if not isinstance(problems, list):  # drawn on demand: a sample checked, nothing dropped
        longest = max((len(encode(p)) for p in problems[:LAZY_CHECK]), default=0)
        if longest > limit:
            raise UserError(f"this task's {split} prompts run to {longest} tokens, over {limit} ({why}); raise "
                            "max_prompt_tokens, lower max_new_tokens, or use a model with more positions")
        return problems, 0
    kept = [p for p in problems if len(encode(p)) <= limit]
    if problems and not kept:
        raise UserError(f"all {len(problems)} {split} prompts are longer than {limit} tokens ({why}); raise "
                        "max_prompt_tokens, lower max_new_tokens, or use a model with more positions")
    return kept, len(problems) - len(kept)


def report_data(counts: dict[str, int], limit: int | None, why: str) -> None:
    """One note per thing the data set-up removed (printed once, at set-up)."""
    if counts.get("data/prompts_too_long"):
        print(f"opd: note: dropped {counts['data/prompts_too_long']} of {counts['data/prompts']} prompts (train and "
              f"held-out) longer than {limit} tokens ({why})", file=sys.stderr)
    if counts.get("data/eval_duplicates"):
        print(f"opd: note: removed {counts['data/eval_duplicates']} held-out rows whose prompt is also a training "
              "prompt (they would measure memorization)", file=sys.stderr)


# A synthetic task's training pool. 4,096 problems were too few: the testbed student's SFT
# (1,000 steps of 32) ended at 0.33 greedy validation accuracy on them, and at 1.00 (from
# step 800) on 65,536 drawn on demand.
SYNTHETIC_TRAIN_POOL = 1 << 16
EAGER_TRAIN_POOL = 4096  # a task without `pool` (a plug-in's): drawn at set-up
LAZY_CHECK = 256  # prompts of a pool drawn on demand checked at set-up (one task: one prompt shape)


def problem_pools(cfg: TrainConfig, task, encode, positions: int | None):
    """``(train_pool, eval_problems, counts)``: prompts longer than the limit dropped (and
    counted, with the held-out duplicates the task removed); one note each, once."""
    limit, why = prompt_limit(getattr(cfg, "max_prompt_tokens", None), cfg.max_new_tokens, positions)
    if cfg.dataset or not hasattr(task, "pool"):
        train_pool = task.problems("train", None if cfg.dataset else EAGER_TRAIN_POOL, cfg.seed)
    else:  # a synthetic task: drawn on demand
        train_pool = task.pool("train", SYNTHETIC_TRAIN_POOL, cfg.seed, correction_rate=cfg.correction_rate,
                               shorter_rate=cfg.shorter_rate)
    for key, reason in (("correction_rate", "their solutions can be corrected"), ("shorter_rate", "they have a horizon")):
        if getattr(cfg, key) and isinstance(train_pool, list):
            raise UserError(f"{key}={getattr(cfg, key):g} applies to the synthetic testbed tasks only "
                            f"({reason}); drop it for this task")
    eval_problems = task.problems(cfg.eval_split, None if cfg.dataset else cfg.eval_size, 0)
    n_prompts = len(train_pool) + len(eval_problems)
    train_pool, too_long = drop_long_prompts(train_pool, encode, limit, why, "training")
    eval_problems, eval_too_long = drop_long_prompts(eval_problems, encode, limit, why, "held-out")
    counts = {"data/prompts": n_prompts, "data/prompts_too_long": too_long + eval_too_long,
              "data/eval_duplicates": getattr(task, "eval_duplicates", 0)}
    report_data(counts, limit, why)
    return train_pool, eval_problems[: cfg.eval_size], counts  # one held-out set for all seeds


def teacher_device(cfg: TrainConfig) -> torch.device:
    """Where the teacher and the reference model run (``teacher_device``, else ``device``)."""
    if cfg.teacher_device is None:
        return resolve_device(cfg.device)
    return resolve_device(cfg.teacher_device, "teacher_device")


def enable_checkpointing(model) -> None:
    """The model's own activation checkpointing (non-reentrant); active in the update only
    (:func:`opd.run.loop.checkpointing`)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_student(path, cfg: TrainConfig):
    """The student in float32 (its master weights under bf16 autocast) on ``device``, with
    the model's own gradient checkpointing when asked, and LoRA adapters when ``lora_r > 0``:
    new ones, or (``path`` a saved adapter: a resumed run) the base student with that adapter."""
    adapter = lora.is_adapter(path)
    base_path = resolve_student(cfg) if adapter else path
    model = load_model(str(base_path), "float32", what="student")
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if adapter:
        model = lora.load_adapter(model, path)
    elif cfg.lora_r > 0:  # on the host: the adapters' initialization draws from the seeded CPU generator
        model = lora.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_target_modules,
                              seed=cfg.seed)
    return model.to(resolve_device(cfg.device))


def build_setup(cfg: TrainConfig, student=None) -> Setup:
    """Student, tokenizer, teacher, data and the method, checked against each other."""
    resolve_device(cfg.device), teacher_device(cfg)  # a bad device name fails before any loading
    task = make_task(cfg)
    student_path = resolve_student(cfg)
    tokenizer = load_tokenizer(student_path, what="student")
    student = student.to(resolve_device(cfg.device)) if student is not None else load_student(student_path, cfg)
    method = build_method(cfg.method, vars(cfg))
    # a method that never asks a teacher (sft on solutions, grpo, opsd) runs on a dataset
    # with the default teacher=oracle; the oracle is still built on the testbed (reports use it)
    unused_oracle = cfg.teacher == "oracle" and bool(cfg.dataset) and "teacher" not in method.needs
    teacher, teacher_tok = (None, None) if unused_oracle else make_teacher(cfg, task, tokenizer)
    reference = frozen(load_model(student_path, cfg.dtype).to(teacher_device(cfg))) if "reference" in method.needs else None
    share_vocabulary(student, teacher, tokenizer, teacher_tok, reference)
    encode = prompt_encoder(tokenizer, cfg.chat_template, bool(cfg.dataset))
    positions = model_positions(student, getattr(teacher, "model", None))
    train_pool, eval_problems, counts = problem_pools(cfg, task, encode, positions)
    check_needs(method, teacher, train_pool, cfg.group_size)
    privileged, refine = context_encoders(tokenizer, cfg.chat_template, bool(cfg.dataset))
    env = RolloutEnv(
        student=student, teacher=teacher, encode_prompt=encode,
        encode_solution=solution_encoder(tokenizer), verify=completion_verifier(task, tokenizer),
        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, group_size=cfg.group_size,
        encode_privileged=privileged, encode_refine=refine, reference=reference,
        special_ids=special_ids(tokenizer), vocab_size=len(tokenizer),
        boundary_ids=boundary_ids(tokenizer) if "boundaries" in method.needs else (),
        autocast=autocast_dtype(cfg.dtype),
    )
    warn_at_setup(method, env)  # a method that reduces to another one here says so (opd.methods.degeneracy)
    return Setup(env, method, tokenizer, train_pool, eval_problems, counts)
