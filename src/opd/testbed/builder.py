"""The testbed's tiny models, prepared once and cached on disk, keyed by their settings.

- the **student base**: a small Llama-shaped model trained by SFT on reference solutions
  until it has converged (1000 steps: 100% greedy validation accuracy at horizon 4, for
  two seeds), then *damaged*: Gaussian noise
  of ``sigma`` × each weight tensor's standard deviation is added to every weight, the way
  quantization or pruning damages a model, with ``sigma`` the smallest that brings greedy
  validation accuracy down to a target (0.4; horizon 4: sigma 0.4, 36% greedy). It keeps the skills but makes mistakes, and fine-tuning brings it back, so
  methods can be compared on how fast they do. The undamaged model is cached too;
- the **learned teacher**: a larger tiny model trained by SFT on oracle solutions, imperfect
  the way real teachers are.

Both are saved with ``save_pretrained`` (model and tokenizer) and loaded with
``from_pretrained`` like any Hugging Face model. The warm-up is an ordinary ``opd`` SFT run.
Cache root: ``$OPD_CACHE`` or ``~/.cache/opd``. A base that ships with ``opd`` (the
quickstart's and the 4-layer horizon-16 one, :mod:`opd.testbed.shipped`) is copied into the
cache instead of built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock (start one experiment first on a fresh cache)
    fcntl = None

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd.errors import UserError
from opd.testbed import shipped
from opd.testbed.tasks import TASKS, make_task

CACHE_VERSION = 2  # 2: the training pool drawn on demand (65,536 problems; 4,096 left SFT at 0.33)
STUDENT_ARCH = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
TEACHER_ARCH = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4)
# Such tiny models learn these tasks in a jump after a plateau. A base stopped early in the
# jump (350 steps: 42% greedy) lost accuracy to every later update, SFT on its own data
# included; a base annealed to the end of its SFT run is stable, but has nothing left to
# learn (docs/results/control.md). A converged base with damaged weights has room to
# improve and recovers under any sound method. 600 steps converged or not depending on the
# run's numerics (0.98 or 0.87); 1000 steps reached 1.00 for both seeds tried.
STUDENT_WARMUP = dict(steps=1000, lr=3e-3, prompts_per_step=32, stop_at_accuracy=None)
# Per task: modchain's modular tables take longer. 1,000 steps left it at 0.336 greedy
# validation accuracy (horizon 4) and 0.156 (horizon 8); a 4,000-step cosine run reaches 0.82
# at step 1,000 and 0.94 from step 2,000 on (horizon 4, seed 0; the base: 0.949, damage 0.55
# to 0.391). At horizon 8 the 4,000 steps end at 0.246: not converged (damage 0.1: 0.293);
# 8,000 steps from scratch plateau at about 0.5 from step 3,250 (0.480 at the end), and
# 2,000 steps at lr 1e-3 from the horizon-4 base stay at 0.14-0.21: this 2-layer model
# needs another recipe (or more capacity) for longer chains. Addition at horizon 8: the
# 1,000-step SFT left this model at 0.000 (seed 0), while the 3-layer teacher reached 0.957
# in 1,060 steps; the from-scratch d128 student ended its 1,500 steps near 0.01.
TASK_WARMUP = {"modchain": dict(steps=4000), "modchain_labeled": dict(steps=4000)}
# From this horizon on, a task's SFT warm-up is this one instead (``long_warmup``): at horizon
# 16 the 4-layer base on ``modchain_labeled`` learns the task at lr 1e-3 in 1,200 steps (1.000
# and 0.980 greedy validation accuracy with seeds 0 and 1, 12-13 minutes on one core each),
# where lr 3e-3 over 4,000 steps gave 0.316 and 0.152 (its loss stuck near 0.2 for 2,000 steps).
# At horizon 32 the same recipe does not: 0.191 (seed 0, 222-token solutions, 31 minutes).
# There the SFT starts from the clean horizon-16 base of the same depth and seed instead
# (``from_horizon``: a curriculum over lengths, the labels s17-s32 new to it) at half the lr.
# Over 900 steps that reached 0.281 (seed 0; loss 0.011 and still falling), teacher-forced
# every word right but the operation of step 12 (0.38) and the operands of steps 5 and 16
# (0.68, 0.74): the copy misses of the 4,000-step horizon-16 recipe again; so 1,800 steps.
LONG_WARMUP = {"modchain_labeled": ((16, dict(steps=1200, lr=1e-3)), (32, dict(steps=1800, lr=5e-4, from_horizon=16)))}
# The damage (noise std as a fraction of each weight tensor's std) is the smallest of the grid
# that brings greedy validation accuracy down to the target, so that every task and horizon
# starts from about the same accuracy (addition, horizon 4: 0.4, which gives 0.36).
STUDENT_TARGET = 0.4
# A student base whose SFT ends below this greedy validation accuracy has not learned the
# task; damaging it leaves a student that no method can bring back to the task (the 2-layer
# base at modchain horizon 8, the 4-layer one at 16): prepare_student_base warns.
STUDENT_CONVERGED = 0.9
DAMAGE_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 1.0)
TEACHER_TRAINING = dict(steps=1200, lr=3e-3, prompts_per_step=32, stop_at_accuracy=0.95)
# Students smaller than the learned teacher, trained from scratch by SFT and not damaged
# (``student=testbed-d32`` etc.; the damaged base ``student=testbed`` stays as the control):
# SFT until greedy validation accuracy reaches 0.5, at most 1,500 steps (48,000 sequences).
# Addition, horizon 4, seed 0: d128 stops at 420 steps with 0.641 (a knowledge gap; 24 steps
# of SFT, OPD or GRPO at lr 1e-4 then raise it, 0.675 -> 0.805 / 0.755 / 0.730 on the test
# split), d64 ends at 0.164 and d32 at 0.020 after 1,500 (capacity gaps).
CAPACITY_ARCHS = {
    "d32": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
    "d64": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4),
    "d128": STUDENT_ARCH,
    # 4 layers: on the ring walk a 4-layer model learns to turn back after a wrong move from
    # demonstrations (one exploratory run), which d64 and d128 did not (docs/results, finding 6)
    "d128x4": dict(STUDENT_ARCH, num_hidden_layers=4),
}
CAPACITY_TRAINING = dict(steps=1500, lr=3e-3, prompts_per_step=32, stop_at_accuracy=0.5)
# ``student=testbed-x4``: the damaged base with 4 layers instead of 2, for long chains. Its
# SFT (modchain, horizon 8, seed 0, the same 4,000-step recipe) sat at 0.14-0.21 greedy
# validation accuracy for 1,750 steps, then jumped (0.41 at step 2,000). At horizon 16 the
# same recipe did not converge: 0.180 after the 4,000 steps (35 minutes on one core; damage
# 0.1 then gives 0.160), and 1,000 steps at lr 1e-3 from the horizon-8 base (which starts at
# 0.148 there) ended at 0.105 (0.211 at step 200, the best of six evaluations). A curriculum
# over lengths (``shorter_rate=0.5``: half the SFT problems of horizon 1-15) ended its 4,000
# steps at 0.156 (36 minutes), about chance (1/5 or 1/7 per answer). Where they fail, greedy
# on 256 test prompts: the curriculum model's first mistake falls at step 0 in 73% of its
# rollouts at horizon 16 (86% at 8: it did not learn the step at all), and the horizon-8
# base's in 100% at horizons 12 and 16 (it solves horizon 8: 1.000). A reading: the base
# finds the prompt's operands by their offset from the prompt's end, which a longer prompt
# moves, and nothing here learned to find them by content in 4,000 steps. Nor with a label
# on every operation written first in each step (``modchain_labeled`` format 1): 0.172 at
# horizon 16 (its loss flat at 0.15 from step 2,000). Teacher-forced, these bases write every
# word right but the operation of the later steps (``experiments/step_tokens.py``). With the
# label right before the operation it copies (format 2) the recipe learns horizon 8 (1.000)
# and gets to 0.316 at 16 (49 minutes on one core; its loss 0.017 at the end): every word
# right but three copies, at steps 9 and 16. Not reliably: seed 1 ended at 0.152 (loss 0.24),
# and 1,000 steps at lr 1e-3 at horizon 16 from the labelled horizon-8 base ended at 0.160.
DEEP_LAYERS = 4
# ``student=testbed-wait``: the base with 5% of its SFT solutions holding one corrected step,
# so that a correction can be sampled. Addition, horizon 4, seed 0: 1.00 validation accuracy
# after SFT, 0.19 after damage 0.4; `opd diagnose` (64 planted wrong steps per depth) gives
# P(wait) 0.028 / 0.050 / 0.082 at depths 1 / 2 / 4 (the plain base: 1.4e-6 to 1.8e-6).
WAIT_CORRECTIONS = 0.05


def eval_tokens(horizon: int) -> int:
    """The completion budget of a warm-up's evaluations: 16 per step, at most 256 (the
    models have 512 positions; a ring walk of horizon 32 needs 140)."""
    return min(16 * horizon, 256)


def cache_root() -> Path:
    return Path(os.environ.get("OPD_CACHE", Path.home() / ".cache" / "opd"))


def _key(settings: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def init_model(tokenizer, arch: dict, seed: int, max_positions: int = 512) -> LlamaForCausalLM:
    """A randomly initialized Llama-shaped causal LM over the testbed vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=max_positions, num_key_value_heads=arch["num_attention_heads"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, **arch,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_initial(path: Path, arch: dict, seed: int, extra_words: tuple[str, ...] = ()) -> Path:
    """A randomly initialized model and its tokenizer (with a task family's ``extra_words``)."""
    from opd.testbed.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(extra_words)
    init_model(tokenizer, arch, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _sft(init_dir: Path, run_dir: Path, task: str, horizon: int, seed: int, training: dict, quiet: bool) -> list[dict]:
    from opd.run.runner import Run
    from opd.config.train import TrainConfig

    training = dict(training)
    target = training.pop("stop_at_accuracy")
    training.pop("from_horizon", None)  # where the SFT starts (``init_dir``), not a run setting
    cfg = TrainConfig(
        method="sft", student=str(init_dir), teacher=None, task=task, horizon=horizon, seed=seed,
        eval_every=20 if target else 0, eval_size=256, eval_k=1, eval_split="val", max_new_tokens=eval_tokens(horizon), run_dir=str(run_dir),
        overwrite=True, progress=not quiet, lr_schedule="cosine", warmup_steps=10, **training,
    )
    return Run(cfg).fit(stop_when=(lambda row: row["eval/accuracy"] >= target) if target else None)


def damage_weights(model: torch.nn.Module, sigma: float, seed: int) -> None:
    """``w ← w + sigma · std(w) · ε``, ``ε ~ N(0, 1)``, for every weight tensor (in place, seeded)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * sigma * p.std())


def _val_accuracy(path: Path, task: str, horizon: int, seed: int) -> dict:
    """Greedy and sampled accuracy of the model at ``path`` on 256 validation prompts."""
    from opd.run.evaluate import evaluate
    from opd.run.setup import build_setup
    from opd.config.train import TrainConfig

    cfg = TrainConfig(method="sft", student=str(path), teacher=None, task=task, horizon=horizon, seed=seed,
                      eval_size=256, eval_split="val", max_new_tokens=eval_tokens(horizon))
    setup = build_setup(cfg)
    return evaluate(setup.env, setup.eval_problems, k=1, temperature=1.0, seed=seed)


@contextlib.contextmanager
def _one_builder(path: Path):
    """An exclusive lock on ``<path>.lock`` while ``path`` is built: two processes preparing the
    same model (two experiments started together on a fresh cache) build it once; the second
    waits, then finds it READY. Without this, both wrote the same ``.work`` folder and one
    failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _settings(kind: str, task: str, horizon: int, arch: dict, training: dict, seed: int) -> tuple[dict, tuple, Path]:
    """A model's settings, its task's extra words and its cache folder (nothing is built)."""
    settings = {"kind": kind, "task": task, "horizon": horizon, "arch": arch, "training": training, "seed": seed}
    made = make_task(task, horizon)  # an unknown task fails here, before anything is written
    words = getattr(made, "words", ())
    if (version := getattr(getattr(made, "family", None), "FORMAT", None)) is not None:
        settings["format"] = version  # a family whose solutions were rewritten gets new bases
    return settings, words, cache_root() / "testbed" / f"{kind}-{task}-h{horizon}-{_key(settings)}"


def _damaged_path(clean: Path, target: float) -> Path:
    return clean.with_name(f"{clean.name}-target{target:g}")


def student_base_path(task: str = "addition", horizon: int = 4, *, seed: int = 0,
                      target_accuracy: float | None = STUDENT_TARGET, layers: int | None = None) -> Path:
    """Where :func:`prepare_student_base` with these arguments (its other knobs at their
    defaults) caches the base; nothing is built."""
    arch = STUDENT_ARCH if layers is None else dict(STUDENT_ARCH, num_hidden_layers=layers)
    clean = _settings("student", task, horizon, arch, student_warmup(task, horizon=horizon), seed)[2]
    return clean if target_accuracy is None else _damaged_path(clean, target_accuracy)


def _prepare(kind: str, task: str, horizon: int, arch: dict, training: dict, seed: int, quiet: bool) -> Path:
    settings, words, path = _settings(kind, task, horizon, arch, training, seed)
    if (path / "READY.json").exists():
        return path
    with _one_builder(path):
        if not (path / "READY.json").exists() and not _restored(path, quiet):
            _build(path, settings, words, quiet)
    return path


def _restored(path: Path, quiet: bool) -> bool:
    """The base shipped with opd under ``path``'s cache name, copied there (:mod:`opd.testbed.shipped`)."""
    if not shipped.restore(path):
        return False
    if not quiet:
        print(f"using the testbed base shipped with opd (OPD_SHIPPED_BASES=0 builds it anew); cached at {path}")
    return True


def _build(path: Path, settings: dict, words, quiet: bool) -> None:
    kind, task, horizon, seed = settings["kind"], settings["task"], settings["horizon"], settings["seed"]
    training = settings["training"]
    work = path.with_name(path.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"preparing the testbed {kind} ({task}, horizon {horizon}) once; cached at {path}")
    history = _sft(_initial(work, settings, words, quiet), work / "sft", task, horizon, seed, training, quiet)
    final = sorted((work / "sft" / "checkpoints").glob("step_*"))[-1]
    shutil.rmtree(path, ignore_errors=True)
    final.rename(path)
    info = {**settings, "warmup_eval_val": history[-1], "eval_val": history[-1]}
    (path / "READY.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def _initial(work: Path, settings: dict, words, quiet: bool) -> Path:
    """Where a base's SFT starts: a random model, or (``from_horizon`` in its training) the
    clean student base of that horizon with the same depth and seed, built or found first."""
    arch, start = settings["arch"], settings["training"].get("from_horizon")
    if start is None:
        return save_initial(work / "init", arch, settings["seed"], words)
    return prepare_student_base(settings["task"], start, seed=settings["seed"], quiet=quiet, target_accuracy=None,
                                layers=arch["num_hidden_layers"])


def _damaged(clean: Path, target: float, seed: int, quiet: bool) -> Path:
    """The cached copy of ``clean`` damaged by the smallest ``sigma`` of ``DAMAGE_GRID``
    that brings its greedy validation accuracy to ``target`` or below."""
    path = _damaged_path(clean, target)
    if (path / "READY.json").exists():
        return path
    with _one_builder(path):
        if not (path / "READY.json").exists() and not _restored(path, quiet):
            _build_damaged(clean, path, target, seed, quiet)
    return path


def _build_damaged(clean: Path, path: Path, target: float, seed: int, quiet: bool) -> None:
    info = prepared_info(clean)
    task, horizon = info["task"], info["horizon"]
    work = path.with_name(path.name + ".work")
    searched = []
    for sigma in DAMAGE_GRID:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(clean, work)
        (work / "READY.json").unlink()
        model = LlamaForCausalLM.from_pretrained(work)
        damage_weights(model, sigma, seed)
        model.save_pretrained(work)
        row = _val_accuracy(work, task, horizon, seed)
        searched.append({"damage": sigma, "eval/accuracy": row["eval/accuracy"]})
        if not quiet:
            print(f"damage {sigma:g}: validation accuracy {row['eval/accuracy']:.3f} (target {target:g})")
        if row["eval/accuracy"] <= target:
            break
    shutil.rmtree(path, ignore_errors=True)
    work.rename(path)
    info.update(damage=sigma, target_accuracy=target, eval_val=row, damage_search=searched)
    (path / "READY.json").write_text(json.dumps(info, indent=1))


def student_warmup(task: str, warmup_steps: int | None = None, correction_rate: float = 0.0, shorter_rate: float = 0.0,
                   horizon: int = 0, lr: float | None = None) -> dict:
    """The student base's SFT settings: :data:`STUDENT_WARMUP`, then the task's
    :data:`TASK_WARMUP` (from each horizon of its :data:`LONG_WARMUP` on, that one), then ``warmup_steps``
    when given (it overrides both), and ``lr`` likewise; the rates only when non-zero (so the
    cache keys of bases without them stay as they were)."""
    longer = [warmup for start, warmup in LONG_WARMUP.get(task, ()) if horizon >= start]
    task_warmup = longer[-1] if longer else TASK_WARMUP.get(task, {})
    warmup = {**STUDENT_WARMUP, **task_warmup, **({"steps": warmup_steps} if warmup_steps else {}), **({"lr": lr} if lr else {})}
    if correction_rate:
        warmup["correction_rate"] = correction_rate
    if shorter_rate:
        warmup["shorter_rate"] = shorter_rate
    return warmup


def prepare_student_base(
    task: str = "addition", horizon: int = 4, *, seed: int = 0, quiet: bool = False,
    target_accuracy: float | None = STUDENT_TARGET, warmup_steps: int | None = None, correction_rate: float = 0.0,
    layers: int | None = None, shorter_rate: float = 0.0, lr: float | None = None,
) -> Path:
    """The student base (cached): converged by SFT, then damaged down to ``target_accuracy``
    (greedy, validation); ``target_accuracy=None`` gives the undamaged model.
    ``warmup_steps`` shortens or lengthens the SFT warm-up (its cosine schedule scales with it),
    ``lr`` sets its peak learning rate;
    ``correction_rate``: the fraction of its SFT solutions with one corrected step (a base
    that can say ``wait``: ``student=testbed-wait``); ``layers``: the model's depth
    (default 2; ``student=testbed-x4`` is the same base with :data:`DEEP_LAYERS`);
    ``shorter_rate``: the fraction of its SFT problems of a shorter horizon (a curriculum)."""
    warmup = student_warmup(task, warmup_steps, correction_rate, shorter_rate, horizon, lr)
    arch = STUDENT_ARCH if layers is None else dict(STUDENT_ARCH, num_hidden_layers=layers)
    clean = _prepare("student", task, horizon, arch, warmup, seed, quiet)
    _warn_unconverged(clean, arch["num_hidden_layers"])
    return clean if target_accuracy is None else _damaged(clean, target_accuracy, seed, quiet)


def _warn_unconverged(clean: Path, layers: int) -> None:
    """Warn (every time, cached or not) when the base's SFT ended below :data:`STUDENT_CONVERGED`."""
    info = prepared_info(clean)
    accuracy = info["warmup_eval_val"]["eval/accuracy"]
    if accuracy < STUDENT_CONVERGED:
        deeper = f" or the deeper base (student=testbed-x4: {DEEP_LAYERS} layers)" if layers < DEEP_LAYERS else ""
        warnings.warn(
            f"opd: the {layers}-layer student base for {info['task']} at horizon {info['horizon']} ended its SFT at "
            f"{accuracy:.3f} greedy validation accuracy (< {STUDENT_CONVERGED}): it has not learned the task, so its "
            f"damaged copy measures little. Use a shorter horizon{deeper}; cached at {clean}", stacklevel=3)


def prepare_capacity_student(capacity: str, task: str = "addition", horizon: int = 4, *, seed: int = 0,
                             quiet: bool = False) -> Path:
    """A student of ``capacity`` (a key of ``CAPACITY_ARCHS``) trained from scratch by SFT
    (``CAPACITY_TRAINING``; cached), not damaged."""
    return _prepare(f"student-{capacity}", task, horizon, CAPACITY_ARCHS[capacity], CAPACITY_TRAINING, seed, quiet)


def prepare_teacher(task: str = "addition", horizon: int = 4, *, seed: int = 0, quiet: bool = False,
                    style: str = "") -> Path:
    """The learned teacher: a larger tiny model trained by SFT on oracle solutions (cached).
    ``style="swapped"``: trained on ``{task}_swapped``, the same problems written in another
    style (``teacher=testbed-swapped``; addition only)."""
    if style:
        styled = f"{task}_{style}"
        if styled not in TASKS:
            known = sorted(t.rsplit("_", 1)[0] for t in TASKS if t.endswith(f"_{style}"))
            raise UserError(f"the learned teacher of style {style!r} exists for task {', '.join(known)}, not {task!r}; "
                            "use teacher=testbed for this task")
        task = styled
    return _prepare("teacher", task, horizon, TEACHER_ARCH, TEACHER_TRAINING, seed, quiet)


def prepare(task: str, horizon: int, teacher: bool = False, student: str = "testbed", base_seed: int = 0) -> str:
    """``opd prepare``: build (or find) the testbed ``student`` (a registered name:
    ``testbed``, ``testbed-x4``, ...) of ``base_seed``, and the learned teacher when asked;
    one line each with its path and validation accuracy (the names are registered: importing
    this module imports the :mod:`opd.testbed` package first)."""
    from opd.run.sources import lookup, names

    source = lookup("student", student)
    if source is None or not student.startswith("testbed"):
        known = ", ".join(n for n in names("student") if n.startswith("testbed"))
        raise UserError(f"--student {student}: not a testbed student; use one of {known}")
    settings = {"task": task, "horizon": horizon, "base_seed": base_seed}
    lines = []
    for path in [source(settings)] + ([prepare_teacher(task, horizon)] if teacher else []):
        info = prepared_info(path)
        acc = info.get("eval_val", info["warmup_eval_val"])["eval/accuracy"]
        before = info["warmup_eval_val"]["eval/accuracy"]
        damaged = f", {before:.3f} before damage {info['damage']:g}" if "damage" in info else ""
        lines.append(f"{path}  (validation accuracy {acc:.3f}{damaged})")
    return "\n".join(lines)


def prepared_info(path: Path) -> dict:
    return json.loads((Path(path) / "READY.json").read_text())
