"""Build a run's components from its config (the only place the config is read).

Everything is checked before anything is written: a missing teacher, reference
solutions a method needs, or mismatched vocabularies fail here with a message that says
what is missing and how to provide it.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.errors import UserError

import torch

from opd.methods import build_method
from opd.methods.base import Method, RolloutEnv
from opd.models.hf import HFTeacher, check_same_vocab, load_model, load_tokenizer
from opd.tasks.base import Problem
from opd.train_config import TrainConfig


@dataclass
class Setup:
    env: RolloutEnv
    method: Method
    tokenizer: object
    train_pool: list[Problem]
    eval_problems: list[Problem]


def make_task(cfg: TrainConfig):
    if cfg.dataset:
        from opd.tasks.dataset import DatasetTask

        return DatasetTask(cfg.dataset, verifier=cfg.verifier, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    from opd.tasks.registry import make_task as make_testbed_task

    return make_testbed_task(cfg.task, cfg.horizon)


def resolve_student(cfg: TrainConfig) -> str:
    if cfg.student != "testbed":
        return cfg.student
    from opd.testbed import prepare_student_base

    return str(prepare_student_base(cfg.task, cfg.horizon))


def make_teacher(cfg: TrainConfig, task, tokenizer):
    if cfg.teacher is None:
        return None
    if cfg.teacher == "oracle":
        if cfg.dataset:
            raise UserError("teacher=oracle only knows the synthetic testbed tasks; with dataset=... give a model path.")
        from opd.tasks.oracle import OracleTeacher

        return OracleTeacher(
            task, tokenizer, sharpness=cfg.oracle_sharpness, noise=cfg.oracle_noise,
            decay=cfg.oracle_decay, decay_mode=cfg.oracle_decay_mode, recovers=cfg.oracle_recovers,
        )
    path = cfg.teacher
    if cfg.teacher == "testbed":
        from opd.testbed import prepare_teacher

        path = str(prepare_teacher(cfg.task, cfg.horizon))
    return HFTeacher(load_model(path, cfg.dtype), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)


def prompt_encoder(tokenizer, chat_template: str, dataset: bool):
    use_chat = dataset and (chat_template == "on" or (chat_template == "auto" and tokenizer.chat_template))
    if chat_template == "on" and not tokenizer.chat_template:
        raise UserError("chat_template=on but the tokenizer has no chat template; use chat_template=off.")

    def encode(problem: Problem) -> list[int]:
        if use_chat:
            msgs = [{"role": "user", "content": problem.prompt}]
            out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        return tokenizer(problem.prompt, add_special_tokens=True)["input_ids"]

    return encode


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
    if "solutions" in method.needs and not all(p.solution for p in train_pool):
        n = sum(not p.solution for p in train_pool)
        raise UserError(
            f"method {method.name!r} needs reference solutions, but {n} of {len(train_pool)} training rows have no "
            "'solution' field; add it to the dataset, or use a setting that does not need it "
            "(sft_source=teacher, gkd with lmbda=1 or seq_kd=true)."
        )


def build_setup(cfg: TrainConfig, student=None) -> Setup:
    """Student, tokenizer, teacher, data and the method, checked against each other."""
    task = make_task(cfg)
    student_path = resolve_student(cfg)
    tokenizer = load_tokenizer(student_path)
    student = student if student is not None else load_model(student_path, cfg.dtype)
    teacher = make_teacher(cfg, task, tokenizer)
    if teacher is not None:
        check_same_vocab(student, teacher.vocab_size, len(tokenizer))
    method = build_method(cfg.method, vars(cfg))
    train_pool = task.problems("train", None, cfg.seed) if cfg.dataset else task.problems("train", 4096, cfg.seed)
    check_needs(method, teacher, train_pool, cfg.group_size)
    env = RolloutEnv(
        student=student, teacher=teacher, encode_prompt=prompt_encoder(tokenizer, cfg.chat_template, bool(cfg.dataset)),
        encode_solution=solution_encoder(tokenizer), verify=completion_verifier(task, tokenizer),
        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, group_size=cfg.group_size,
    )
    eval_n = None if cfg.dataset else cfg.eval_size
    eval_problems = task.problems(cfg.eval_split, eval_n, 0)[: cfg.eval_size]  # one held-out set for all seeds
    return Setup(env, method, tokenizer, train_pool, eval_problems)
