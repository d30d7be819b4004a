"""The one flat, typed config of a training run (YAML + ``key=value`` overrides).

Its fields are the run's own settings, declared below, and every method's knobs, learned
from the method registry (:func:`opd.methods.knob_fields`): a knob is declared once, in
its method's builder. ``method`` accepts exactly the registered names.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import Field, create_model, field_validator, model_validator

from opd.config.loader import FlatConfig, load_config
from opd.methods import METHODS, knob_fields, method_recipe, method_settings

MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]  # the registered names


def _h(text: str, default: Any, **bounds) -> Any:
    return Field(default, description=text, **bounds)


class RunConfig(FlatConfig):
    """The run's own settings (the method knobs are added to it as :class:`TrainConfig`)."""

    # what to train, on what
    method: MethodName = _h("training method (see `opd methods`)", "opd")
    student: str = _h("student model dir or hub id; 'testbed' = the prepared tiny student base", "testbed")
    teacher: str | None = _h("teacher dir or hub id; 'oracle' (testbed program), 'testbed' (learned tiny teacher); http://HOST:PORT/v1 (an OpenAI-compatible server; comma-separated: several)", "oracle")
    dataset: str | None = _h("JSONL/Parquet with prompt, answer (, solution); unset = the synthetic testbed", None)
    task: str = _h("testbed task family", "addition")
    horizon: int = _h("testbed task horizon (number of chain-of-thought steps)", 4, ge=1)
    correction_rate: float = _h("testbed: fraction of training solutions (SFT data) with one corrected step "
                                "(a wrong word, 'wait', the step again)", 0.0, ge=0, le=1)
    shorter_rate: float = _h("testbed: fraction of training problems drawn at a shorter horizon (uniform in 1 .. horizon-1; "
                             "a curriculum over lengths for a long horizon's SFT); evaluation stays at the horizon", 0.0, ge=0, le=1)
    base_seed: int = _h("testbed: seed of the student base's SFT and damage (student=testbed, testbed-x4, testbed-wait, "
                        "testbed-d32 ...); 0 = the bases that ship with opd, another seed builds its own once (cached)", 0, ge=0)
    verifier: Literal["exact", "math"] = _h("answer check for datasets: exact match or math-verify", "exact")
    eval_fraction: float = _h("share of dataset rows held out for evaluation", 0.1, gt=0, lt=1)
    chat_template: Literal["auto", "on", "off"] = _h("wrap dataset prompts in the tokenizer's chat template", "auto")
    dtype: Literal["float32", "bfloat16", "float16"] = _h(
        "compute precision. float32: everything in float32. bfloat16: the teacher and the frozen reference "
        "hold bf16 weights; the student keeps float32 master weights and AdamW states and runs its forward "
        "passes under bf16 autocast; log-probs, entropies and divergences are float32. float16 is refused "
        "(its range overflows without loss scaling): use bfloat16", "float32")
    teacher_api_key: str | None = _h("API key of a server teacher (teacher=http://...); unset = $OPENAI_API_KEY", None)
    teacher_timeout_s: float = _h("seconds a server teacher's request may take", 30.0, gt=0)
    teacher_retries: int = _h("retries of a failed server-teacher request (exponential backoff)", 5, ge=0)
    teacher_concurrency: int = _h("server-teacher requests in flight at once", 16, ge=1)
    device: str = _h("where the student runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, mps", "auto", min_length=1)
    teacher_device: str | None = _h("where the teacher and the reference model run; unset = device", None, min_length=1)
    loss_kernel: Literal["auto", "eager", "compiled"] = _h(
        "the memory-lean divergences' per-chunk math: compiled (torch.compile's fused kernels: 3.1x the eager "
        "kernel's speed on an H200; the first step compiles, ~15 s), eager (in-place torch passes), or auto "
        "(compiled on a GPU, eager on the CPU; $OPD_LOSS_KERNEL, if set, decides)", "auto")
    gradient_checkpointing: bool = _h("recompute the student's activations in backward (the model's own checkpointing)", False)
    lora_r: int = _h("LoRA rank of the student's adapters (PEFT); 0 = train every weight", 0, ge=0)
    lora_alpha: float = _h("LoRA scale numerator (the adapters' output is scaled by lora_alpha / lora_r)", 16.0, gt=0)
    lora_dropout: float = _h("dropout on the adapters' input, in the update only", 0.0, ge=0, lt=1)
    lora_target_modules: str = _h("modules that get adapters: all-linear, or comma-separated names (q_proj,v_proj)", "all-linear", min_length=1)
    @field_validator("dtype")
    @classmethod
    def _no_float16(cls, value: str) -> str:
        if value == "float16":
            raise ValueError("float16 is not supported (its range overflows without loss scaling); use dtype=bfloat16")
        return value

    # the oracle teacher (testbed)
    oracle_sharpness: float = _h("oracle: logit gap of the intended token", 8.0, ge=0)
    oracle_noise: float = _h("oracle: probability spread on plausible-but-wrong tokens", 0.0, ge=0)
    oracle_decay: float = _h("oracle: extra noise per deviation (or per position)", 0.0, ge=0)
    oracle_decay_mode: Literal["deviations", "position"] = _h("oracle: what the decay counts", "deviations")
    oracle_recovers: bool = _h("oracle: correct a wrong prefix with 'wait' (else continue it)", True)
    oracle_recover_prob: float = _h("oracle: with oracle_recovers, the probability of recovering from a deviation "
                                    "(a mixture with the continuing oracle); 1 = always", 1.0, gt=0, le=1)
    oracle_noise_kind: Literal["uniform", "off_by_one"] = _h("oracle: noise spread over the plausible wrong words, "
                                                             "or all of it on the next digit (a biased error)", "uniform")
    oracle_noise_legal_only: bool = _h("oracle: the noise only on legal alternatives (the ring walk's other move), "
                                       "none elsewhere: samples that take detours and walk back", False)
    oracle_two_orders: bool = _h("oracle: on addition, a step's two operand digits may come in either order "
                                 "(its entropy at a step's first slot is then legitimately log 2)", False)
    oracle_blind_spot: int = _h("oracle: drop the carries of addition problems with at least this many carries in a "
                                "row, a verifiable blind spot reported apart (eval/accuracy_blind_spot); 0 = none", 0, ge=0)
    # optimisation
    steps: int = _h("optimizer steps", 40, ge=1)
    prompts_per_step: int = _h("prompts per optimizer step", 16, ge=1)
    group_size: int = _h("rollouts per prompt (on-policy methods)", 4, ge=1)
    micro_batch_size: int = _h("rows per forward/backward (gradient accumulation)", 64, ge=1)
    lr: float = _h("peak learning rate (AdamW)", 1e-4, gt=0)
    weight_decay: float = _h("AdamW weight decay", 0.0, ge=0)
    warmup_steps: int = _h("linear warm-up steps", 0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = _h("decay after warm-up", "constant")
    max_grad_norm: float = _h("gradient clipping (0 = off)", 1.0, ge=0)
    ppo_epochs: int = _h("updates per batch of experience", 1, ge=1)
    seed: int = _h("seed of the whole run", 0)
    budget_kind: Literal["steps", "sequences", "teacher_tokens", "wall_s"] = _h("usage counter that `budget` limits", "steps")
    budget: float | None = _h("stop (evaluate, checkpoint) once the budget_kind counter reaches this; `steps` stays the cap and the schedule's length", None, gt=0)
    # sampling
    max_new_tokens: int = _h("rollout length cap", 96, ge=1)
    max_prompt_tokens: int | None = _h("longest prompt in tokens; longer prompts are dropped (counted at start); unset = the model's positions minus max_new_tokens", None, ge=1)
    temperature: float = _h("rollout sampling temperature (0 = greedy)", 1.0, ge=0)
    top_p: float = _h("rollout nucleus sampling", 1.0, gt=0, le=1)
    # evaluation, checkpoints, logs
    eval_every: int = _h("evaluate every N steps (0 = only at start and end)", 10, ge=0)
    eval_size: int = _h("held-out prompts per evaluation", 128, ge=1)
    eval_split: Literal["test", "val"] = _h("which held-out split evaluations use (val: for tuning)", "test")
    eval_k: int = _h("samples per prompt for pass@k", 4, ge=1)
    eval_temperature: float = _h("sampling temperature of pass@k (0 = greedy)", 1.0, ge=0)
    save_every: int = _h("checkpoint every N steps (0 = only at the end)", 0, ge=0)
    keep_last: int = _h("checkpoints kept in run_dir/checkpoints, the newest (0 = keep all)", 3, ge=0)
    max_nonfinite_steps: int = _h("stop after this many steps in a row with a non-finite loss or gradient (each is skipped)", 3, ge=1)
    run_dir: str = _h("where logs and checkpoints go", "runs/default", min_length=1)
    resume: bool = _h("continue from the latest checkpoint in run_dir", False)
    overwrite: bool = _h("allow a fresh run in a run_dir that already has checkpoints", False)
    tensorboard: bool = _h("also write TensorBoard event files", False)
    progress: bool = _h("show a progress bar", True)

    @model_validator(mode="after")
    def _budget_needs_a_value(self):
        if self.budget_kind != "steps" and self.budget is None:
            raise ValueError(f"budget_kind={self.budget_kind} needs a budget: set budget=N (or budget_kind=steps)")
        return self

    @model_validator(mode="after")
    def _recover_prob_needs_a_recovering_oracle(self):
        if self.oracle_recover_prob < 1 and not self.oracle_recovers:
            raise ValueError("oracle_recover_prob < 1 mixes the recovering oracle with the continuing one, so it needs "
                             "oracle_recovers=true (oracle_recovers=false is the continuing oracle alone)")
        return self


def make_train_config(methods: dict[str, Callable] = METHODS) -> type[RunConfig]:
    """The run config for a method registry: the run's fields, ``method`` restricted to the
    registered names, and every method's knobs as fields."""
    for name in methods:
        missing = [p for p in method_settings(name, methods) if p not in RunConfig.model_fields]
        if missing:
            raise TypeError(f"method {name!r}: builder parameters {missing} are neither knobs (see opd.methods.knobs) nor run settings")
    model = create_model(
        "TrainConfig", __base__=RunConfig, __module__=__name__,
        method=(Literal[tuple(methods)], _h("training method (see `opd methods`)", "opd" if "opd" in methods else next(iter(methods)))),
        **knob_fields(methods),
    )
    model.__doc__ = "A run's config: the run's settings and every method's knobs."
    return model


TrainConfig = make_train_config()


def train_config(path, overrides, base: dict | None = None):
    """The run's config: defaults, then the method's recipe, then ``base`` (a mapping of
    settings, e.g. from ``opd compare``), then the YAML file, then ``key=value`` overrides
    (later wins). Returns (config, the recipe keys as applied).

    The config's ``model_fields_set`` are the keys given (``base``, file, overrides), not
    the recipe's: on ``resume=true`` the others come from the checkpoint."""
    cfg = load_config(TrainConfig, path, overrides, base=base)
    recipe = method_recipe(cfg.method)
    if recipe:
        given = set(cfg.model_fields_set)
        cfg = load_config(TrainConfig, path, overrides, base={**recipe, **(base or {})})
        cfg = TrainConfig.model_construct(_fields_set=given, **cfg.model_dump())
    return cfg, {k: getattr(cfg, k) for k in recipe}
