"""``opd compare SPEC.yaml``: several method configs under one budget and several seeds.

The spec (YAML)::

    base:                     # config keys shared by every run (see `opd config`)
      student: testbed
      teacher: oracle
      eval_size: 200
    methods:                  # label -> config overrides; `method:` defaults to the label
      opd: {method: opd}
      opd_g1: {method: opd, gamma: 1}
      grpo: {group_size: 8, prompts_per_step: 4}
    seeds: 5                  # or a list [0, 1, 2, 3, 4]: the reported seeds
    budget_kind: sequences    # steps | sequences | teacher_tokens | wall_s
    budget: 768               # every run stops once its counter reaches this
    lr_grid: [1e-4, 3e-4, 1e-3, 3e-3]  # each label's lr, by final validation accuracy
    tune_metric: pass@1       # optional: tune by sampled accuracy (pass@k at the runs' eval_k)
                              # instead of greedy accuracy (the default, `accuracy`)
    tuning_seed: [100, 101]   # optional (default: the two seeds after the largest reported one);
                              # never a reported seed; each lr judged by the mean over them
    lr_extend: 2              # optional: times a grid is widened past an edge choice (default 2)
    target: 0.9               # optional: sequences to this fraction of the teacher's test accuracy
    eval_every: 4             # optional
    planned: [opd:grpo]       # optional: the pairs the comparison was written to answer; Holm's
                              # correction runs over them alone (the other pairs: exploratory)

The protocol (:mod:`opd.compare.protocol`) is checked and every rule not met is reported;
``OUT/results.json`` holds the numbers, and the report's verdicts come from it by the rule
of :mod:`opd.compare.verdicts`.

Each run's config is: defaults < the method's recipe < ``base`` < command-line ``key=value``
< the label's overrides < what the comparison sets (seed, lr, run_dir, eval split, budget).
A label whose method reduces to another one on its runs (``opd.methods.degeneracy``: e.g. a
threshold no token reaches) is marked in the report's table with the knob to change.
Runs go to ``OUT/runs/LABEL/seedS`` (tuning runs to ``OUT/tune/LABEL/lrX``); each finished
run leaves ``result.json`` with its config, the hash of its student's weights and its
evaluation history, and a re-run reuses it when the config is the same and the student's
weights are too (a base rebuilt elsewhere is another base; ``--force`` recomputes). ``--jobs N`` runs them on N worker processes
(:mod:`opd.compare.parallel`), with the numbers of a serial run. The whole spec is checked, and every config
built, before any run starts. Writes ``OUT/report.md``, ``OUT/summary.json`` and PNGs.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opd.compare import protocol
from opd.compare.spec_checks import JUDGEABLE, _error, _judge, _planned, _tune_metric  # noqa: F401 (JUDGEABLE: API)
from opd.compare.results import results_of, subset_finals  # noqa: F401 (subset_finals: part of this module's API)
from opd.compare.saved_runs import RESULT_FILE, finished_result, run_or_reuse, student_base  # noqa: F401 (finished_result: used by parallel)
from opd.config.loader import ConfigError
from opd.errors import UserError
from opd.config.train import TrainConfig

SPEC_KEYS = ["base", "methods", "seeds", "budget_kind", "budget", "lr_grid", "tuning_seed", "lr_extend", "target", "eval_every",
             "judge", "planned", "tune_metric"]
BUDGET_KINDS = ("steps", "sequences", "teacher_tokens", "wall_s")
SET_BY_COMPARE = {
    "seed": "list the seeds under `seeds:`", "run_dir": "runs go under --out", "resume": "a re-run reuses finished runs",
    "overwrite": "use --force to recompute", "eval_split": "tuning uses val and the compared runs test",
    "budget_kind": "set it at the top level of the spec", "budget": "set it at the top level of the spec",
    "eval_every": "set it at the top level of the spec",
}
RUN_DEFAULTS = {"progress": False}
STEP_CAP = 100_000  # `steps` when a non-step budget is set and no steps are given: the budget stops the run
RESULTS_FILE = "results.json"  # the comparison's numbers, from which its verdicts are made
_LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")
EXAMPLE = "methods:\n  opd: {method: opd}\n  opd_g1: {method: opd, gamma: 1}"


@dataclass
class Spec:
    path: str
    base: dict
    methods: dict[str, dict]
    seeds: list[int] = field(default_factory=lambda: [0])
    budget_kind: str = "steps"
    budget: float | None = None
    lr_grid: list[float] = field(default_factory=list)
    eval_every: int | None = None
    cli: list[str] = field(default_factory=list)
    tuning_seed: int | None = None  # the first tuning seed (None: untuned)
    tuning_seeds: list[int] = field(default_factory=list)  # all of them, the first included
    lr_extend: int = 2
    target: float | None = None
    judge: list[str] = field(default_factory=list)  # further final metrics judged by the rule (pass@k)
    planned: list[tuple[str, str]] | None = None  # the pairs Holm's correction runs over (None: every pair)
    tune_metric: str = "accuracy"  # the final validation metric the lr is chosen by (greedy accuracy, or pass@k)


def _read_spec(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"spec file '{path}' not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"spec file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise _error(path, "top level", f"must be a mapping with keys {', '.join(SPEC_KEYS)}; for example:\n{EXAMPLE}")
    return data


def _check_keys(path: str, data: dict) -> None:
    for key in data:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise _error(path, f"key {key!r}", f"unknown spec key; {hint}the spec's keys are {', '.join(SPEC_KEYS)} "
                         "(config keys go under `base:` or under a method's label)")


def _methods(path: str, raw) -> dict[str, dict]:
    from opd.methods import METHODS

    if not isinstance(raw, dict) or not raw:
        raise _error(path, "methods", f"needs at least one `label: {{config overrides}}` entry, for example:\n{EXAMPLE}")
    out = {}
    for label, overrides in raw.items():
        overrides = {} if overrides is None else overrides
        if not isinstance(label, str) or not _LABEL.match(label):
            raise _error(path, f"methods.{label}", "a label is a folder name: letters, digits, '_', '-', '.'")
        if not isinstance(overrides, dict):
            raise _error(path, f"methods.{label}", f"must map config keys to values, e.g. `{label}: {{method: opd}}`")
        if "method" not in overrides and label not in METHODS:
            raise _error(path, f"methods.{label}", f"no `method:` and {label!r} is not a method name; write "
                         f"`{label}: {{method: NAME, ...}}` with NAME one of {', '.join(METHODS)} (see `opd methods`)")
        out[label] = {"method": label, **overrides}
    return out


def _seeds(path: str, raw) -> list[int]:
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        return list(range(raw))
    if isinstance(raw, list) and raw and all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        if len(set(raw)) == len(raw):
            return list(raw)
    raise _error(path, "seeds", f"must be a count (e.g. 3 for seeds 0, 1, 2) or a list of distinct ints, got {raw!r}")


def _positive_float(path: str, where: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number > 0 or math.isinf(number):
        raise _error(path, where, f"must be a positive number, got {value!r}")
    return number


def _budget(path: str, data: dict) -> tuple[str, float | None]:
    kind, budget = data.get("budget_kind", "steps"), data.get("budget")
    if kind not in BUDGET_KINDS:
        raise _error(path, "budget_kind", f"must be one of {', '.join(BUDGET_KINDS)}, got {kind!r}")
    if budget is None:
        if kind != "steps":
            raise _error(path, "budget", f"budget_kind: {kind} needs `budget: N` (the {kind} each run may use)")
        return kind, None
    return kind, _positive_float(path, "budget", budget)


def _eval_every(path: str, raw) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    raise _error(path, "eval_every", f"must be an int >= 0 (0: only at the start and the stop), got {raw!r}")


def _lr_grid(path: str, raw) -> list[float]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise _error(path, "lr_grid", f"must be a non-empty list of learning rates, e.g. [1e-5, 1e-4], got {raw!r}")
    return [_positive_float(path, f"lr_grid[{i}]", v) for i, v in enumerate(raw)]


def _tuning_seeds(path: str, raw, seeds: list[int], grid: list[float]) -> list[int]:
    """The tuning seeds: ``tuning_seed`` as an int or a list of distinct ints (default: the
    next :data:`protocol.MIN_TUNING_SEEDS` seeds after the largest reported one; none without a
    grid), none of them a reported seed."""
    if raw is None:
        return [max(seeds) + 1 + i for i in range(protocol.MIN_TUNING_SEEDS)] if grid else []
    values = raw if isinstance(raw, list) else [raw]
    if not values or any(not isinstance(v, int) or isinstance(v, bool) for v in values) or len(set(values)) < len(values):
        raise _error(path, "tuning_seed", f"must be an int or a list of distinct ints, got {raw!r}")
    for v in values:
        if v in seeds:
            raise _error(path, "tuning_seed", f"{v} is also a reported seed; tune on a seed that is never reported")
    return values


def _count(path: str, key: str, raw, default: int) -> int:
    if raw is None:
        return default
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    raise _error(path, key, f"must be an int >= 0, got {raw!r}")


def _target(path: str, raw) -> float | None:
    if raw is None:
        return None
    value = _positive_float(path, "target", raw)
    if value > 1:
        raise _error(path, "target", f"is a fraction of the teacher's accuracy, in (0, 1]; got {raw!r}")
    return value


def _apply_cli(data: dict, overrides: list[str]) -> list[str]:
    """Spec keys given as ``key=value`` replace the spec's; the rest are config keys (returned)."""
    config_overrides = []
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise UserError(f"malformed override {text!r}: expected key=value, e.g. seeds=3 or lr=1e-4")
        if key.strip() in SPEC_KEYS and key.strip() not in ("base", "methods"):
            data[key.strip()] = yaml.safe_load(value)
        else:
            config_overrides.append(text)
    return config_overrides


def load_spec(path: str, overrides: list[str] = ()) -> Spec:
    """The checked spec; raises :class:`UserError` naming the problem and its fix."""
    data = _read_spec(path)
    _check_keys(path, data)
    cli = _apply_cli(data, list(overrides))
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise _error(path, "base", "must map config keys to values (see `opd config`)")
    kind, budget = _budget(path, data)
    seeds, grid = _seeds(path, data.get("seeds", [0])), _lr_grid(path, data.get("lr_grid"))
    tuning = _tuning_seeds(path, data.get("tuning_seed"), seeds, grid)
    methods = _methods(path, data.get("methods"))
    spec = Spec(path=path, base=base, methods=methods, seeds=seeds,
                budget_kind=kind, budget=budget, lr_grid=grid,
                eval_every=_eval_every(path, data.get("eval_every")), cli=cli,
                tuning_seed=tuning[0] if tuning else None, tuning_seeds=tuning,
                lr_extend=_count(path, "lr_extend", data.get("lr_extend"), 2), target=_target(path, data.get("target")),
                judge=_judge(path, data.get("judge"), {**base, **_cli_dict(cli)}), planned=_planned(path, data.get("planned"), methods),
                tune_metric=_tune_metric(path, data.get("tune_metric"), {**base, **_cli_dict(cli)}, grid))
    _check_layers(spec)
    return spec


def _check_layers(spec: Spec) -> None:
    layers = {"base": spec.base, "the command line": _cli_dict(spec.cli), **{f"methods.{k}": v for k, v in spec.methods.items()}}
    for where, layer in layers.items():
        for key in layer:
            if key in SET_BY_COMPARE:
                raise _error(spec.path, where, f"{key!r} is set by the comparison: {SET_BY_COMPARE[key]}")
            if key == "method" and where == "the command line":
                raise _error(spec.path, where, "'method' is set per label under `methods:`, not for every run")
            if key == "lr" and spec.lr_grid:
                raise _error(spec.path, where, "'lr' is chosen from lr_grid; drop `lr` here or drop `lr_grid`")


def _cli_dict(cli: list[str]) -> dict:
    return {text.partition("=")[0].strip(): text.partition("=")[2] for text in cli}


# ---------------------------------------------------------------- configs


def run_config(spec: Spec, label: str, seed: int, lr: float | None, run_dir: Path, tune: bool = False) -> TrainConfig:
    """One run's config (see the module docstring for the layers); errors name the label."""
    controlled = {"seed": seed, "run_dir": str(run_dir), "overwrite": True, "eval_split": "val" if tune else "test",
                  "budget_kind": spec.budget_kind, "budget": spec.budget}
    if lr is not None:
        controlled["lr"] = lr
    if spec.budget_kind == "steps" and spec.budget is not None:
        controlled["steps"] = math.ceil(spec.budget)
    if tune:
        controlled["eval_every"] = 0
    elif spec.eval_every is not None:
        controlled["eval_every"] = spec.eval_every
    given_steps = "steps" in {**spec.base, **_cli_dict(spec.cli), **spec.methods[label]}
    cap = {"steps": STEP_CAP} if spec.budget_kind != "steps" and not given_steps else {}
    layers = {**RUN_DEFAULTS, **cap, **spec.base, **_cli_values(spec), **spec.methods[label], **controlled}
    cfg = _layered_config(spec, layers, f"methods.{label}", "fix it in `base:` or in the label's overrides")
    if cap and cfg.lr_schedule != "constant":
        raise _error(spec.path, f"methods.{label}", f"lr_schedule={cfg.lr_schedule} needs the run's length: set `steps` in base")
    return cfg


def base_config(spec: Spec, out: Path) -> TrainConfig:
    """The config of the spec's base (and its command line) with no label's overrides, at the
    last reported seed, on the test split: its teacher is "the teacher" of the report (the
    target's and the teacher's pass@1), so a label that degrades its own teacher
    (``oracle_decay``) moves neither; the first label's method, so that base knobs of it apply."""
    first, seed = next(iter(spec.methods)), spec.seeds[-1]
    layers = {**RUN_DEFAULTS, **spec.base, **_cli_values(spec), "method": spec.methods[first].get("method", "opd"),
              "seed": seed, "run_dir": str(run_path(out, first, seed)), "eval_split": "test"}
    return _layered_config(spec, layers, "base", "the report's teacher is the base's")


def _layered_config(spec: Spec, layers: dict, where: str, hint: str) -> TrainConfig:
    """The config of the merged ``layers``; a bad value raises an error naming the spec's
    ``where`` key, with ``hint``."""
    from opd.config.train import train_config

    try:
        return train_config(None, [], base=layers)[0]
    except ConfigError as e:
        raise _error(spec.path, where, f"{e} ({hint})") from None


def _cli_values(spec: Spec) -> dict:
    """The command line's config keys, parsed as ``key=value`` text against the spec's base."""
    from opd.config.loader import load_config

    if not spec.cli:
        return {}
    try:
        cfg = load_config(TrainConfig, None, spec.cli, base={**RUN_DEFAULTS, **spec.base})
    except ConfigError as e:
        raise UserError(f"command line: {e}") from None
    return {key: getattr(cfg, key) for key in _cli_dict(spec.cli)}


def check_all(spec: Spec, out: Path) -> None:
    """Build every config the comparison will run, so that a bad one fails before any run."""
    for label in spec.methods:
        for lr in spec.lr_grid:
            for seed in spec.tuning_seeds:
                run_config(spec, label, seed, lr, _tune_path(spec, out, label, lr, seed), tune=True)
        for seed in spec.seeds:
            run_config(spec, label, seed, spec.lr_grid[0] if spec.lr_grid else None, run_path(out, label, seed))


def run_path(out: Path, label: str, seed: int) -> Path:
    return out / "runs" / label / f"seed{seed}"


def tune_dir(out: Path, label: str, lr: float, seed: int | None = None) -> Path:
    """A tuning run's folder; ``seed`` for every tuning seed after the first."""
    return out / "tune" / label / (f"lr{lr:g}" if seed is None else f"lr{lr:g}-seed{seed}")


def _tune_path(spec: Spec, out: Path, label: str, lr: float, seed: int) -> Path:
    """The first tuning seed keeps the one-seed folder, so a spec that adds a seed reuses its runs."""
    return tune_dir(out, label, lr, None if seed == spec.tuning_seed else seed)


# ---------------------------------------------------------------- runs


def forget_results(spec: Spec, out: Path) -> int:
    """Delete the saved results of ``spec``'s labels under ``out`` (``--force``: every run is
    recomputed, and a killed forced comparison reuses none of the old ones); returns how many."""
    paths = [p for label in spec.methods for where in ("runs", "tune") for p in (out / where / label).glob(f"*/{RESULT_FILE}")]
    for path in paths:
        path.unlink()
    return len(paths)


def _say(what: str, result: dict, metric: str = "accuracy") -> None:
    value = result["history"][-1].get(f"eval/{metric}", float("nan"))
    how = " (reused)" if result["reused"] else " (extended from a shorter budget)" if result.get("extended") else ""
    print(f"{what}: {metric} {value:.3f}{how}", flush=True)


def run_degeneracy(runs: dict) -> list[str]:
    """The knobs that make a label's method reduce to another one, as its runs recorded
    them (``degenerate/<knob>`` in the first step's metrics, :mod:`opd.methods.degeneracy`)."""
    from opd.methods.degeneracy import degenerate_knobs
    from opd.run.metrics_log import read_metrics

    return degenerate_knobs([row for run in runs.values() for row in read_metrics(run["run_dir"])])


def _tune_label(spec: Spec, out: Path, label: str, force: bool, by_seed: dict | None = None) -> tuple[dict, float, bool]:
    """``(score by lr, chosen lr, bracketed)`` for one label (:func:`opd.compare.protocol.tune_lr`),
    the score being ``spec.tune_metric``; ``by_seed`` (when given) collects each tuning
    seed's score, ``{"%g" lr: {seed: score}}``."""
    def score(lr: float) -> float:
        """The final validation ``spec.tune_metric`` at ``lr``, the mean over the tuning seeds."""
        values = {}
        for seed in spec.tuning_seeds:
            result = run_or_reuse(run_config(spec, label, seed, lr, _tune_path(spec, out, label, lr, seed), tune=True), force)
            _say(f"tune {label} lr {lr:g}" + (f" seed {seed}" if len(spec.tuning_seeds) > 1 else ""), result, spec.tune_metric)
            values[str(seed)] = result["history"][-1].get(f"eval/{spec.tune_metric}", float("nan"))
        if by_seed is not None:
            by_seed[f"{lr:g}"] = values
        return sum(values.values()) / len(values)

    return protocol.tune_lr(spec.lr_grid, score, spec.lr_extend)


def tune(spec: Spec, out: Path, force: bool) -> dict | None:
    """Each label's lr: final validation accuracy on the tuning seed over the grid, widened
    past an edge choice (see :func:`_tune_label`)."""
    if not spec.lr_grid:
        return None
    grid, chosen, bracketed, by_seed = {}, {}, {}, {}
    for label in spec.methods:
        by_seed[label] = {}
        scores, chosen[label], bracketed[label] = _tune_label(spec, out, label, force, by_seed[label])
        grid[label] = {f"{lr:g}": acc for lr, acc in sorted(scores.items())}
    return {"grid": grid, "chosen": chosen, "bracketed": bracketed, "seed": spec.tuning_seed, "seeds": spec.tuning_seeds,
            "metric": spec.tune_metric, "by_seed": by_seed}


def teacher_accuracy(cfg: TrainConfig, sampled: bool = False) -> float | None:
    """The teacher's greedy accuracy on ``cfg``'s evaluation problems, when it can generate
    and the problems have answers (else None); ``sampled``: its accuracy with one sample per
    problem at ``cfg.eval_temperature`` (seeded by ``cfg.seed``), the teacher's pass@1."""
    import torch

    from opd.run.setup import build_setup

    setup = build_setup(cfg)
    teacher, problems, env = setup.env.teacher, setup.eval_problems, setup.env
    if teacher is None or not hasattr(teacher, "generate") or not all(p.answer for p in problems):
        return None
    how = dict(temperature=cfg.eval_temperature, generator=torch.Generator().manual_seed(cfg.seed)) if sampled else dict(temperature=0.0)
    completions = teacher.generate([env.encode_prompt(p) for p in problems], max_new_tokens=env.max_new_tokens, **how)
    return sum(env.verify(p, c) for p, c in zip(problems, completions)) / len(problems)


def compare(spec_path: str, out_dir: str | None = None, overrides: list[str] = (), force: bool = False, jobs: int = 1) -> dict:
    """Run (or reuse) every label x seed under the budget and write the report; returns the
    summary. ``force``: recompute every run; ``jobs`` > 1: the runs on that many worker
    processes first (:mod:`opd.compare.parallel`), then this serial pass reuses them."""
    import torch

    from opd.compare.parallel import prerun
    from opd.compare.report import write_compare_report

    if jobs < 1:
        raise UserError(f"--jobs {jobs}: the number of worker processes must be at least 1")
    spec = load_spec(spec_path, overrides)
    out = Path(out_dir or Path("runs") / "compare" / Path(spec_path).stem)
    check_all(spec, out)
    if force:
        forget_results(spec, out)
    if jobs > 1:
        prerun(spec, out, jobs, torch.get_num_threads(), sys.modules[__name__])
    lr_info = tune(spec, out, False)
    labels = {}
    for label in spec.methods:
        lr = lr_info["chosen"][label] if lr_info else None
        runs = {}
        for seed in spec.seeds:
            cfg = run_config(spec, label, seed, lr, run_path(out, label, seed))
            result = run_or_reuse(cfg)
            _say(f"{label} seed {seed}", result)
            runs[seed] = {"history": result["history"], "run_dir": cfg.run_dir, "reused": result["reused"],
                          "machine": result.get("machine")}  # None: saved before runs said where they ran
        labels[label] = {"lr": cfg.lr, "method": cfg.method, "overrides": spec.methods[label], "runs": runs,
                         "degenerate": run_degeneracy(runs), "ppo_epochs": cfg.ppo_epochs,
                         "student_base": student_base(cfg)}
    summary = {"spec": spec_path, "seeds": spec.seeds, "budget_kind": spec.budget_kind, "budget": spec.budget,
               "eval_size": cfg.eval_size, "labels": labels, "lr_info": lr_info}
    teacher_cfg = base_config(spec, out)
    summary["results"] = results_of(spec, summary, teacher_accuracy(teacher_cfg) if spec.target else None)
    if "pass@1" in spec.judge:  # the teacher's own sampled accuracy, beside the students'
        summary["results"]["teacher_pass@1"] = teacher_accuracy(teacher_cfg, sampled=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / RESULTS_FILE).write_text(json.dumps(summary["results"], indent=1))
    path = write_compare_report(out, summary)
    print(f"report: {path}")
    return summary
