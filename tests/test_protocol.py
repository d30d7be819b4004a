"""The comparison protocol (grid rules, widening past an edge, the tuning seed) and the
verdict rule (paired bootstrap over seeds), on known numbers."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from opd.compare import driver, protocol, verdicts
from opd.compare.driver import load_spec
from opd.errors import UserError


def test_grid_rules():
    assert protocol.grid_problems([1e-4, 3e-4, 1e-3, 3e-3]) == []
    few_wide = protocol.grid_problems([1e-4, 1e-3])
    assert len(few_wide) == 2 and "2 distinct value(s)" in few_wide[0] and "0.0001→0.001 (10x)" in few_wide[1]
    assert protocol.grid_problems([]) == ["no lr_grid: every label ran at its config's lr, untuned"]
    assert protocol.next_lr([1e-4, 3e-4, 1e-3], 1e-3) == pytest.approx(1e-3 / 0.3)  # the edge's own spacing
    assert protocol.next_lr([1e-4, 3e-4, 1e-3], 1e-4) == pytest.approx(1e-4 / 3)
    assert protocol.next_lr([1e-4, 3e-4, 1e-3], 3e-4) is None


def test_unmet_lists_every_rule_not_met():
    met = protocol.unmet(seeds=[0, 1, 2, 3, 4], tuning_seeds=[5, 6], grid=[1e-4, 3e-4, 1e-3, 3e-3], unbracketed=[],
                         budget=512, test_size=500)
    assert met == []
    one = protocol.unmet(seeds=[0, 1, 2, 3, 4], tuning_seeds=[5], grid=[1e-4, 3e-4, 1e-3, 3e-3], unbracketed=[],
                         budget=512, test_size=500)
    assert one == ["1 tuning seed; the protocol asks for at least 2 (each lr judged by the mean over them)"]
    unmet = protocol.unmet(seeds=[0], tuning_seeds=[], grid=[1e-3], unbracketed=["opd"], budget=None, test_size=8)
    assert len(unmet) == 6 and any("opd" in u for u in unmet)


def _fake_runs(monkeypatch, best_lr: float) -> list[float]:
    """Tuning runs whose validation accuracy peaks at ``best_lr`` (log scale); returns the lrs run."""
    tried = []

    def fake(cfg, force=False):
        tried.append(cfg.lr)
        return {"history": [{"eval/accuracy": 1.0 - abs(math.log10(cfg.lr / best_lr))}], "reused": False}

    monkeypatch.setattr(driver, "run_or_reuse", fake)
    monkeypatch.setattr(driver, "_say", lambda *a: None)
    return tried


def _spec(tmp_path, **changes):
    spec = {"base": {"teacher": "oracle"}, "methods": {"opd": {}}, "seeds": [0, 1], "lr_grid": [1e-4, 3e-4, 1e-3, 3e-3],
            **changes}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(str(path))


def test_a_choice_at_the_edge_widens_the_grid_until_bracketed(monkeypatch, tmp_path):
    tried = _fake_runs(monkeypatch, best_lr=1e-2)
    scores, chosen, bracketed = driver._tune_label(_spec(tmp_path, tuning_seed=2), tmp_path / "out", "opd", force=False)
    assert tried == pytest.approx([1e-4, 3e-4, 1e-3, 3e-3, 9e-3, 2.7e-2])  # two widenings
    assert chosen == pytest.approx(9e-3) and bracketed  # 2.7e-2 is worse: 9e-3 is inside

    tried = _fake_runs(monkeypatch, best_lr=1e-2)
    _, chosen, bracketed = driver._tune_label(_spec(tmp_path, lr_extend=1, tuning_seed=2), tmp_path / "out", "opd", force=False)
    assert chosen == pytest.approx(9e-3) and not bracketed  # one widening: still at the edge

    tried = _fake_runs(monkeypatch, best_lr=3e-4)
    _, chosen, bracketed = driver._tune_label(_spec(tmp_path, tuning_seed=2), tmp_path / "out", "opd", force=False)
    assert tried == pytest.approx([1e-4, 3e-4, 1e-3, 3e-3]) and chosen == pytest.approx(3e-4) and bracketed


def test_tuning_margin_against_a_naive_noise_on_known_numbers():
    """The margin of the chosen lr over the runner-up, and the 95% interval of a difference of
    two accuracies on n prompts each, written out by hand."""
    scores = {"3e-05": 0.164, "0.0001": 0.154, "0.0003": 0.168, "0.001": 0.182, "0.00333333": 0.0}
    m = protocol.tuning_margin(scores, 1e-3, 500)
    naive = 1.96 * math.sqrt(0.182 * 0.818 / 500 + 0.168 * 0.832 / 500)
    assert m["runner_up_lr"] == pytest.approx(3e-4) and m["margin"] == pytest.approx(0.014)
    assert m["noise"] == pytest.approx(naive) and not m["decided"]
    clear = protocol.tuning_margin({1e-4: 0.5, 3e-4: 0.9, 1e-3: 0.2}, 3e-4, 500)
    assert clear["decided"] and clear["margin"] == pytest.approx(0.4)
    assert protocol.tuning_margin({1e-3 / 0.3: 0.6, 1e-3: 0.1}, 1e-3 / 0.3, 500)["decided"]  # %g keys match floats
    assert protocol.tuning_margin({1e-4: 0.5}, 1e-4, 500) is None
    tied = protocol.tuning_margin({1e-4: 0.5, 3e-4: 0.5, 1e-3: 0.5}, 1e-4, 500)
    assert tied["runner_up_lr"] == pytest.approx(3e-4) and tied["margin"] == 0 and not tied["decided"]
    sentences = protocol.undecided({"grpo": m, "opd": clear, "sft": None})
    assert len(sentences) == 1 and sentences[0].startswith("grpo: 0.182 at lr 0.001 against 0.168 at lr 0.0003")


def test_two_tuning_seeds_choose_by_their_mean(monkeypatch, tmp_path):
    """Seed 2 alone prefers 1e-3, seed 3 alone 3e-4; their mean (by hand: 3e-4 gives
    (0.50 + 0.70) / 2 = 0.60, 1e-3 gives (0.55 + 0.40) / 2 = 0.475) picks 3e-4. The first
    seed's runs keep their folders (a spec that adds a seed reuses them)."""
    acc = {(2, 1e-4): 0.40, (2, 3e-4): 0.50, (2, 1e-3): 0.55, (2, 3e-3): 0.10,
           (3, 1e-4): 0.45, (3, 3e-4): 0.70, (3, 1e-3): 0.40, (3, 3e-3): 0.10}
    dirs = []

    def fake(cfg, force=False):
        dirs.append(Path(cfg.run_dir).name)
        return {"history": [{"eval/accuracy": acc[(cfg.seed, round(cfg.lr, 10))]}], "reused": False}

    monkeypatch.setattr(driver, "run_or_reuse", fake)
    monkeypatch.setattr(driver, "_say", lambda *a: None)
    spec = _spec(tmp_path, tuning_seed=[2, 3])
    assert spec.tuning_seed == 2 and spec.tuning_seeds == [2, 3]
    scores, chosen, bracketed = driver._tune_label(spec, tmp_path / "out", "opd", force=False)
    assert chosen == pytest.approx(3e-4) and bracketed and scores[1e-3] == pytest.approx(0.475)
    assert dirs[:2] == ["lr0.0001", "lr0.0001-seed3"]
    info = driver.tune(spec, tmp_path / "out", force=False)  # keeps each tuning seed's score
    assert info["by_seed"]["opd"]["0.0003"] == {"2": 0.50, "3": 0.70} and info["grid"]["opd"]["0.0003"] == pytest.approx(0.6)
    for bad, why in (([2, 2], "distinct"), ([2, "x"], "distinct"), ([], "distinct"), ([2, 1], "1 is also a reported seed")):
        with pytest.raises(UserError, match=why):
            _spec(tmp_path, tuning_seed=bad)


def test_tune_metric_chooses_the_lr_by_sampled_accuracy(monkeypatch, tmp_path):
    """``tune_metric: pass@1``: the grid is judged by the sampled accuracy the runs log
    (modchain_promise_x4_3200's SFT: greedy accuracy rises with lr while pass@1 falls). Here
    greedy prefers 1e-3 and pass@1 prefers 1e-4; each metric picks its own, by the mean over
    the two tuning seeds."""
    greedy = {1e-4: 0.80, 3e-4: 0.90, 1e-3: 0.95, 3e-3: 0.70}
    sampled = {1e-4: 0.60, 3e-4: 0.40, 1e-3: 0.30, 3e-3: 0.20}

    def fake(cfg, force=False):
        lr = round(cfg.lr, 10)
        return {"history": [{"eval/accuracy": greedy[lr], "eval/pass@1": sampled[lr] + 0.02 * (cfg.seed - 2)}], "reused": False}

    monkeypatch.setattr(driver, "run_or_reuse", fake)
    monkeypatch.setattr(driver, "_say", lambda *a: None)
    by_greedy = _spec(tmp_path, base={"eval_k": 1}, lr_extend=0)
    assert by_greedy.tune_metric == "accuracy"
    assert driver._tune_label(by_greedy, tmp_path / "out", "opd", force=False)[1] == pytest.approx(1e-3)
    by_sampled = _spec(tmp_path, base={"eval_k": 1}, lr_extend=0, tune_metric="pass@1")
    scores, chosen, bracketed = driver._tune_label(by_sampled, tmp_path / "out", "opd", force=False)
    assert chosen == pytest.approx(1e-4) and not bracketed and scores[3e-4] == pytest.approx(0.41)
    assert driver.tune(by_sampled, tmp_path / "out", force=False)["metric"] == "pass@1"
    for changes, why in (({"tune_metric": "pass@2"}, r"tune_metric: pass@2 is not measured: the runs evaluate pass@1"),
                         ({"tune_metric": "loss"}, r"tune_metric: takes pass@k at the runs' eval_k"),
                         ({"tune_metric": "pass@1", "lr_grid": None}, r"tune_metric: says how lr_grid is judged")):
        with pytest.raises(UserError, match=why):
            _spec(tmp_path, base={"eval_k": 1}, **changes)


def test_the_tuning_seed_is_never_a_reported_seed(tmp_path):
    assert _spec(tmp_path).tuning_seed == 2 and _spec(tmp_path).tuning_seeds == [2, 3]  # the default: two
    assert _spec(tmp_path, tuning_seed=100).tuning_seed == 100
    with pytest.raises(UserError, match="tuning_seed: 1 is also a reported seed"):
        _spec(tmp_path, tuning_seed=1)
    with pytest.raises(UserError, match=r"target: is a fraction of the teacher's accuracy, in \(0, 1\]"):
        _spec(tmp_path, target=1.5)


def test_bootstrap_interval_on_known_numbers():
    assert verdicts.bootstrap_interval([0.1, 0.1, 0.1]) == pytest.approx((0.1, 0.1))
    # two seeds [0, 1]: resampled means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    lo, hi = verdicts.bootstrap_interval([0.0, 1.0])
    assert (lo, hi) == (0.0, 1.0)
    # against a naive loop over the same resamples
    d = np.array([0.3, -0.1, 0.2, 0.05, 0.15])
    idx = np.random.default_rng(0).integers(0, 5, size=(verdicts.RESAMPLES, 5))
    naive = sorted(sum(d[j] for j in row) / 5 for row in idx)
    lo, hi = verdicts.bootstrap_interval(list(d))
    assert lo == pytest.approx(np.percentile(naive, 2.5)) and hi == pytest.approx(np.percentile(naive, 97.5))


# t_{0.975, df} from printed tables
T_TABLE = {1: 12.7062047, 2: 4.30265273, 3: 3.18244631, 4: 2.77644511, 9: 2.26215716, 30: 2.04227246}


def _t_within_naive(t: float, df: int) -> float:
    """P(|T| <= t) by the trapezoid rule over Student's density."""
    x = np.linspace(0.0, t, 200_001)
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    y = c * (1 + x**2 / df) ** (-(df + 1) / 2)
    return float(2 * np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))


def test_student_t_against_tables_and_the_density():
    for df, t in T_TABLE.items():
        assert verdicts.t_quantile(0.95, df) == pytest.approx(t, abs=1e-6)
    for df in (1, 2, 3, 4, 5, 8):
        for t in (0.3, 1.0, 2.5, 6.0):
            assert verdicts.t_within(t, df) == pytest.approx(_t_within_naive(t, df), abs=1e-8)


def test_t_interval_and_p_against_the_textbook_formula():
    d = [0.3, -0.1, 0.2, 0.05, 0.15]
    mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    half = T_TABLE[4] * sd / math.sqrt(5)
    assert verdicts.t_interval(d) == pytest.approx((mean - half, mean + half), abs=1e-7)
    t = mean / (sd / math.sqrt(5))
    assert verdicts.t_p(d) == pytest.approx(1 - _t_within_naive(t, 4), abs=1e-7)
    # the interval excludes 0 exactly when p < 0.05
    for shift in np.linspace(-0.2, 0.2, 41):
        lo, hi = verdicts.t_interval([x + shift for x in d])
        assert (lo > 0 or hi < 0) == (verdicts.t_p([x + shift for x in d]) < 0.05)
    assert verdicts.t_interval([0.1, 0.1, 0.1]) == pytest.approx((0.1, 0.1))
    assert verdicts.t_p([0.1, 0.1, 0.1]) == 0.0 and verdicts.t_p([0.0, 0.0]) == 1.0


def test_the_rules_level_at_5_seeds():
    """Under no difference (normal per-seed differences) the t rule says "beats" in about 5% of
    comparisons; the percentile bootstrap, at its nominal 95% too, in about 16%."""
    rng = np.random.default_rng(7)
    draws = rng.normal(size=(2000, 5))
    t_rate = np.mean([not (lo <= 0 <= hi) for lo, hi in map(verdicts.t_interval, draws)])
    boot = [verdicts.bootstrap_interval(list(d), resamples=1000, seed=i) for i, d in enumerate(draws[:1000])]
    boot_rate = np.mean([not (lo <= 0 <= hi) for lo, hi in boot])
    assert 0.035 < t_rate < 0.065 and 0.12 < boot_rate < 0.20


def test_verdict_sentences_follow_the_rule():
    a = {"0": 0.8, "1": 0.82, "2": 0.79}
    b = {"0": 0.6, "1": 0.61, "2": 0.62}
    assert verdicts.verdict("opd", "grpo", a, b)["sentence"].startswith("opd beats grpo (mean difference +0.193")
    flipped = verdicts.verdict("grpo", "opd", b, a)
    assert flipped["sentence"].startswith("opd beats grpo (mean difference +0.193") and flipped["mean_diff"] < 0
    mixed = verdicts.verdict("x", "y", {"0": 0.7, "1": 0.5}, {"0": 0.6, "1": 0.6})
    assert mixed["verdict"] == "none" and mixed["sentence"].startswith("no difference measured between x and y")
    # labels equal in every seed (two methods that both leave a rate at 0) say so, not [+0.000, +0.000]
    same = verdicts.verdict("skd", "trd", {"0": 0.0, "1": 0.0, "2": 0.0}, {"0": 0.0, "1": 0.0, "2": 0.0})
    assert same["verdict"] == "none" and same["interval"] == [0.0, 0.0]
    assert same["sentence"] == "no difference measured between skd and trd (equal in each of 3 seeds)"
    # a bound that excludes 0 by less than 0.0005 is printed so (not as +0.000): the pass@1
    # of opd and sft_t07 in docs/results/sft_cold_h16_pass1, interval [+0.00025, +0.053]
    opd = dict(zip("01234", [0.898, 0.876, 0.918, 0.906, 0.912]))
    t07 = dict(zip("01234", [0.880, 0.882, 0.878, 0.872, 0.864]))
    close = verdicts.verdict("sft_t07", "opd", t07, opd, beats="is above")
    assert 0 < -close["interval"][1] < 0.0005 and close["verdict"] == "b"
    assert "interval [+0.00025, +0.053]" in close["sentence"], close["sentence"]
    assert re.search(r"interval \[\+0\.\d{3}, \+0\.\d{3}\] over 3 seeds", verdicts.verdict("opd", "grpo", a, b)["sentence"])
    # the same numbers under the two rules: the bootstrap's narrower interval says "beats"
    a5, b5 = {str(i): v for i, v in enumerate([0.31, 0.29, 0.35, 0.28, 0.30])}, {str(i): 0.3 for i in range(5)}
    a5 = {k: v + 0.012 for k, v in a5.items()}
    assert verdicts.verdict("x", "y", a5, b5, rule="bootstrap")["verdict"] == "a"
    assert verdicts.verdict("x", "y", a5, b5)["verdict"] == "none"
    one = verdicts.verdict("x", "y", {"0": 0.9}, {"0": 0.1})
    assert one["verdict"] == "none" and "no verdict (1 paired seed(s)" in one["sentence"]


def test_bootstrap_p_value_against_a_naive_count():
    d = [0.3, -0.1, 0.2, 0.05, 0.15]
    idx = np.random.default_rng(0).integers(0, 5, size=(verdicts.RESAMPLES, 5))
    means = [sum(d[j] for j in row) / 5 for row in idx]
    below, above = sum(m <= 0 for m in means) / len(means), sum(m >= 0 for m in means) / len(means)
    assert verdicts.bootstrap_p(d) == pytest.approx(min(1.0, 2 * min(below, above)))
    assert verdicts.bootstrap_p([0.1, 0.2, 0.3]) == 0.0 and verdicts.bootstrap_p([0.0, 0.0]) == 1.0


def test_holm_on_known_numbers():
    # m = 4: 0.01 <= 0.05/4 rejected; the next, 0.03 > 0.05/3, stops it (0.04 is not reached)
    assert verdicts.holm([0.01, 0.04, 0.03, 0.2]) == [True, False, False, False]
    assert verdicts.holm([0.01, 0.012, 0.02, 0.04]) == [True, True, True, True]  # 0.0125, 0.0167, 0.025, 0.05
    assert verdicts.holm([0.02, 0.02]) == [True, True] and verdicts.holm([0.03, 0.03]) == [False, False]
    assert verdicts.holm([]) == []


def test_sign_flip_p_by_enumeration():
    assert verdicts.sign_flip_p([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)  # the floor at 5 seeds
    # [1, -2, 3, 4, 5]: |sum| = 11; patterns with |Σ ±d| >= 11 counted by hand: 6 of 32
    assert verdicts.sign_flip_p([1, -2, 3, 4, 5]) == pytest.approx(6 / 32)
    assert verdicts.sign_flip_p([1, -1]) == 1.0


def test_all_verdicts_mark_what_holm_keeps():
    base = {str(s): 0.6 for s in range(5)}
    strong = {str(s): 0.9 for s in range(5)}
    found = verdicts.all_verdicts({"strong": strong, "base": base})
    assert found[0]["verdict"] == "a" and found[0]["p"] == 0.0 and found[0]["holm"] is True
    # two labels each just above base (one seed level with it: p about 0.024), not told apart
    diffs = [0.03, 0.0, 0.04, 0.02, 0.03]
    a = {str(s): 0.6 + d for s, d in enumerate(diffs)}
    b = {str(s): 0.6 + d for s, d in enumerate(diffs[2:] + diffs[:2])}
    found = verdicts.all_verdicts({"a": a, "b": b, "base": base})
    by = {(v["a"], v["b"]): v for v in found}
    for pair in (("a", "base"), ("b", "base")):  # each passes the rule alone, but 0.05/3 < p: Holm drops both
        assert by[pair]["verdict"] == "a" and 0.05 / 3 < by[pair]["p"] < 0.05 and by[pair]["holm"] is False
    assert by[("a", "b")]["verdict"] == "none" and by[("a", "b")]["holm"] is None
    summary = verdicts.holm_summary(found)
    assert (summary["pairs"], summary["beats"], summary["stay"], len(summary["go"])) == (3, 2, 0, 2)


def test_planned_pairs_are_the_family_holm_corrects_over():
    from opd.compare.report import verdict_text

    base = {str(s): 0.6 for s in range(5)}
    diffs = [0.03, 0.0, 0.04, 0.02, 0.03]  # above base, p about 0.024: dropped by Holm over 3 pairs
    a = {str(s): 0.6 + d for s, d in enumerate(diffs)}
    b = {str(s): 0.6 + d for s, d in enumerate(diffs[2:] + diffs[:2])}
    found = verdicts.all_verdicts({"a": a, "b": b, "base": base}, planned=[("base", "a")])  # either order
    by = {(v["a"], v["b"]): v for v in found}
    assert by[("a", "base")]["planned"] and by[("a", "base")]["holm"] is True  # alone in its family: 0.024 < 0.05
    assert not by[("b", "base")]["planned"] and by[("b", "base")]["holm"] is None  # exploratory: no correction
    assert by[("b", "base")]["verdict"] == "a"  # the rule's verdict itself is unchanged
    summary = verdicts.holm_summary(found)
    assert (summary["pairs"], summary["beats"], summary["stay"], summary["go"]) == (1, 1, 1, [])
    text = verdict_text({"rule": verdicts.RULE, "verdicts": found, "labels": {}})
    assert "Holm's correction over the 1 planned pairs" in text and "1 of 1 verdicts stay." in text
    assert text.count("[exploratory: not a planned pair]") == 2  # b vs base, a vs b
    everything = verdict_text({"rule": verdicts.RULE, "verdicts": verdicts.all_verdicts({"a": a, "b": b, "base": base}),
                               "labels": {}})
    assert "over these 3 pairs" in everything and "exploratory" not in everything
    # a further metric's verdicts get their own Holm line, over the same planned pairs
    labels = {name: {"final": {s: {"pass@1": v} for s, v in finals.items()}} for name, finals in (("a", a), ("b", b), ("base", base))}
    per_metric = verdicts.metric_verdicts({"pass@1": {"a": a, "b": b, "base": base}}, planned=[("base", "a")])
    text = verdict_text({"rule": verdicts.RULE, "verdicts": found, "labels": labels, "metric_verdicts": per_metric})
    after = text.split("On `pass@1`")[1]
    assert "a is above base" in after and "Holm's correction over the 1 planned pairs" in after and "1 of 1 verdicts stay." in after


def test_sequences_to_target():
    h = lambda accs: [{"eval/accuracy": a, "usage/sequences": 64 * i} for i, a in enumerate(accs)]  # noqa: E731
    assert verdicts.sequences_to(h([0.1, 0.5, 0.9, 0.95]), 0.9) == 128
    both = verdicts.target_summary({"0": h([0.1, 0.9]), "1": h([0.1, 0.5, 0.92])}, 0.9)
    assert both == {"per_seed": {"0": 64.0, "1": 128.0}, "reached": 2, "mean": 96.0}
    one = verdicts.target_summary({"0": h([0.1, 0.9]), "1": h([0.1, 0.5])}, 0.9)
    assert one["reached"] == 1 and one["mean"] is None


def _reach(per_seed: dict) -> dict:
    done = [v for v in per_seed.values() if v is not None]
    return {"per_seed": per_seed, "reached": len(done), "mean": sum(done) / len(done) if len(done) == len(per_seed) else None}


def test_sequences_ratio_against_a_naive_reference():
    """The committed horizon-4 numbers (GRPO and OPD to 0.9 of the teacher, 5 seeds), checked
    against the ratio and the t interval on log ratios written out by hand (t_{0.975, 4})."""
    grpo = _reach({"0": 6720.0, "1": 24000.0, "2": 13120.0, "3": 10880.0, "4": 11520.0})
    opd = _reach({"0": 1920.0, "1": 1920.0, "2": 3840.0, "3": 1920.0, "4": 3200.0})
    logs = [math.log(grpo["per_seed"][s] / opd["per_seed"][s]) for s in "01234"]
    mean = sum(logs) / 5
    se = math.sqrt(sum((x - mean) ** 2 for x in logs) / 4) / math.sqrt(5)
    for r in (verdicts.sequences_ratio("grpo", "opd", grpo, opd), verdicts.sequences_ratio("opd", "grpo", opd, grpo)):
        assert (r["slower"], r["faster"]) == ("grpo", "opd")  # oriented slower first, either way round
        assert r["ratio_of_means"] == pytest.approx(13248 / 2560)
        assert r["geometric_mean"] == pytest.approx(math.exp(mean))
        assert r["interval"] == pytest.approx([math.exp(mean - 2.7764451051977987 * se), math.exp(mean + 2.7764451051977987 * se)])
        assert r["interval"][0] > 2.4 and r["interval"][1] < 10.0
        assert r["sentence"].startswith("grpo needed 5.17× opd's sequences (ratio of means); per-seed ratios' geometric mean 4.98×")


def test_sequences_ratio_needs_every_seed_of_both():
    fast = _reach({"0": 100.0, "1": 200.0})
    partly = _reach({"0": 800.0, "1": None})
    r = verdicts.sequences_ratio("slow", "fast", partly, fast)
    assert r["ratio_of_means"] is None and r["interval"] is None
    assert r["sentence"] == "slow / fast: no ratio (slow reached it in 1 of 2 seeds)"
    bounded = verdicts.sequences_ratio("fast", "slow", fast, partly, budget=1000.0)  # (800 + 1000) / 2 over 150
    assert bounded["lower_bound"] == pytest.approx(6.0) and (bounded["slower"], bounded["faster"]) == ("slow", "fast")
    assert bounded["ratio_of_means"] is None and bounded["sentence"].endswith(
        "; slow needed at least 6.00× fast's sequences (its unreached seeds counted at the budget, 1000 sequences)")
    early = verdicts.sequences_ratio("a", "b", _reach({"0": 50.0, "1": None}), _reach({"0": 400.0, "1": 400.0}), budget=100.0)
    assert early["lower_bound"] is None and "at least" not in early["sentence"]  # (50 + 100) / 2 / 400 < 1: no bound
    neither = verdicts.sequences_ratio("slow", "other", partly, _reach({"0": None, "1": 5.0}), budget=1000.0)
    assert neither["lower_bound"] is None and "at least" not in neither["sentence"]
    started = verdicts.sequences_ratio("a", "b", _reach({"0": 300.0, "1": 200.0}), _reach({"0": 0.0, "1": 100.0}))
    assert started["ratio_of_means"] is None and started["interval"] is None  # not a division by 0
    assert started["sentence"] == "a / b: no ratio (b at the target before training, 0 sequences)"
    one = verdicts.sequences_ratio("a", "b", _reach({"0": 300.0}), _reach({"0": 100.0}))
    assert one["ratio_of_means"] == 3.0 and one["interval"] is None and "no interval with one seed" in one["sentence"]


def test_sequences_ratios_follow_the_planned_pairs_and_reach_the_report():
    from opd.compare.report import verdict_text

    reaches = {"sft": _reach({"0": 100.0, "1": 100.0}), "opd": _reach({"0": 200.0, "1": 300.0}),
               "grpo": _reach({"0": 800.0, "1": 1500.0})}
    every = verdicts.sequences_ratios(reaches)
    assert [(r["slower"], r["faster"]) for r in every] == [("opd", "sft"), ("grpo", "sft"), ("grpo", "opd")]
    planned = verdicts.sequences_ratios(reaches, planned=[("opd", "grpo")])
    assert [(r["slower"], r["faster"], r["ratio_of_means"]) for r in planned] == [("grpo", "opd", 4.6)]
    labels = {label: {"sequences_to_target": reach} for label, reach in reaches.items()}
    text = verdict_text({"rule": verdicts.RULE, "verdicts": [], "labels": labels, "target": 0.9, "teacher_accuracy": 1.0,
                         "target_accuracy": 0.9, "sequences_ratios": planned})
    assert "Ratios of sequences to the target:\n\n- grpo needed 4.60× opd's sequences (ratio of means)" in text


def test_subset_metrics_get_their_own_verdicts():
    """Evaluation subsets every run logged (a blind-spot teacher's) are judged by the same rule."""
    final = lambda acc, spot: {"accuracy": acc, "accuracy_blind_spot": spot, "accuracy_rest": acc, "pass@1": acc,  # noqa: E731
                               "pass@8": acc + 0.1}
    labels = {"opd": {"final": {"0": final(0.8, 0.1), "1": final(0.8, 0.2), "2": final(0.8, 0.15)}},
              "grpo": {"final": {"0": final(0.7, 0.5), "1": final(0.7, 0.6), "2": final(0.7, 0.55)}}}
    per_metric = driver.subset_finals(labels)
    assert set(per_metric) == {"accuracy_blind_spot", "accuracy_rest"}  # pass@k only when the spec says so
    assert set(driver.subset_finals(labels, ["pass@8"])) == {"accuracy_blind_spot", "accuracy_rest", "pass@8"}
    found = verdicts.metric_verdicts(per_metric)
    assert found["accuracy_blind_spot"][0]["sentence"].startswith("grpo is above opd (mean difference +0.400")
    assert found["accuracy_rest"][0]["sentence"].startswith("opd is above grpo (mean difference +0.100")
    labels["grpo"]["final"]["2"]["accuracy_rest"] = None  # one run did not log it: no verdict on it
    assert set(driver.subset_finals(labels)) == {"accuracy_blind_spot"}


def test_at_budget_reads_each_curve_at_exactly_that_budget():
    labels = {"opd": {"curves": {"0": [[0, 0.1], [256, 0.4], [512, 0.6]], "1": [[0, 0.2], [256, 0.5], [512, 0.7]]}},
              "grpo": {"curves": {"0": [[0, 0.1], [320, 0.3]], "1": [[0, 0.2], [256, 0.35]]}}}
    assert verdicts.at_budget(labels, 256) == {"opd": {"0": 0.4, "1": 0.5}}  # grpo seed 0 has no point at 256
    assert verdicts.at_budget(labels, 512) == {"opd": {"0": 0.6, "1": 0.7}}
    assert verdicts.at_budget(labels, 0) == {"opd": {"0": 0.1, "1": 0.2}, "grpo": {"0": 0.1, "1": 0.2}}


def test_the_report_states_what_holm_keeps():
    from opd.compare.report import holm_text

    base = {str(s): 0.6 for s in range(5)}
    diffs = [0.03, 0.0, 0.04, 0.02, 0.03]
    a = {str(s): 0.6 + d for s, d in enumerate(diffs)}
    # with a strong pair beside it, a's weak verdict stays (Holm compares it last, with 0.05/1)
    found = verdicts.all_verdicts({"a": a, "strong": {str(s): 0.9 for s in range(5)}, "base": base})
    assert holm_text(found) == "Under Holm's correction over these 3 pairs (the rule's p-values, the same level): 3 of 3 verdicts stay."
    b = {str(s): 0.6 + d for s, d in enumerate(diffs[2:] + diffs[:2])}
    text = holm_text(verdicts.all_verdicts({"a": a, "b": b, "base": base}))
    assert "0 of 2 verdicts stay; these go: a beats base; b beats base." in text
    assert holm_text(verdicts.all_verdicts({"x": base, "y": dict(base)})) == ""  # nothing decided: no line


def test_seed_split_finds_two_groups_far_apart_by_hand():
    """Sorted 0.00, 0.01, 0.12 | 0.93, 0.96: the widest gap 0.81 (0.12 → 0.93) is over 0.2 and
    over 2x the wider group's range (0.12), so the seeds split there."""
    s = protocol.seed_split({"0": 0.96, "1": 0.0, "2": 0.93, "3": 0.12, "4": 0.01})
    assert s["gap"] == pytest.approx(0.81) and s["low"] == {"1": 0.0, "4": 0.01, "3": 0.12} and s["high"] == {"2": 0.93, "0": 0.96}
    lone = protocol.seed_split({"0": 0.42, "1": 0.86, "2": 0.9, "3": 0.88, "4": 0.87})  # one low seed: range 0
    assert lone["low"] == {"0": 0.42} and lone["gap"] == pytest.approx(0.44)


def test_seed_split_needs_a_wide_gap_and_tight_groups():
    assert protocol.seed_split({"0": 0.5, "1": 0.52, "2": 0.69, "3": 0.7}) is None  # gap 0.17 < 0.2
    # gap 0.3 (0.3 → 0.6) but the high group spans 0.6-0.95 (0.35): 0.3 <= 2 x 0.35, no split
    assert protocol.seed_split({"0": 0.2, "1": 0.3, "2": 0.6, "3": 0.95}) is None
    # the same gap with a high group of range 0.149: 0.3 > 2 x 0.149, a split
    assert protocol.seed_split({"0": 0.2, "1": 0.3, "2": 0.6, "3": 0.749})["gap"] == pytest.approx(0.3)
    assert protocol.seed_split({"0": 0.0, "1": 1.0}) is None  # two seeds: no groups to speak of
    assert protocol.seed_split({"0": 0.0, "1": 0.9, "2": float("nan")}) is None


def test_split_sentences_name_the_groups_and_the_tuning_score():
    finals = {"opd": {"0": 0.936, "2": 0.004, "3": 0.0, "1": 0.966}, "sft": {"0": 0.9, "1": 0.91, "2": 0.92}}
    out = protocol.split_sentences(finals, {"opd": {"6": 0.972, "5": 0.85}, "sft": {"5": 0.9}})
    assert out == ["opd: 2 at 0.000–0.004 (seeds 2, 3) and 2 at 0.936–0.966 (seeds 0, 1), a gap of 0.932; "
                   "the mean 0.477 falls in the gap between them; at the chosen lr the tuning seeds scored "
                   "0.850 (seed 5), 0.972 (seed 6) on the validation split"]
    assert protocol.split_sentences({"x": {"7": 0.5, "10": 0.9, "11": 0.9}}) == [
        "x: 1 at 0.500 (seed 7) and 2 at 0.900 (seeds 10, 11), a gap of 0.400; the mean 0.767 falls in the gap between them"]
    from opd.compare.report import protocol_text
    text = protocol_text({"protocol": {"unmet": [], "split_seeds": out}})
    assert text.startswith("Every rule of the protocol") and "split into two groups" in text and out[0] in text
    assert protocol_text({"protocol": {"unmet": []}}) == "Every rule of the protocol (`opd.compare.protocol`) is met."


def test_beside_collapse_reads_the_next_larger_lr_only():
    """Chosen 3e-5 at 0.911; the next larger lr 1e-4 at 0.000 < 0.5 x 0.911: beside a collapse.
    The collapse two lrs up (3e-4) does not count when 1e-4 held (0.6 >= 0.4555)."""
    scores = {"9e-06": 0.597, "3e-05": 0.911, "0.0001": 0.0, "0.0003": 0.004}
    assert protocol.beside_collapse(scores, 3e-5) == {"chosen_lr": 3e-5, "accuracy": 0.911, "next_lr": 1e-4, "next_accuracy": 0.0}
    assert protocol.beside_collapse({**scores, "0.0001": 0.6}, 3e-5) is None
    assert protocol.beside_collapse({**scores, "0.0001": 0.455}, 3e-5)["next_lr"] == 1e-4  # 0.455 < 0.4555
    assert protocol.beside_collapse({3e-5: 0.9, 1e-4: 0.1}, 3e-5)["next_accuracy"] == 0.1  # float keys too
    assert protocol.beside_collapse(scores, 3e-4) is None  # the grid's largest: nothing larger
    assert protocol.beside_collapse(scores, 5e-5) is None  # not a tuned lr


def test_collapse_sentences_and_their_report_flag():
    grid = {"strong": {"scores": {"3e-05": 0.911, "0.0001": 0.0}, "chosen": 3e-5},
            "opd": {"scores": {"3e-05": 0.966, "0.0001": 0.965}, "chosen": 3e-5}}
    out = protocol.collapse_sentences(grid)
    assert out == ["strong: 0.911 at lr 3e-05, the next larger lr 0.0001 0.000"]
    from opd.compare.report import protocol_text
    text = protocol_text({"protocol": {"unmet": [], "beside_collapse": out}})
    assert "Learning rates chosen beside a collapse" in text and out[0] in text
