"""``opd compare`` end to end on a tiny student, reuse/recompute equality, the budget stop, spec errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from opd.cli import main
from opd.compare import protocol
from opd.compare.driver import compare, load_spec
from opd.config.loader import ConfigError, load_config
from opd.errors import UserError
from opd.run.metrics_log import read_metrics
from opd.run.runner import Run
from opd.config.train import TrainConfig


def _write_spec(tmp_path, student, **changes):
    spec = {
        "base": {"student": student, "teacher": "oracle", "prompts_per_step": 4, "group_size": 2, "micro_batch_size": 8,
                 "max_new_tokens": 40, "eval_size": 8, "eval_k": 2},
        "methods": {"opd": {"method": "opd"}, "opd_g1": {"method": "opd", "gamma": 1}},
        "seeds": [0, 1], "budget_kind": "sequences", "budget": 20, "lr_grid": [1e-3, 3e-3], "eval_every": 2, "lr_extend": 1,
    }
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _numbers(summary):
    """Every evaluation row of every run, without wall time (the one counter that varies)."""
    return {(label, seed): [{k: v for k, v in row.items() if k != "usage/wall_s"} for row in run["history"]]
            for label, entry in summary["labels"].items() for seed, run in entry["runs"].items()}


def _losses(out):
    runs = sorted((out / "runs").glob("*/seed*"))
    return [[{k: v for k, v in r.items() if k.startswith("loss/")} for r in read_metrics(d)] for d in runs]


def test_compare_writes_report_and_reruns_give_the_same_numbers(tiny_student_dir, tmp_path):
    spec, out = _write_spec(tmp_path, tiny_student_dir, judge=["pass@2"], planned=["opd_g1:opd"]), tmp_path / "out"
    first = compare(spec, str(out))
    report = (out / "report.md").read_text()
    for name in ("accuracy_sequences.png", "accuracy_teacher_tokens.png", "accuracy_wall_time.png", "summary.json"):
        assert (out / name).stat().st_size > 0
    assert "| opd_g1 | opd |" in report and "2 seeds (0, 1)" in report and "| label | lr " in report
    assert "| chosen | bracketed |" in report and "## Verdicts" in report and "Rule: A beats B only when" in report
    results = json.loads((out / "results.json").read_text())
    assert set(results["metric_verdicts"]) == {"pass@2"}  # the spec's judge
    assert results["planned"] == [["opd_g1", "opd"]] and results["verdicts"][0]["planned"]
    assert results["seeds"] == [0, 1] and results["tuning_seed"] == 2 and results["budget"] == {"kind": "sequences", "value": 20}
    assert set(results["labels"]) == {"opd", "opd_g1"} and len(results["verdicts"]) == 1
    for label, scores in results["lr_tuning"].items():  # each lr's score is the mean of the seeds' scores kept beside it
        by_seed = results["lr_tuning_by_seed"][label]
        assert set(by_seed) == set(scores) and results["tuning_seeds"] == [2, 3]
        for lr, score in scores.items():
            assert sorted(by_seed[lr]) == ["2", "3"] and (by_seed[lr]["2"] + by_seed[lr]["3"]) / 2 == pytest.approx(score)
    assert isinstance(results["protocol"]["split_seeds"], list)
    tuned = {label: {"scores": scores, "chosen": results["chosen_lr"][label]} for label, scores in results["lr_tuning"].items()}
    assert results["protocol"]["beside_collapse"] == protocol.collapse_sentences(tuned)  # as kept in results.json
    assert set(results["labels"]["opd"]["final"]) == {"0", "1"} and results["labels"]["opd"]["final"]["0"]["optimizer_steps"] == 3
    unmet = " ".join(results["protocol"]["unmet"])
    assert "2 reported seed(s)" in unmet and "at least 4" in unmet and "8 held-out test prompts" in unmet
    assert "`teacher/entropy`" in report and "`rollout/length`" in report
    sha = results["labels"]["opd"]["student_base"]["weights_sha256"]
    assert results["labels"]["opd_g1"]["student_base"] == {"student": tiny_student_dir, "weights_sha256": sha}
    assert f"Student base: `{tiny_student_dir}` (weights sha256 {sha[:12]})" in report
    from opd.compare.saved_runs import machine
    here = machine()
    assert "torch " in here and results["labels"]["opd"]["machines"] == {"0": here, "1": here}
    assert f"Computed on: {here}." in report and json.loads((out / "runs/opd/seed0/result.json").read_text())["machine"] == here
    for label, entry in first["labels"].items():
        assert entry["lr"] == first["lr_info"]["chosen"][label] and f"{entry['lr']:g}" in first["lr_info"]["grid"][label]
        for seed, run in entry["runs"].items():
            assert run["run_dir"] == str(out / "runs" / label / f"seed{seed}")
            assert [r["usage/sequences"] for r in run["history"]] == [0, 16, 24]  # eval at step 2 and at the stop (3)
    assert (out / "tune/opd/lr0.001/result.json").exists()
    losses = _losses(out)
    reused = compare(spec, str(out))
    assert all(run["reused"] for entry in reused["labels"].values() for run in entry["runs"].values())
    forced = compare(spec, str(out), force=True)
    assert not any(run["reused"] for entry in forced["labels"].values() for run in entry["runs"].values())
    assert _numbers(first) == _numbers(reused) == _numbers(forced)
    assert _losses(out) == losses and any(row for run in losses for row in run)
    lengths = {row["eval/length"] for rows in _numbers(first).values() for row in rows}
    assert len(lengths) > 1  # the numbers compared are not all one constant
    assert forced["lr_info"] == first["lr_info"]


def test_changed_config_is_rerun_not_reused(tiny_student_dir, tmp_path):
    spec, out = _write_spec(tmp_path, tiny_student_dir, seeds=1, lr_grid=None, budget=8, methods={"opd": {}}), tmp_path / "o"
    compare(spec, str(out))
    again = compare(spec, str(out), overrides=["kl_coef=0.5"])
    assert not again["labels"]["opd"]["runs"][0]["reused"]
    assert json.loads((out / "runs/opd/seed0/result.json").read_text())["config"]["kl_coef"] == 0.5
    assert "One seed (0)" in (out / "report.md").read_text()


@pytest.mark.parametrize("kind, budget", [("sequences", 20), ("teacher_tokens", 300), ("steps", 2), ("wall_s", 1e-9)])
def test_budget_stop_evaluates_and_saves_at_the_first_step_that_reaches_it(tiny_cfg, kind, budget):
    cfg = tiny_cfg(method="opd", steps=50, eval_every=0, budget_kind=kind, budget=budget)
    history = Run(cfg).fit()
    rows = read_metrics(cfg.run_dir)
    counter = "step" if kind == "steps" else f"usage/{kind}"
    last, before = rows[-1], rows[-2]
    assert last[counter] >= budget and (len(rows) == 2 or before[counter] < budget)  # not one step more
    assert "eval/accuracy" in last and history[-1]["usage/sequences"] == last["usage/sequences"]
    assert (Path(cfg.run_dir) / f"checkpoints/step_{last['step']:06d}").is_dir()
    if kind == "sequences":
        assert last["step"] == 3 and last["usage/sequences"] == 24


def test_budget_config_errors():
    with pytest.raises(ConfigError, match="needs a budget"):
        load_config(TrainConfig, None, ["budget_kind=sequences"])
    with pytest.raises(ConfigError, match="'budget' must be > 0"):
        load_config(TrainConfig, None, ["budget=0"])
    assert load_config(TrainConfig).budget is None and load_config(TrainConfig).budget_kind == "steps"


@pytest.mark.parametrize("changes, match", [
    ({"methods": {"x": {"method": "nope"}}}, r"methods\.x: .*'method' must be one of"),
    ({"methods": {"mystery": {}}}, r"not a method name"),
    ({"methods": {}}, r"methods: needs at least one"),
    ({"base": {"lr_grdi": 1}}, r"unknown config key 'lr_grdi'"),
    ({"methods": {"opd": {"gama": 1}}}, r"methods\.opd: unknown config key 'gama'; did you mean 'gamma'"),
    ({"seed": [1]}, r"unknown spec key; did you mean 'seeds'"),
    ({"base": {"seed": 3}}, r"base: 'seed' is set by the comparison"),
    ({"methods": {"opd": {"lr": 1e-3}}}, r"'lr' is chosen from lr_grid"),
    ({"budget_kind": "tokens"}, r"budget_kind: must be one of"),
    ({"seeds": []}, r"seeds: must be a count"),
    ({"judge": ["accuracy"]}, r"judge: takes pass@k at the runs' eval_k"),
    ({"judge": ["pass@8"]}, r"judge: pass@8 is not measured: the runs evaluate pass@2 \(set `eval_k: 8`"),
    ({"judge": ["pass@0"]}, r"judge: takes pass@k at the runs' eval_k"),
    ({"judge": ["pass@1"]}, r"judge: pass@1 is not measured: the runs evaluate pass@2 \(set `eval_k: 1`"),
    ({"planned": "opd:opd_g1"}, r"planned: lists the pairs of labels to correct over, e.g. \[opd:grpo"),
    ({"planned": ["opd"]}, r"planned: 'opd' is not a pair of two labels: write it as a:b"),
    ({"planned": ["opd:opd"]}, r"planned: 'opd:opd' is not a pair of two labels"),
    ({"planned": ["opd:grpo"]}, r"planned: 'opd:grpo' names 'grpo', not a label under methods: \(labels: opd, opd_g1\)"),
    ({"planned": ["opd:opd_g1", ["opd_g1", "opd"]]}, r"planned: \['opd_g1', 'opd'\] is listed twice; list each pair once"),
])
def test_spec_errors_name_the_problem_before_any_run(tiny_student_dir, tmp_path, changes, match):
    spec = _write_spec(tmp_path, tiny_student_dir, **changes)
    with pytest.raises(UserError, match=match):
        compare(spec, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_judge_takes_the_sampled_accuracy_at_eval_k_1(tiny_student_dir, tmp_path):
    """pass@1 (the accuracy of one sample at eval_temperature) is judged when the runs take one
    sample; a greedy-accurate but diffuse model shows there (modchain_promise_x4_3200's SFT)."""
    assert load_spec(_write_spec(tmp_path, tiny_student_dir, judge=["pass@1"]), ["eval_k=1"]).judge == ["pass@1"]


def test_the_teachers_sampled_accuracy_is_seeded_and_below_its_greedy(tiny_cfg):
    """``teacher_accuracy(sampled=True)``: one sample per problem at eval_temperature, seeded;
    a blunt oracle (sharpness 2) errs when sampled and never greedy. The report puts it next
    to the students' pass@1."""
    from opd.compare.driver import teacher_accuracy
    from opd.compare.report import verdict_text

    cfg = tiny_cfg(oracle_sharpness=2.0, eval_size=64, eval_k=1)
    sampled = teacher_accuracy(cfg, sampled=True)
    assert teacher_accuracy(cfg) == 1.0 and 0.0 <= sampled < 0.9
    assert teacher_accuracy(cfg, sampled=True) == sampled  # the same seed, the same samples
    assert teacher_accuracy(tiny_cfg(eval_size=64, eval_k=1), sampled=True) > sampled  # a sharper oracle errs less
    results = {"rule": "r", "verdicts": [], "teacher_pass@1": 0.25, "metric_verdicts": {"pass@1": []},
               "labels": {"a": {"final": {"0": {"pass@1": 0.5}, "1": {"pass@1": 0.7}}}}}
    assert "On `pass@1` (final; mean ± std over seeds: a 0.600 ± 0.141; the teacher 0.250):" in verdict_text(results)


def test_cli_reports_a_bad_spec_and_applies_spec_overrides(tiny_student_dir, tmp_path, capsys):
    spec = _write_spec(tmp_path, tiny_student_dir)
    assert main(["compare", spec, "--out", str(tmp_path / "o"), "gama=1"]) == 2
    assert "unknown config key 'gama'" in capsys.readouterr().err
    with pytest.raises(UserError, match="'method' is set per label"):
        load_spec(spec, ["method=grpo"])
    loaded = load_spec(spec, ["seeds=3", "budget=64", "lr=1e-4", "lr_grid=null"])
    assert loaded.seeds == [0, 1, 2] and loaded.budget == 64 and loaded.lr_grid == [] and loaded.cli == ["lr=1e-4"]
    assert loaded.planned is None and load_spec(spec, ["planned=[opd_g1:opd]"]).planned == [("opd_g1", "opd")]


def test_example_spec_builds_every_config(tmp_path):
    from opd.compare.driver import check_all, run_config

    spec = load_spec(str(Path(__file__).resolve().parents[1] / "experiments/compare_example.yaml"))
    check_all(spec, tmp_path)
    cfg = run_config(spec, "grpo", 2, 1e-5, tmp_path / "r")
    assert (cfg.method, cfg.group_size, cfg.prompts_per_step, cfg.seed, cfg.lr) == ("grpo", 8, 4, 2, 1e-5)
    assert (cfg.budget_kind, cfg.budget, cfg.eval_split, cfg.eval_every) == ("sequences", 768, "test", 6)
    assert run_config(spec, "opd_g1", 0, 1e-5, tmp_path / "t", tune=True).eval_split == "val"


def test_the_reports_teacher_is_the_bases_not_a_labels_degraded_one(tmp_path):
    """A label that degrades its own teacher (``oracle_decay``, here the last one) sets
    neither the target nor the teacher's pass@1: the report's teacher is the base's, with
    the spec's command line, the last reported seed and the test split."""
    from opd.compare.driver import base_config

    methods = {"opd": {"method": "opd"}, "decayed": {"method": "opd", "oracle_decay": 0.05, "oracle_decay_mode": "position"}}
    spec = load_spec(_write_spec(tmp_path, "testbed", methods=methods, seeds=[0, 3]), ["max_new_tokens=32"])
    cfg = base_config(spec, tmp_path / "out")
    assert (cfg.oracle_decay, cfg.teacher, cfg.seed, cfg.eval_split, cfg.max_new_tokens) == (0.0, "oracle", 3, "test", 32)


def test_a_moved_output_folder_is_still_reused(tiny_student_dir, tmp_path):
    """The run folder is not part of what a run is: a comparison moved (or named by another
    relative path) reuses its finished runs, with the same numbers."""
    import shutil

    spec, out = _write_spec(tmp_path, tiny_student_dir, seeds=1, lr_grid=None, budget=8, methods={"opd": {}}), tmp_path / "o"
    first = compare(spec, str(out))
    shutil.move(str(out), str(tmp_path / "moved"))
    again = compare(spec, str(tmp_path / "moved"))
    assert again["labels"]["opd"]["runs"][0]["reused"] and _numbers(again) == _numbers(first)


def test_a_run_from_other_student_weights_is_rerun_not_reused(tiny_student_dir, tmp_path):
    """The same config on another build of the student (one changed weight file) is another
    run; a saved run from before the hash was recorded is still reused."""
    import shutil

    student = tmp_path / "student"
    shutil.copytree(tiny_student_dir, student)
    spec, out = _write_spec(tmp_path, str(student), seeds=1, lr_grid=None, budget=8, methods={"opd": {}}), tmp_path / "o"
    first = compare(spec, str(out))
    saved = json.loads((out / "runs/opd/seed0/result.json").read_text())
    assert saved["student_sha256"] == first["labels"]["opd"]["student_base"]["weights_sha256"] is not None
    assert all(run["reused"] for run in compare(spec, str(out))["labels"]["opd"]["runs"].values())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(student)  # another build of the student: other weights, the same config
    again = compare(spec, str(out))
    assert not any(run["reused"] for run in again["labels"]["opd"]["runs"].values())
    assert again["labels"]["opd"]["student_base"]["weights_sha256"] != saved["student_sha256"]
    old = json.loads((out / "runs/opd/seed0/result.json").read_text())
    del old["student_sha256"]
    (out / "runs/opd/seed0/result.json").write_text(json.dumps(old))
    assert all(run["reused"] for run in compare(spec, str(out))["labels"]["opd"]["runs"].values())


def test_a_run_from_before_a_new_config_key_is_reused_at_its_default(tiny_student_dir, tmp_path):
    """A key added to the config after a run finished is absent from its result.json: the
    run is reused while the spec leaves the key at its default, and rerun when it does not."""
    spec, out = _write_spec(tmp_path, tiny_student_dir, seeds=1, lr_grid=None, budget=8, methods={"opd": {}}), tmp_path / "o"
    compare(spec, str(out))
    path = out / "runs/opd/seed0/result.json"
    saved = json.loads(path.read_text())
    assert saved["config"].pop("oracle_noise_kind") == "uniform"
    path.write_text(json.dumps(saved))
    assert compare(spec, str(out))["labels"]["opd"]["runs"][0]["reused"]
    path.write_text(json.dumps(saved))
    assert not compare(spec, str(out), overrides=["oracle_noise_kind=off_by_one"])["labels"]["opd"]["runs"][0]["reused"]


def test_jobs_run_every_run_in_workers_with_the_serial_numbers(tiny_student_dir, tmp_path, capsys):
    spec = _write_spec(tmp_path, tiny_student_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each worker runs one thread: the same arithmetic as this serial run
    try:
        serial = compare(spec, str(tmp_path / "serial"))
        capsys.readouterr()
        parallel = compare(spec, str(tmp_path / "parallel"), jobs=2)
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out.splitlines()
    assert _numbers(parallel) == _numbers(serial) and parallel["lr_info"] == serial["lr_info"]
    assert any(len(grid) > 2 for grid in serial["lr_info"]["grid"].values())  # a widening wave ran
    results = sorted(p.relative_to(tmp_path / "parallel") for p in (tmp_path / "parallel").glob("*/*/*/result.json"))
    assert results == sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").glob("*/*/*/result.json"))
    workers = [ln for ln in printed if ln.endswith("(worker)")]
    assert len(workers) == len(results)  # every run in a worker, none twice
    here = [ln for ln in printed if ": accuracy" in ln and not ln.endswith("(worker)")]
    assert len(here) == len(results) and all(ln.endswith("(reused)") for ln in here)


def test_jobs_below_one_is_refused(tiny_student_dir, tmp_path, capsys):
    spec = _write_spec(tmp_path, tiny_student_dir)
    assert main(["compare", spec, "--out", str(tmp_path / "out"), "--jobs", "0"]) == 2
    assert "--jobs 0: the number of worker processes must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_run_that_fails_in_a_worker_raises_its_error_here(tmp_path):
    from opd.testbed.builder import save_initial

    student = save_initial(tmp_path / "student", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2), seed=0)
    (Path(student) / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(UserError, match="cannot load the student"):
        compare(_write_spec(tmp_path, str(student)), str(tmp_path / "out"), jobs=2)
    assert not list((tmp_path / "out").glob("*/*/*/result.json"))


def test_the_report_names_a_testbed_base_seed_other_than_0():
    from opd.compare.report import bases_text

    labels = {"a": {"student_base": {"student": "testbed-x4", "base_seed": 1, "weights_sha256": "f" * 64}},
              "b": {"student_base": {"student": "testbed-x4", "weights_sha256": "0" * 64}}}
    text = bases_text({"labels": labels})
    assert "`testbed-x4` with `base_seed=1` (weights sha256 ffffffffffff) for a" in text
    assert "`testbed-x4` (weights sha256 000000000000) for b" in text


def test_student_base_records_base_seed_only_when_set(monkeypatch):
    from opd.compare import saved_runs
    from opd.config.train import TrainConfig

    monkeypatch.setattr(saved_runs, "student_sha256", lambda cfg: "abc")
    assert saved_runs.student_base(TrainConfig(student="testbed-x4")) == {"student": "testbed-x4", "weights_sha256": "abc"}
    assert saved_runs.student_base(TrainConfig(student="testbed-x4", base_seed=2))["base_seed"] == 2
