"""The probed experiment scripts end to end, at a smoke size: a real subprocess runs
``experiments/detour.py`` and ``experiments/myopic.py`` on a tiny student, and each writes
its probe into ``results.json`` with verdicts on the probe's metrics."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from opd.compare import verdicts

from run_helpers import experiment_script as _script
from run_helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["seeds=2", "budget=8", "lr_grid=null", "lr=1e-3", "eval_size=4", "eval_every=0", "micro_batch_size=8"]


def _run(script: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "experiments" / script), *args, "--out", str(out), "--no-publish", "--probe-prompts", "3"]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(not published)" in done.stdout
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def tiny_ring_student(tmp_path_factory):
    from opd.testbed import ring
    from opd.testbed.builder import save_initial

    arch = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return str(save_initial(tmp_path_factory.mktemp("ring_student"), arch, seed=0, extra_words=ring.WORDS))


def test_the_detour_script_probes_every_run_and_judges_it(tiny_ring_student, tmp_path):
    results = _run("detour.py", ["ring", "--set", *SMOKE, f"student={tiny_ring_student}"], tmp_path)
    probe = results["probe"]
    assert probe["prompts_per_depth"] == 3 and set(probe["base"]) == {"1", "4", "8"}
    assert set(probe["labels"]) == set(results["labels"]) == {"sft", "grpo", "opd", "opd_continuing"}
    assert all(set(by_seed) == {"0", "1"} for by_seed in probe["labels"].values())
    assert {"probe/back", "probe/recovery", "probe/stops_short"} <= set(results["metric_verdicts"])
    final = results["labels"]["opd"]["final"]["1"]
    assert 0.0 <= final["probe/back"] <= 1.0 and final["probe/back"] == pytest.approx(
        sum(d["back"] for d in probe["labels"]["opd"]["1"].values()) / 3)


def test_the_myopic_script_still_probes_corrections(tiny_student_dir, tmp_path):
    results = _run("myopic.py", ["--jobs", "2", "--set", *SMOKE, f"student={tiny_student_dir}"], tmp_path)
    assert results["spec"] == "experiments/myopic.yaml"  # the default spec, named relative to the checkout
    assert set(results["probe"]["base"]) == {"1", "2", "4"}
    assert {"probe/onset", "probe/wait_redo", "probe/recovery", "probe/false_onset"} <= set(results["metric_verdicts"])


def test_the_orders_script_probes_both_openings(tiny_student_dir, tmp_path):
    results = _run("orders.py", ["--set", *SMOKE, f"student={tiny_student_dir}"], tmp_path)
    assert results["spec"] == "experiments/eopd_orders_tune2.yaml"
    probe = results["probe"]
    assert set(probe["base"]) == {"1", "2", "4"} and set(probe["labels"]) == {"opd_one_order", "opd", "eopd"}
    assert {"probe/p_swap", "probe/swap_onset", "probe/swap_recovery"} <= set(results["metric_verdicts"])
    depths = probe["labels"]["eopd"]["0"].values()
    assert all(0 < d["n"] <= 3 for d in depths) and all(0.0 <= d["p_swap"] <= 1.0 for d in depths)


def test_a_probed_script_probes_the_base_alone_without_training(tiny_student_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "experiments" / "orders.py"), "--base-only", "--no-publish", "--out", str(out),
           "--probe-prompts", "3", "--set", *SMOKE, f"student={tiny_student_dir}"]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads((out / "base_probe.json").read_text())
    assert probe["prompts_per_depth"] == 3 and set(probe["base"]) == {"1", "2", "4"} and not (out / "runs").exists()
    assert "| base (before training) | 1 |" in done.stdout




def test_grad_agreement_takes_the_loss_gradient_and_leaves_the_student_as_it_was(tiny_cfg):
    """The SFT gradient it captures equals a naive one: the token-mean NLL of the same
    problems' reference solutions, each sequence run alone, by autograd."""
    import torch

    from opd.run.loop import pick_problems, step_generator
    from opd.run.setup import build_setup

    ga = _script("grad_agreement")
    cfg = tiny_cfg(method="sft")
    setup = build_setup(cfg)
    model = setup.env.student
    before = [p.detach().clone() for p in model.parameters()]
    grads = ga.gradients(setup, cfg, 2)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not torch.allclose(grads[0], grads[1])

    problems = pick_problems(setup.train_pool, cfg.prompts_per_step, step_generator(ga.SEED, 0))
    model.zero_grad()
    nll, count = 0.0, 0
    for p in problems:
        x, y = setup.env.encode_prompt(p), setup.env.encode_solution(p)
        logp = torch.log_softmax(model(torch.tensor([x + y])).logits[0, len(x) - 1 : -1].float(), -1)
        nll = nll - logp[torch.arange(len(y)), torch.tensor(y)].sum()
        count += len(y)
    (nll / count).backward()
    naive = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(grads[0], naive, rtol=1e-4, atol=1e-6)


def test_agreement_is_the_mean_pairwise_cosine():
    import torch

    ga = _script("grad_agreement")
    g = torch.tensor([1.0, 2.0, 2.0])
    same = ga.agreement([g, 2 * g, 3 * g])
    assert same["agreement"] == pytest.approx(1.0) and same["pairs"] == 3 and same["grad_norm"] == pytest.approx(6.0)
    mixed = ga.agreement([g, -g, torch.tensor([2.0, -1.0, 0.0])])  # cosines -1, 0, 0
    assert mixed["agreement"] == pytest.approx(-1 / 3)


def test_tuning_noise_reads_margins_and_falls_from_results_files(tmp_path, monkeypatch):
    """On a hand-made results.json: the runner-up, the smallest lr inside the noise, and the
    label whose reported mean fell below its tuning value (by hand: noise of 0.5 vs 0.4 on 100
    prompts is 1.96*sqrt((0.25+0.24)/100) = 0.137 > 0.1, so 5e-4 is inside; 0.5 vs 0.2 is not)."""
    tn = _script("tuning_noise")
    results = {"test_prompts": 100, "verdicts": [{"sentence": "b beats a (mean difference +0.8)"}], "lr_tuning": {"a": {"0.0001": 0.2, "0.0005": 0.4, "0.001": 0.5}, "b": {"0.0001": 0.9, "0.001": 0.1}},
               "chosen_lr": {"a": 1e-3, "b": 1e-4},
               "labels": {"a": {"final": {"0": {"accuracy": 0.1}, "1": {"accuracy": 0.1}}},
                          "b": {"final": {"0": {"accuracy": 0.9}, "1": {"accuracy": 0.88}}}}}
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text(json.dumps(results))
    monkeypatch.setattr(tn, "RESULTS", tmp_path)
    tn.main()
    rows = {r["label"]: r for r in json.loads((tmp_path / "tuning_noise" / "results.json").read_text())["choices"]}
    assert rows["a"]["runner_up_lr"] == pytest.approx(5e-4) and not rows["a"]["decided"]
    assert rows["a"]["smallest_within_noise"] == pytest.approx(5e-4) and rows["a"]["reported_mean"] == pytest.approx(0.1)
    assert rows["b"]["decided"] and rows["b"]["smallest_within_noise"] == pytest.approx(1e-4)
    text = (tmp_path / "tuning_noise.md").read_text()
    assert "**1 of 2 choices are inside the noise**" in text and "**1 of 2 labels report a mean below" in text
    assert "- x a: 0.500 on the tuning seed (validation), 0.100 reported (test), lr 0.001; chosen inside the noise" in text
    assert "No comparison has been rerun on two tuning seeds." in text
    two = {**results, "tuning_seeds": [5, 6], "chosen_lr": {"a": 5e-4, "b": 1e-4},
           "verdicts": [{"sentence": "a beats b (mean difference +0.1)"}]}
    (tmp_path / "x_tune2").mkdir()
    (tmp_path / "x_tune2" / "results.json").write_text(json.dumps(two))
    tn.main()
    check = json.loads((tmp_path / "tuning_noise" / "results.json").read_text())["two_seed_checks"]
    assert check == [{"experiment": "x", "labels": 2, "lr_changed": ["a"], "beats_one_seed": ["b beats a"], "kept": [],
                      "lost": ["b beats a"], "new": ["a beats b"]}]
    assert "**0 of 1 \"beats\" verdicts stay**" in (tmp_path / "tuning_noise.md").read_text()


def test_multiple_comparisons_recomputes_verdicts_and_applies_holm(tmp_path, monkeypatch):
    """On a hand-made results.json judged by the bootstrap rule: two labels each just above a base
    (one seed below it: bootstrap p about 0.04, each a "beats" alone), three pairs, so Holm
    (0.05/3 first) keeps neither; the t rule (p 0.11) gives neither verdict."""
    mc = _script("multiple_comparisons")
    diffs = [0.03, -0.018, 0.04, 0.02, 0.03]
    acc = {"base": [0.6] * 5, "a": [0.6 + d for d in diffs], "b": [0.6 + d for d in diffs[2:] + diffs[:2]]}
    labels = {k: {"final": {str(s): {"accuracy": v} for s, v in enumerate(vals)}} for k, vals in acc.items()}
    committed = [{"a": "base", "b": "a", "verdict": "b", "interval": [-0.03, -0.001]},
                 {"a": "base", "b": "b", "verdict": "b", "interval": [-0.03, -0.001]},
                 {"a": "a", "b": "b", "verdict": "none", "interval": [-0.02, 0.02]}]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text(json.dumps({"seeds": list(range(5)), "labels": labels, "verdicts": committed,
                                                             "rule": verdicts.BOOTSTRAP_RULE}))
    monkeypatch.setattr(mc, "RESULTS", tmp_path)
    mc.main()
    row = json.loads((tmp_path / "multiple_comparisons" / "results.json").read_text())["comparisons"][0]
    assert (row["rule"], row["pairs"], row["beats"], row["holm_stay"], row["mismatched"]) == ("bootstrap", 3, 2, 0, [])
    # a vs base: |Σ±d| >= 0.102 only for the observed signs, the one with -0.018 flipped, and their negations
    assert row["min_sign_flip_p"] == pytest.approx(4 / 32) and row["same_sign_all_seeds"] == 0
    assert (row["t_beats"], row["t_go"], row["t_new"]) == (0, ["a beats base", "b beats base"], [])
    text = (tmp_path / "multiple_comparisons.md").read_text()
    assert "**Under the t rule 0 of the 2 \"beats\" verdicts the\nbootstrap rule published stay**" in text
    assert "over\nthe 1 bootstrap-judged comparisons 0 of the 2 \"beats\"" in text
    # a report judged by the t rule is recomputed under it: then nothing can go
    t_found = verdicts.all_verdicts({k: {str(s): v for s, v in enumerate(vals)} for k, vals in acc.items()})
    committed_t = [{k: v[k] for k in ("a", "b", "verdict", "interval")} for v in t_found]
    (tmp_path / "x" / "results.json").write_text(json.dumps({"seeds": list(range(5)), "labels": labels,
                                                             "verdicts": committed_t, "rule": verdicts.RULE}))
    mc.main()
    row = json.loads((tmp_path / "multiple_comparisons" / "results.json").read_text())["comparisons"][0]
    assert (row["rule"], row["mismatched"], row["t_go"]) == ("t", [], [])


def test_rule_level_measures_both_rules(tmp_path, monkeypatch):
    rl = _script("rule_level")
    monkeypatch.setattr(rl, "RESULTS", tmp_path / "docs" / "results")
    (tmp_path / "docs" / "results" / "x").mkdir(parents=True)
    finals = lambda xs: {"final": {str(i): {"accuracy": x} for i, x in enumerate(xs)}}  # noqa: E731
    pair = lambda a, b: {"a": a, "b": b, "seeds": [str(i) for i in range(5)]}  # noqa: E731
    committed = {"labels": {"a": finals([0.5, 0.5, 0.5, 0.5, 1.0]), "b": finals([0.5] * 5), "c": finals([0.4] * 5)},
                 "verdicts": [pair("a", "b"), pair("a", "c"), pair("b", "c")]}  # b - c: all equal, left out
    (tmp_path / "docs" / "results" / "x" / "results.json").write_text(json.dumps(committed))
    assert np.allclose(rl.observed_differences(), [[0, 0, 0, 0, 0.5], [0.1, 0.1, 0.1, 0.1, 0.6]])
    # by hand: [0, 0, 0, 0, 5] centred is [-1, -1, -1, -1, 4]: m2 = 4, m3 = 12, |g1| = 12 / 4^1.5 = 1.5
    assert rl.abs_skewness(np.array([[0, 0, 0, 0, 5.0], [1, -1, 1, -1, 0]])).tolist() == pytest.approx([1.5, 0.0])
    monkeypatch.setattr("sys.argv", ["rule_level.py", "--trials", "300"])
    rl.main()
    results = json.loads((tmp_path / "docs" / "results" / "rule_level" / "results.json").read_text())
    normal5 = results["level"]["normal"]["5"]
    assert normal5["t"] < 0.1 < normal5["bootstrap"]  # 300 trials: about 0.05 ± 0.025 and 0.16 ± 0.04
    power = results["power_5_seeds_normal"]
    assert power["3.0"]["t"] > 0.9 and power["0.5"]["t"] < power["0.5"]["bootstrap"]
    looks = results["two_looks"]  # 300 trials: first look about 0.05, the two together about 0.08
    assert looks["either"] == pytest.approx(looks["first_look"] + looks["after_null"])  # disjoint paths
    assert 0 < looks["after_null"] and looks["either"] < 0.2
    text = (tmp_path / "docs" / "results" / "rule_level.md").read_text()
    assert "| normal | 5 |" in text and f"either look says it in {looks['either']:.1%}" in text
    skew = results["skew"]
    assert skew["pairs"] == 2 and skew["observed_mean_abs_g1"] == pytest.approx(1.5)
    family = skew["family"]  # 300 trials: |g1| grows with the skew; the exponential's level above the normal's
    assert family["1"]["mean_abs_g1"] > family["4"]["mean_abs_g1"] > family["normal"]["mean_abs_g1"]
    assert family["1"]["t_level"] > family["normal"]["t_level"]
    assert "mean `|g1|`" in text and "2 judged pairs at 5 seeds" in text


def test_seed_subset_judges_the_given_seeds_alone():
    """By hand: a − b per seed is 0, 0, 0.4, 0.2, 0.3. Seeds 2-4: mean 0.3, sd 0.1, t(0.975, 2)
    4.303, interval 0.3 ± 0.248, so a beats b; all five: mean 0.18, sd 0.179, t(0.975, 4) 2.776,
    interval 0.18 ± 0.222, no difference."""
    ss = _script("seed_subset")
    finals = lambda xs: {"final": {str(i): {"accuracy": x} for i, x in enumerate(xs)}}  # noqa: E731
    results = {"labels": {"a": finals([0.5, 0.5, 0.9, 0.8, 0.7]), "b": finals([0.5, 0.5, 0.5, 0.6, 0.4])}}
    three = ss.subset(results, ["2", "3", "4"])
    (v,) = three["verdicts"]
    assert v["verdict"] == "a" and v["seeds"] == ["2", "3", "4"]
    assert v["interval"] == pytest.approx([0.3 - 4.3027 * 0.1 / 3 ** 0.5, 0.3 + 4.3027 * 0.1 / 3 ** 0.5], abs=1e-3)
    assert three["means"]["a"]["mean"] == pytest.approx(0.8) and three["rule"] == verdicts.RULE
    (v,) = ss.subset(results, ["0", "1", "2", "3", "4"], [("a", "b")])["verdicts"]
    assert v["verdict"] == "none" and v["interval"][0] == pytest.approx(0.18 - 0.222, abs=2e-3)
    with pytest.raises(SystemExit, match="no final result for seed"):
        ss.subset(results, ["2", "9"])
    with pytest.raises(SystemExit, match="unknown label"):
        ss.subset(results, ["2", "3"], [("a", "c")])


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_spec_builds_every_config(path, tmp_path):
    """Each ``experiments/*.yaml`` loads and builds every run's config (names, keys, values),
    so a spec typo fails here, not minutes into an experiment. Nothing is trained or built."""
    from opd.compare.driver import check_all, load_spec

    check_all(load_spec(str(path)), tmp_path)


def test_teacher_samples_classes_and_a_cold_teacher_writes_the_references(tiny_student_dir):
    ts = _script("teacher_samples")
    ref = ["1", "+", "2", "=", "3", "<eos>"]
    assert ts.sample_class(ref, ref) == "same"
    assert ts.sample_class(["1", "-", "wait", *ref], ref) == "wait"
    assert ts.sample_class(["1", "+", "2", "=", "4", "<eos>"], ref) == "other"
    base = dict(student=tiny_student_dir, teacher="oracle", task="addition", horizon=2, max_new_tokens=40)
    cold = ts.measure({**base, "temperature": 0.01}, prompts=12, seed=0)  # the oracle's mode is the reference
    assert cold["counts"]["accepted"]["same"] == 12 and cold["prompts"] == 12
    hot = ts.measure({**base, "temperature": 3.0}, prompts=12, seed=0)
    assert sum(n for by in hot["counts"].values() for n in by.values()) == 12
    assert hot["counts"]["accepted"]["same"] < 12
    assert 0 <= hot["wait_first"]["accepted"] <= hot["counts"]["accepted"]["wait"]
    assert ts.first_deviation(["1", "wait", *ref], ref) == "wait" and ts.first_deviation(ref, ref) is None


def test_teacher_samples_label_settings_override_the_base_and_an_unknown_label_is_named():
    ts = _script("teacher_samples")
    spec = {"base": {"temperature": 1.0, "horizon": 16}, "methods": {"cold": {"temperature": 0.7}, "plain": {}}}
    assert ts.spec_config(spec, None) == {"temperature": 1.0, "horizon": 16}
    assert ts.spec_config(spec, "cold") == {"temperature": 0.7, "horizon": 16}
    with pytest.raises(SystemExit, match="no label 'warm'.*cold, plain"):
        ts.spec_config(spec, "warm")


def test_budgets_names_where_the_lrs_came_from():
    budgets = _script("budgets")
    tuned = {"chosen_lr": {"sft": 3e-4, "opd": 1e-4}, "labels": {"sft": {"lr": 3e-4}, "opd": {"lr": 1e-4}}}
    assert budgets.lr_sentence(tuned) == "tuned once per label at the full budget (sft 0.0003, opd 0.0001)"
    untuned = {"chosen_lr": {}, "labels": {"sft": {"lr": 1e-5}, "opd": {"lr": 3e-5}}}
    assert "not tuned in this experiment (sft 1e-05, opd 3e-05;" in budgets.lr_sentence(untuned)


def test_grpo_stall_places_the_first_mistake_by_step_and_word():
    from opd.testbed import modchain_labeled
    from opd.testbed.oracle import OracleTeacher
    from opd.testbed.tasks import make_task
    from opd.testbed.tokenizer import build_tokenizer

    stall = _script("grpo_stall")
    tok = build_tokenizer(modchain_labeled.WORDS)
    oracle = OracleTeacher(tokenizer=tok, recovers=False)
    problem = make_task("modchain_labeled", 4).problems("test", 1, seed=0)[0]
    spec = problem.meta["spec"]
    prompt = tok(problem.prompt, add_special_tokens=False)["input_ids"]
    words = problem.solution.split() + ["<eos>"]

    def place(ws):
        return stall.first_mistake(oracle, prompt, tok.convert_tokens_to_ids(ws), ws)

    assert place(words) is None
    wrong_result = list(words)
    wrong_result[7 * 2 + 5] = str((int(words[7 * 2 + 5]) + 1) % spec.m)  # step 2's result
    assert place(wrong_result) == (2, 5)
    wrong_operand = list(words)
    wrong_operand[3] = str(int(words[3]) % (spec.m - 1) + 1)  # step 0's operand, another legal one
    assert place(wrong_operand) == (0, 3)
    committed = [(0, 0.372), (512, 0.174), (1024, 0.16)]
    assert stall.same_through([(0, 0.372), (512, 0.174), (1024, 0.2)], committed) == 512
    assert stall.same_through([(0, 0.3)], committed) == -1 and stall.same_through(committed, committed) == 1024
    wrong_answer = list(words)
    wrong_answer[-2] = str((int(words[-2]) + 1) % spec.m)
    assert place(wrong_answer) == (4, 1)


def test_grpo_ratio_rows_show_each_seeds_crossing_and_the_mean_only_when_all_reached():
    from opd.compare.verdicts import target_summary

    ratio = _script("grpo_ratio")
    rows = lambda evals: [{"eval/accuracy": a, "usage/sequences": n} for n, a in evals]  # noqa: E731
    reaches = {"grpo": target_summary({0: rows([(0, 0.3), (512, 0.95)]), 1: rows([(0, 0.3), (512, 0.5)])}, 0.9),
               "opd": target_summary({0: rows([(0, 0.3), (512, 0.91)]), 1: rows([(0, 0.3), (1024, 0.92)])}, 0.9)}
    assert ratio.reach_rows(reaches) == [["grpo", "512", "not reached", "1 of 2", "-"],
                                         ["opd", "512", "1,024", "2 of 2", "768"]]
    final = {"accuracy": 0.75, "by_modulus": {"5": {"problems": 2, "right": 2}, "7": {"problems": 2, "right": 1}}}
    assert ratio.modulus_rows({3: final}) == [["3", "0.750", "1.000", "0.500"]]


def test_step_trace_reads_training_rows_and_their_early_mean(tmp_path):
    st = _script("step_trace")
    rows = [{"step": 0, "rollout/budget": 256}, {"eval/accuracy": 0.5}, {"step": 1, "rollout/budget": 80},
            {"step": 2, "rollout/budget": 100}, {"step": 3, "rollout/budget": 256}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    trace = st.seed_trace(path, ["rollout/budget"])["rollout/budget"]
    assert trace["steps"] == [256, 80, 100, 256]  # the evaluation row is not a step
    assert trace["early_mean"] == (256 + 80 + 100 + 256) / 4 and trace["first_back_at_max"] == 3
