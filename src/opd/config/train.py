"""The one flat, typed config of a training run (YAML + ``key=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MethodName = Literal[
    "sft", "grpo", "opd", "gkd",
    "trunc", "topd", "popd", "skd", "trd", "minillm", "opsd", "dasd",
    "topk_lsm", "tip", "scope", "eopd", "prune_opd", "suffix_fade", "stable_opd", "srpo", "gopd",
]


def _h(text: str, default):
    return field(default=default, metadata={"help": text})


def _check_horizon_knobs(cfg) -> None:
    """Ranges of the rollout-budget and horizon-decay knobs (trunc/topd/popd/prune_opd/suffix_fade)."""
    for key in ("trunc_tokens", "prune_k", "fade_k", "fade_window"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    unit = {"horizon_frac": (0, 1), "popd_start_frac": (0, 1), "prune_delta": (0, 1), "prune_eta": (0, 1),
            "prune_w_min": (0, 1), "prune_quantile": (0, 1)}
    for key, (lo, hi) in unit.items():
        if not lo <= getattr(cfg, key) <= hi or (key in ("horizon_frac", "popd_start_frac", "prune_eta") and getattr(cfg, key) == 0):
            raise ValueError(f"config key {key!r} must be in [{lo}, {hi}] (and > 0 for fractions and eta), got {getattr(cfg, key)}")
    if cfg.popd_ramp_frac < 0 or cfg.prune_grow < 1 or cfg.fade_penalty < 0:
        raise ValueError("config keys 'popd_ramp_frac' and 'fade_penalty' must be >= 0 and 'prune_grow' >= 1")


@dataclass
class TrainConfig:
    # what to train, on what
    method: MethodName = _h("training method (see `opd methods`)", "opd")
    student: str = _h("student model dir or hub id; 'testbed' = the prepared tiny student base", "testbed")
    teacher: str | None = _h("teacher dir or hub id; 'oracle' (testbed program), 'testbed' (learned tiny teacher)", "oracle")
    dataset: str | None = _h("JSONL/Parquet with prompt, answer (, solution); unset = the synthetic testbed", None)
    task: str = _h("testbed task family", "addition")
    horizon: int = _h("testbed task horizon (number of chain-of-thought steps)", 4)
    verifier: Literal["exact", "math"] = _h("answer check for datasets: exact match or math-verify", "exact")
    eval_fraction: float = _h("share of dataset rows held out for evaluation", 0.1)
    chat_template: Literal["auto", "on", "off"] = _h("wrap dataset prompts in the tokenizer's chat template", "auto")
    dtype: Literal["float32", "bfloat16", "float16"] = _h("model weights dtype", "float32")
    # the oracle teacher (testbed)
    oracle_sharpness: float = _h("oracle: logit gap of the intended token", 8.0)
    oracle_noise: float = _h("oracle: probability spread on plausible-but-wrong tokens", 0.0)
    oracle_decay: float = _h("oracle: extra noise per deviation (or per position)", 0.0)
    oracle_decay_mode: Literal["deviations", "position"] = _h("oracle: what the decay counts", "deviations")
    oracle_recovers: bool = _h("oracle: correct a wrong prefix with 'wait' (else continue it)", True)
    # optimisation
    steps: int = _h("optimizer steps", 40)
    prompts_per_step: int = _h("prompts per optimizer step", 16)
    group_size: int = _h("rollouts per prompt (on-policy methods)", 4)
    micro_batch_size: int = _h("rows per forward/backward (gradient accumulation)", 64)
    lr: float = _h("peak learning rate (AdamW)", 1e-4)
    weight_decay: float = _h("AdamW weight decay", 0.0)
    warmup_steps: int = _h("linear warm-up steps", 0)
    lr_schedule: Literal["constant", "linear", "cosine"] = _h("decay after warm-up", "constant")
    max_grad_norm: float = _h("gradient clipping (0 = off)", 1.0)
    ppo_epochs: int = _h("updates per batch of experience", 1)
    seed: int = _h("seed of the whole run", 0)
    budget_kind: Literal["steps", "sequences", "teacher_tokens", "wall_s"] = _h("usage counter that `budget` limits", "steps")
    budget: float | None = _h("stop (evaluate, checkpoint) once the budget_kind counter reaches this; `steps` stays the cap and the schedule's length", None)
    # sampling
    max_new_tokens: int = _h("rollout length cap", 96)
    temperature: float = _h("rollout sampling temperature", 1.0)
    top_p: float = _h("rollout nucleus sampling", 1.0)
    # method knobs (each method reads the ones its builder names)
    gamma: float = _h("opd: reward-to-go discount (0 per-token, 1 sequence-level)", 0.0)
    kl_coef: float = _h("opd: coefficient of the per-token reverse-KL reward", 1.0)
    opd_loss: Literal["is", "ppo"] = _h("opd: importance sampling or PPO-clipped ratio", "is")
    clip_eps: float = _h("grpo/opd: PPO clip range", 0.2)
    adv_scale: Literal["std", "none"] = _h("grpo: divide group advantages by their std", "std")
    beta: float = _h("gkd: JSD mixture weight (0 forward KL, 1 reverse KL)", 0.5)
    lmbda: float = _h("gkd: probability of an on-policy step", 0.5)
    seq_kd: bool = _h("gkd: off-policy steps use teacher samples instead of dataset solutions", False)
    loss_temperature: float = _h("gkd: temperature of the divergence", 1.0)
    sft_source: Literal["dataset", "teacher"] = _h("sft: reference solutions or teacher samples", "dataset")
    # rollout length budget (trunc / topd / popd; METHODS §14)
    trunc_tokens: int = _h("trunc: response tokens generated and distilled (ESR's N)", 100)
    horizon_frac: float = _h("topd: rollout horizon as a fraction of max_new_tokens", 0.1)
    popd_start_frac: float = _h("popd: horizon fraction at step 0", 0.1)
    popd_schedule: Literal["linear", "geometric"] = _h("popd: how the horizon grows", "linear")
    popd_ramp_frac: float = _h("popd: share of the run's steps after which the horizon is full", 1.0)
    # trajectory-changing methods (METHODS §15-16)
    skd_block: int = _h("skd: student tokens proposed per block (the paper's gamma)", 5)
    skd_topk: int = _h("skd: a proposed token is accepted if in the teacher's top-K", 25)
    skd_temperature: float = _h("skd: teacher sampling temperature of replacements", 0.2)
    skd_top_p: float = _h("skd: teacher nucleus of replacements", 0.5)
    skd_loss: Literal["fkl", "rkl", "jsd"] = _h("skd: divergence on the resulting sequence (jsd uses beta)", "fkl")
    trd_refine: Literal["prompt", "prefix"] = _h("trd: teacher refines from the refine prompt, or continues the draft's teacher-accepted prefix", "prompt")
    trd_context: Literal["refine", "plain"] = _h("trd: teacher scores y_r behind the refine prompt (official) or plain x", "refine")
    trd_loss: Literal["fkl", "rkl"] = _h("trd: divergence along the refined rollout", "fkl")
    refine_temperature: float = _h("trd: teacher sampling temperature when refining (0 = greedy)", 0.0)
    trd_topk: int = _h("trd (prefix mode): draft tokens are kept while in the teacher's top-K (ties included)", 5)
    # MiniLLM (METHODS §4)
    mix_alpha: float = _h("minillm: teacher share of the mixed sampling distribution", 0.2)
    minillm_gamma: float = _h("minillm: discount of the long-term reward", 0.95)
    reward_scale: float = _h("minillm: reward scaling", 0.5)
    reward_clip: float = _h("minillm: reward clip (absolute)", 100.0)
    minillm_whiten: bool = _h("minillm: whiten the long-term advantages over the step's tokens (LMOps)", True)
    minillm_future: Literal["from_t", "after_t"] = _h("minillm: return from t incl. r_t (code) or after t (paper R_{t+1})", "from_t")
    # self-distillation (METHODS §5, §10)
    opsd_divergence: Literal["fkl", "jsd", "rkl"] = _h("opsd: full-vocabulary divergence (v3 fkl; v1 jsd with beta)", "fkl")
    opsd_clip: float = _h("opsd: per-vocabulary-entry clip tau (0 = off)", 0.05)
    opsd_sampled: bool = _h("opsd: sampled-token advantage instead of the full-vocabulary divergence", False)
    dasd_rho: float = _h("dasd: entropy quantile of the router's threshold", 0.2)
    dasd_beta: float = _h("dasd: weight of the routed self-teacher term on the GRPO advantage", 0.1)
    # local-noise fixes (METHODS §6-9)
    lsm_k: int = _h("topk_lsm: teacher top-K support size", 32)
    lsm_add_sampled: bool = _h("topk_lsm: add the sampled token to the support", False)
    tip_rho: float = _h("tip: fraction of tokens kept", 0.5)
    scope_tau: float = _h("scope: perplexity weight temperature", 1.0)
    eopd_k: int = _h("eopd: teacher top-K of the forward-KL term", 16)
    eopd_tau: float = _h("eopd: teacher entropy threshold in nats", 0.8)
    eopd_lambda: float = _h("eopd: weight of the forward-KL term", 1.0)
    eopd_mode: Literal["add", "switch"] = _h("eopd: add forward KL where uncertain (code) or switch to it (blog)", "add")
    # horizon-decay fixes (METHODS §11-13)
    prune_k: int = _h("prune_opd: top-K size of the compatibility overlap", 8)
    prune_delta: float = _h("prune_opd: overlap below this is a drift event", 0.5)
    prune_eta: float = _h("prune_opd: reliability decay per drift event", 0.9)
    prune_w_min: float = _h("prune_opd: stop supervising once reliability falls below this", 0.3)
    prune_quantile: float = _h("prune_opd: quantile of reliable lengths the budget shrinks toward", 0.5)
    prune_grow: float = _h("prune_opd: budget growth factor when rollouts stay reliable", 1.25)
    fade_k: int = _h("suffix_fade: student top-K candidates of the teacher margin", 8)
    fade_penalty: float = _h("suffix_fade: BIC penalty multiplier of the change point", 1.0)
    fade_margin: Literal["gap", "sampled"] = _h("suffix_fade: teacher margin: best minus 2nd-best of the student's top-K, or sampled token minus best", "gap")
    fade_window: int = _h("suffix_fade: tokens per step when the tokenizer has no sentence-boundary ids", 16)
    gold_coef: float = _h("stable_opd: weight of SFT on golden solutions", 0.1)
    ref_kl_coef: float = _h("stable_opd: weight of KL to the initial student", 0.01)
    rep_threshold: float = _h("stable_opd: compression ratio above which a tail counts as repetitive", 3.0)
    # RLVR + distillation, beyond the teacher (METHODS §17-18)
    srpo_weight: Literal["confidence", "none"] = _h("srpo: per-token weight of the distillation on failed rollouts", "confidence")
    gopd_lambda: float = _h("gopd: reward extrapolation (1 = standard OPD)", 1.25)
    # evaluation, checkpoints, logs
    eval_every: int = _h("evaluate every N steps (0 = only at start and end)", 10)
    eval_size: int = _h("held-out prompts per evaluation", 128)
    eval_split: Literal["test", "val"] = _h("which held-out split evaluations use (val: for tuning)", "test")
    eval_k: int = _h("samples per prompt for pass@k", 4)
    eval_temperature: float = _h("sampling temperature of pass@k", 1.0)
    save_every: int = _h("checkpoint every N steps (0 = only at the end)", 0)
    run_dir: str = _h("where logs and checkpoints go", "runs/default")
    resume: bool = _h("continue from the latest checkpoint in run_dir", False)
    overwrite: bool = _h("allow a fresh run in a run_dir that already has checkpoints", False)
    tensorboard: bool = _h("also write TensorBoard event files", False)
    progress: bool = _h("show a progress bar", True)

    def __post_init__(self):
        positive = ["steps", "prompts_per_step", "group_size", "micro_batch_size", "max_new_tokens", "eval_size", "eval_k", "horizon", "ppo_epochs"]
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"config key 'gamma' must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.beta <= 1.0 or not 0.0 <= self.lmbda <= 1.0:
            raise ValueError("config keys 'beta' and 'lmbda' must be in [0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"config key 'top_p' must be in (0, 1], got {self.top_p}")
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"config key 'budget' must be > 0 (or none), got {self.budget}")
        if self.budget_kind != "steps" and self.budget is None:
            raise ValueError(f"budget_kind={self.budget_kind} needs a budget: set budget=N (or budget_kind=steps)")
        if self.lr <= 0:
            raise ValueError(f"config key 'lr' must be > 0, got {self.lr}")
        for key in ("skd_block", "skd_topk", "trd_topk"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if self.skd_temperature < 0 or self.refine_temperature < 0 or not 0.0 < self.skd_top_p <= 1.0:
            raise ValueError("config keys 'skd_temperature', 'refine_temperature' must be >= 0 and 'skd_top_p' in (0, 1]")
        _check_horizon_knobs(self)
        _check_selfdistill_knobs(self)
        _check_mixture_knobs(self)


def _check_selfdistill_knobs(cfg: TrainConfig) -> None:
    """Ranges of the MiniLLM / OPSD / DASD knobs."""
    for key in ("mix_alpha", "minillm_gamma", "dasd_rho"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ValueError(f"config key {key!r} must be in [0, 1], got {getattr(cfg, key)}")
    if cfg.reward_scale <= 0 or cfg.reward_clip < 0 or cfg.opsd_clip < 0:
        raise ValueError("config key 'reward_scale' must be > 0, and 'reward_clip', 'opsd_clip' >= 0 (0 = off)")


def _check_mixture_knobs(cfg: TrainConfig) -> None:
    """Ranges of the StableOPD / SRPO / G-OPD knobs."""
    if cfg.gold_coef < 0 or cfg.ref_kl_coef < 0 or cfg.rep_threshold <= 0 or cfg.gopd_lambda < 0:
        raise ValueError(
            "config keys 'gold_coef', 'ref_kl_coef' and 'gopd_lambda' must be >= 0 and 'rep_threshold' > 0, got "
            f"{cfg.gold_coef}, {cfg.ref_kl_coef}, {cfg.gopd_lambda}, {cfg.rep_threshold}"
        )
