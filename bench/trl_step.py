"""Training-step throughput: opd's loop vs TRL's DistillationTrainer and GKDTrainer (CPU).

    python bench/trl_step.py [--threads N] [--batch 8] [--prompt-len 16] [--new-tokens 64]
                             [--vocab 8192] [--steps 4] [--warmup 1] [--pairs all] [--profile]

TRL is a benchmark-only dependency (the ``bench`` extra), never imported by ``opd``.

Setup, identical for every side: a word-level tokenizer built locally (``--vocab`` ids, a
trivial chat template for GKD's ChatML collator), a Llama-shaped student (d=128, 2 layers)
and a larger teacher (d=256, 4 layers), random init, saved with ``save_pretrained`` and
loaded with ``from_pretrained`` in float32; a dataset of ``--prompts`` prompts of exactly
``--prompt-len`` words (the same ids on every side). One optimizer step = ``--batch``
prompts, one completion each (TRL's distillation trainers are n=1), one micro-batch,
exactly ``--new-tokens`` sampled tokens per completion at temperature 1, top-p 1, top-k
off; AdamW (betas 0.9/0.99, no weight decay, constant lr), grad-norm clip 1.0, no gradient
checkpointing, ``--threads`` torch threads.

Pairs (completion tokens in the loss per second of training step, the median over
``--steps`` steps after ``--warmup`` steps, and the ratio opd / TRL):
  1. opd ``method=opd`` (sampled-token reverse KL, Thinking Machines' recipe; the teacher
     gives log-probs and top-8 only) vs ``trl.DistillationTrainer(beta=1)`` (full-vocabulary
     reverse KL, always on-policy): the same per-token reverse-KL gradient in expectation
     (one-sample estimate vs the exact sum over the vocabulary). The issue's headline pair.
  2. opd ``method=gkd beta=1 lmbda=1`` (full-vocabulary reverse KL) vs the same
     DistillationTrainer run: the same loss on both sides.
  3. opd ``method=gkd beta=1 lmbda=1`` vs ``trl.experimental.gkd.GKDTrainer(lmbda=1, beta=1)``.

Each TRL run drives its opd sides: after every TRL step (outside its timed window) one step
of each opd side runs, so both sides of a pair see the same machine load (the second GKD
pair reuses the opd gkd run of pair 2, already warm).

How each side is timed. opd: ``opd.run.Run.one_step`` (the real loop body: pick prompts,
``train_step`` = rollout -> teacher.score -> signal -> update, scheduler), no evaluation,
logging or checkpoints; parts: its own ``time/rollout_s`` (sampling + teacher scoring +
signal) and ``time/update_s`` metrics, and the sampling and teacher-scoring seconds from
wrapping ``method.rollout`` and ``teacher.score``. TRL: a ``TrainerCallback`` takes the
time from ``on_step_begin`` to ``on_step_end`` (generation, teacher and student forward /
backward, clipping, optimizer and scheduler step); fetching and collating the batch happen
before ``on_step_begin`` and are NOT counted (in TRL's favour); the generation part comes
from wrapping ``_generate_and_score_completions`` (Distillation) or
``generate_on_policy_outputs`` (GKD). Reporting, saving, evaluation and printing are off
(``report_to=none``, ``save_strategy=no``, ``eval_strategy=no``, ``logging_strategy=no``,
printer/progress callbacks removed); still done by TRL and not by opd: its per-step metric
bookkeeping (student entropy, completion-length statistics, ``accelerator.gather`` on one
process) and the Trainer's callback machinery. Still done by opd and not by TRL: prompt
tokenization inside the step, the verifier, and the ``diag/`` metrics (student entropy,
top-K overlap, teacher top-K statistics).

No EOS stop on any side, so every completion has exactly ``--new-tokens`` tokens: opd runs
with ``eos_id=-1`` (EOS is an ordinary token), DistillationTrainer with
``generation_kwargs={"min_new_tokens": T}`` (EOS masked out of sampling, since that trainer
always stops and masks at the tokenizer's EOS), GKDTrainer with the student's
``generation_config.eos_token_id=None``. The bench checks and prints, for every side and
step, the (prompt, completion) widths actually run and the tokens that entered the loss.
``--profile`` adds a cProfile of opd's timed steps (top functions by cumulative and own time).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import pstats
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

STUDENT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
TEACHER = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHAT = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
LR = 1e-5


# ---------------------------------------------------------------- shared set-up


def build_tokenizer(vocab: int):
    """Word-level tokenizer over ``w0 .. w{vocab-5}`` plus 4 specials; adds no special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=1024,
    )
    tok.chat_template = CHAT  # GKD's ChatML collator needs one; it renders the bare contents
    return tok


def save_models(root: Path, vocab: int) -> tuple[str, str]:
    """Student and teacher (random init, shared tokenizer) saved under ``root``."""
    tok = build_tokenizer(vocab)
    dirs = []
    for name, arch, seed in (("student", STUDENT, 0), ("teacher", TEACHER, 1)):
        cfg = LlamaConfig(
            vocab_size=vocab, max_position_embeddings=1024, num_key_value_heads=arch["num_attention_heads"],
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False, **arch,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(str(root / name))
    return dirs[0], dirs[1]


def make_rows(n: int, prompt_len: int, vocab: int) -> list[dict]:
    """``n`` prompts of exactly ``prompt_len`` words (and a short solution/answer for the formats)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - len(SPECIALS), (n, prompt_len + 4), generator=g).tolist()
    text = lambda xs: " ".join(f"w{i}" for i in xs)  # noqa: E731
    return [{"prompt": text(r[:prompt_len]), "solution": text(r[prompt_len:]), "answer": f"w{r[-1]}"} for r in ids]


def load(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


class Timed:
    """Wraps a callable; keeps the last call's seconds and what ``probe`` reads from its output."""

    def __init__(self, fn, probe=None):
        self.fn, self.probe, self.seconds, self.seen = fn, probe, 0.0, None

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds = time.perf_counter() - t0
        if self.probe is not None:
            self.seen = self.probe(out)
        return out


class Record:
    """One side's per-step measurements: step seconds, tokens in the loss, (prompt width,
    completion width) of the generated batch, and the parts' seconds."""

    def __init__(self):
        self.step_s, self.tokens, self.width, self.parts = [], [], [], {}

    def add(self, step_s: float, tokens: int, width: tuple[int, int], **parts: float) -> None:
        self.step_s.append(step_s)
        self.tokens.append(tokens)
        self.width.append(width)
        for key, val in parts.items():
            self.parts.setdefault(key, []).append(val)

    def summary(self, warmup: int) -> dict:
        """Median tokens/s over the steps after warm-up, and the median of each part's seconds."""
        rates = [n / s for n, s in zip(self.tokens[warmup:], self.step_s[warmup:])]
        med = lambda xs: statistics.median(xs[warmup:])  # noqa: E731
        return {
            "tok_s": statistics.median(rates), "step_s": med(self.step_s), "tokens": sorted(set(self.tokens[warmup:])),
            "width": sorted(set(self.width[warmup:])), "parts": {k: med(v) for k, v in self.parts.items()},
        }


# ---------------------------------------------------------------- opd


class OpdSide:
    """opd's real loop body (``Run.one_step``), stepped one step at a time by the TRL run it is
    interleaved with; ``take()`` hands over the steps measured so far."""

    def __init__(self, method: str, student: str, teacher: str, data: str, args, work: Path, extra: dict):
        from opd.run.runner import Run
        from opd.run.setup import build_setup
        from opd.config.train import TrainConfig

        cfg = TrainConfig(
            method=method, student=student, teacher=teacher, dataset=data, chat_template="off", steps=1000,
            prompts_per_step=args.batch, group_size=1, micro_batch_size=args.batch, lr=LR, lr_schedule="constant",
            max_grad_norm=1.0, max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, eval_size=4,
            progress=False, run_dir=str(work / f"opd-{method}"), **extra,
        )
        setup = build_setup(cfg)
        setup.env.eos_id = -1  # no EOS stop: every completion is max_new_tokens long (see the docstring)
        widths = lambda exp: (exp.batch.prompt_len, exp.batch.completion_mask_BT.shape[1])  # noqa: E731
        self.rollout = Timed(setup.method.rollout, widths)
        self.signal = Timed(setup.method.signal, lambda sig: int(sig["mask_BT"].sum()))
        setup.method = dataclasses.replace(setup.method, rollout=self.rollout, signal=self.signal)
        self.score = setup.env.teacher.score = Timed(setup.env.teacher.score)
        self.run = Run(cfg, setup)
        self.rec, self.profile = Record(), cProfile.Profile() if args.profile else None
        self.warmup = args.warmup

    def step(self) -> None:
        profiling = self.profile is not None and len(self.rec.step_s) >= self.warmup
        if profiling:
            self.profile.enable()
        t0 = time.perf_counter()
        metrics = self.run.one_step()
        step_s = time.perf_counter() - t0
        if profiling:
            self.profile.disable()
        self.rec.add(step_s, self.signal.seen, self.rollout.seen, sample=self.rollout.seconds,
                     teacher=self.score.seconds, rollout_s=metrics["time/rollout_s"], update_s=metrics["time/update_s"])

    def take(self) -> Record:
        rec, self.rec = self.rec, Record()
        return rec


def profile_text(prof: cProfile.Profile, top: int = 20) -> str:
    """The top functions by cumulative time (where the step goes) and by own time (which ops)."""
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# ---------------------------------------------------------------- TRL


def trl_common(args, work: Path, name: str) -> dict:
    """TrainingArguments shared by both TRL trainers: the same optimisation as opd, overheads off."""
    return dict(
        output_dir=str(work / name), max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0,
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, report_to="none",
        save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, temperature=1.0,
    )


def quiet(trainer):
    """No per-run printing (``disable_tqdm`` swaps the progress bar for a printer of the logs)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def step_timer(rec: Record, gen: Timed, between: list[OpdSide]):
    """Times each TRL step (``on_step_begin`` -> ``on_step_end``), then steps the opd sides."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s = time.perf_counter() - self.t0
            tokens, width = gen.seen
            rec.add(step_s, tokens, width, generate=gen.seconds, rest=step_s - gen.seconds)
            for side in between:  # outside the timed window of the TRL step
                side.step()

    return StepTimer()


def distillation_probe(out: dict) -> tuple[int, tuple[int, int]]:
    """Loss tokens and (prompt, completion) widths of ``_generate_and_score_completions``'s batch."""
    return int(out["num_items_in_batch"]), (out["prompt_ids"].shape[1], out["completion_ids"].shape[1])


def gkd_probe(out: tuple) -> tuple[int, tuple[int, int]]:
    """The same for ``generate_on_policy_outputs`` -> (ids_BL, attention_BL, labels_BL), whose
    labels are -100 on the prompt columns (the loss reads ``labels[:, 1:]``)."""
    ids_BL, _, labels_BL = out
    P = int((labels_BL == -100).all(0).sum())
    return int((labels_BL[:, 1:] != -100).sum()), (P, ids_BL.shape[1] - P)


def timed_train(trainer, generate_attr: str, probe, between: list, threads: int) -> Record:
    """Train with the generation method ``generate_attr`` wrapped in a timer; one record per step."""
    gen = Timed(getattr(trainer, generate_attr), probe)
    setattr(trainer, generate_attr, gen)
    rec = Record()
    quiet(trainer).add_callback(step_timer(rec, gen, between))
    torch.set_num_threads(threads)
    trainer.train()
    return rec


def run_trl_distillation(student: str, teacher: str, rows: list[dict], args, work: Path, between: list) -> Record:
    from datasets import Dataset

    try:
        from trl import DistillationConfig, DistillationTrainer
    except ImportError:  # before its promotion to the stable API
        from trl.experimental.distillation import DistillationConfig, DistillationTrainer

    T = args.new_tokens
    cfg = DistillationConfig(
        **trl_common(args, work, "trl-distill"), beta=1.0, max_completion_length=T, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": T}, log_completions=False,
    )
    data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    trainer = DistillationTrainer(
        model=load(student), teacher_model=load(teacher), args=cfg, train_dataset=data,
        processing_class=build_tokenizer(args.vocab),
    )
    return timed_train(trainer, "_generate_and_score_completions", distillation_probe, between, args.threads)


def run_trl_gkd(student: str, teacher: str, rows: list[dict], args, work: Path, between: list) -> Record:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cfg = GKDConfig(
        **trl_common(args, work, "trl-gkd"), lmbda=1.0, beta=1.0, max_new_tokens=args.new_tokens, max_length=1024
    )
    chats = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["solution"]}] for r in rows]
    model = load(student)
    model.generation_config.eos_token_id = None  # no EOS stop (see the docstring)
    trainer = GKDTrainer(
        model=model, teacher_model=load(teacher), args=cfg, processing_class=build_tokenizer(args.vocab),
        train_dataset=Dataset.from_list([{"messages": c} for c in chats]),
    )
    return timed_train(trainer, "generate_on_policy_outputs", gkd_probe, between, args.threads)


# ---------------------------------------------------------------- report


def describe(name: str, r: dict) -> str:
    parts = ", ".join(f"{k} {v:.3f}" for k, v in r["parts"].items())
    return (f"  {name:35s} {r['tok_s']:7.0f} tok/s  step {r['step_s']:.3f} s  [{parts}]\n"
            f"  {'':35s} loss tokens/step {r['tokens']}, (prompt, completion) widths {r['width']}")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=8, help="prompts per optimizer step (one completion each)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=256, help="dataset size")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pairs", choices=["all", "distill", "gkd"], default="all",
                    help="distill: pairs 1-2 (DistillationTrainer); gkd: pair 3 (GKDTrainer)")
    ap.add_argument("--profile", action="store_true", help="cProfile opd's timed steps, print the top functions")
    return ap.parse_args()


def measure(args, work: Path) -> tuple[dict, dict]:
    """Each TRL run with its opd sides interleaved step by step (same machine load for both)."""
    student, teacher = save_models(work, args.vocab)
    rows = make_rows(args.prompts, args.prompt_len, args.vocab)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gkd = OpdSide("gkd", student, teacher, str(data), args, work, dict(beta=1.0, lmbda=1.0, loss_temperature=1.0))
    res, profiles = {}, {}
    if args.pairs in ("all", "distill"):
        opd = OpdSide("opd", student, teacher, str(data), args, work, {})
        res[TRL_D] = run_trl_distillation(student, teacher, rows, args, work, [opd, gkd])
        res[OPD], res[OPD_GKD + " (1)"] = opd.take(), gkd.take()
        profiles[OPD] = opd.profile
    if args.pairs in ("all", "gkd"):
        res[TRL_G] = run_trl_gkd(student, teacher, rows, args, work, [gkd])
        res[OPD_GKD + " (2)"] = gkd.take()
    profiles[OPD_GKD] = gkd.profile
    return {k: r.summary(args.warmup) for k, r in res.items()}, profiles


OPD, OPD_GKD = "opd method=opd", "opd method=gkd beta=1 lmbda=1"
TRL_D, TRL_G = "TRL DistillationTrainer beta=1", "TRL GKDTrainer lmbda=1 beta=1"
PAIRS = [(OPD, TRL_D), (OPD_GKD + " (1)", TRL_D), (OPD_GKD + " (2)", TRL_G)]


def main() -> None:
    import transformers
    import trl

    args = parse()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{torch.get_num_threads()} threads; float32")
    print(f"student {STUDENT}, teacher {TEACHER}, vocab {args.vocab}; batch {args.batch} prompts x 1 completion, "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens (no EOS stop), temperature 1, top-p 1; "
          f"AdamW lr {LR}; median of {args.steps} steps after {args.warmup} warm-up, sides interleaved step by step")
    with tempfile.TemporaryDirectory() as tmp:
        res, profiles = measure(args, Path(tmp))
    report(res, args)
    for name, prof in profiles.items():
        if prof is not None:
            print(f"\ncProfile of {name}, its {args.steps} timed steps per pair\n{profile_text(prof)}")


def report(res: dict, args) -> None:
    print("\nper side (parts: median seconds per step; opd: sample = the rollout, teacher = teacher.score, "
          "rollout_s = sample + teacher + signal, update_s = forward/backward/optimizer; TRL: generate, "
          "rest = teacher and student forward/backward + optimizer)")
    for name, r in res.items():
        print(describe(name, r))
    P, T, N = args.prompt_len, args.new_tokens, args.batch * args.new_tokens
    bad = [k for k, r in res.items() if r["tokens"] != [N] or r["width"] != [(P, T)]]
    print(f"same work: every side ran {P}-token prompts, generated {T} tokens per completion and trained on "
          f"{N} tokens per step" if not bad else f"WORK DIFFERS on {bad}: expected {N} loss tokens, widths {(P, T)}")
    print(f"\n{'pair':70s} {'opd tok/s':>9s} {'TRL tok/s':>9s} {'ratio':>7s}")
    for ours, theirs in PAIRS:
        if ours in res and theirs in res:
            a, b = res[ours]["tok_s"], res[theirs]["tok_s"]
            print(f"{ours + ' vs ' + theirs:70s} {a:9.0f} {b:9.0f} {a / b:6.2f}x")


if __name__ == "__main__":
    main()
