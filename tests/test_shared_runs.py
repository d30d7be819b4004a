"""Runs that several comparisons report are counted once by the instrument checks: a report
``a`` ran labels x and y, ``b`` reused x, ``g`` gathered x and y beside a new z, and ``r``
reran x's config and landed elsewhere on one seed (other runs)."""

import json
from pathlib import Path

import numpy as np
import pytest

from opd.compare import shared_runs, verdicts

from run_helpers import experiment_script


def _label(accs: list[float], wall: float, lr: float = 1e-4) -> dict:
    return {"method": "opd", "overrides": {}, "lr": lr, "student_base": "s",
            "final": {str(i): {"accuracy": a, "wall_s": wall + i} for i, a in enumerate(accs)}}


X, Y, Z = _label([0.9, 0.92, 0.91, 0.93, 0.9], 100.0), _label([0.5, 0.52, 0.48, 0.51, 0.5], 200.0), \
    _label([0.7, 0.71, 0.69, 0.72, 0.7], 300.0)
REPORTS = {"a": {"labels": {"x": X, "y": Y}}, "b": {"labels": {"x": X, "w": _label([0.1] * 5, 400.0)}},
           "g": {"labels": {"x2": X, "y2": Y, "z": Z}}, "r": {"labels": {"x": _label([0.9, 0.92, 0.91, 0.93, 0.89], 500.0)}}}


def test_a_label_s_home_is_the_smallest_report_that_holds_its_runs():
    homes = shared_runs.label_homes(REPORTS)
    assert homes["a", "x"] == "a" and homes["b", "x"] == "a" and homes["g", "x2"] == "a"  # (2, "a") < (2, "b") < (3, "g")
    assert homes["g", "y2"] == "a" and homes["g", "z"] == "g" and homes["b", "w"] == "b"
    assert homes["r", "x"] == "r"  # a rerun that lands elsewhere on one seed is other runs
    tuned = {name: {**r, "lr_tuning": {label: {"0.0001": 0.8 if name != "b" else 0.7} for label in r["labels"]}}
             for name, r in REPORTS.items()}
    homes = shared_runs.label_homes(tuned, with_tuning=True)
    assert homes["b", "x"] == "b" and homes["g", "x2"] == "a"  # b tuned x again and chose the same lr


def test_an_exact_rerun_and_a_seed_subset_are_counted_at_the_runs_home():
    """e reran x's config and got every seed's metrics again (other wall times); f reported
    seeds 0-2 of x alone; h reported seeds 0-2 beside a seed 9 that x lacks."""
    rerun = _label([0.9, 0.92, 0.91, 0.93, 0.9], 500.0)
    subset = {**X, "final": {s: f for s, f in X["final"].items() if s in "012"}}
    beyond = {**subset, "final": {**subset["final"], "9": {"accuracy": 0.9, "wall_s": 1.0}}}
    assert shared_runs.fingerprint(rerun) == shared_runs.fingerprint(X)
    assert shared_runs.contains(X, subset) and not shared_runs.contains(subset, X)
    assert not shared_runs.contains(X, beyond) and not shared_runs.contains(X, {**subset, "lr": 3e-4})
    reports = {"a": {"labels": {"x": X, "y": Y}}, "e": {"labels": {"x": rerun, "w": Z}},
               "f": {"labels": {"x": subset}}, "h": {"labels": {"x": beyond}}}
    homes = shared_runs.label_homes(reports)
    assert homes["a", "x"] == homes["e", "x"] == "a"  # same seeds, same size: by name
    assert homes["f", "x"] == "a"  # the subset's home holds the most seeds, though f has fewer labels
    assert homes["h", "x"] == "h"  # seed 9 is nowhere else
    pairs = shared_runs.pair_homes({**reports, "f": {"labels": {"x": subset, "y": Y}}})
    assert pairs["f", "x", "y"] == "f"  # a verdict over seeds 0-2 is another verdict


def test_a_pair_s_home_needs_both_runs_and_ignores_order():
    homes = shared_runs.pair_homes(REPORTS)
    assert homes["g", "x2", "y2"] == homes["g", "y2", "x2"] == "a"
    assert homes["g", "x2", "z"] == homes["g", "y2", "z"] == "g"
    assert homes["b", "w", "x"] == "b"  # x is a's, but the pair (x, w) is only in b


def _write(tmp_path, reports: dict) -> None:
    for name, results in reports.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))


def _comparison(labels: dict) -> dict:
    """A comparison judged by the t rule, tuned on one seed over two lrs (each label's own)."""
    finals = {label: {s: f["accuracy"] for s, f in entry["final"].items()} for label, entry in labels.items()}
    tuning = {label: {"0.0001": 0.8, "0.0003": 0.2} for label in labels}
    return {"seeds": list(range(5)), "labels": labels, "rule": verdicts.RULE, "test_prompts": 500,
            "verdicts": verdicts.all_verdicts(finals), "lr_tuning": tuning, "chosen_lr": dict.fromkeys(labels, 1e-4)}


def test_the_instrument_checks_count_a_gathered_pair_once(tmp_path, monkeypatch):
    _write(tmp_path, {"a": _comparison({"x": X, "y": Y}), "g": _comparison({"x2": X, "y2": Y, "z": Z})})
    mc = experiment_script("multiple_comparisons")
    monkeypatch.setattr(mc, "RESULTS", tmp_path)
    mc.main()
    rows = {r["name"]: r for r in json.loads((tmp_path / "multiple_comparisons" / "results.json").read_text())["comparisons"]}
    assert (rows["a"]["beats"], rows["a"]["own"]["beats"]) == (1, 1)  # x beats y, far apart on every seed
    assert (rows["g"]["pairs"], rows["g"]["beats"], rows["g"]["repeated"]) == (3, 3, ["a"])
    assert (rows["g"]["own"]["pairs"], rows["g"]["own"]["beats"]) == (2, 2)  # x2 vs y2 is a's pair
    text = (tmp_path / "multiple_comparisons.md").read_text()
    assert "over all 2, 3 of 3" in text and "1 (a)" in text and "pairs left to another report: 1 of 4" in text
    tn = experiment_script("tuning_noise")
    monkeypatch.setattr(tn, "RESULTS", tmp_path)
    tn.main()
    out = json.loads((tmp_path / "tuning_noise" / "results.json").read_text())
    assert sorted((r["experiment"], r["label"]) for r in out["choices"]) == [("a", "x"), ("a", "y"), ("g", "z")]
    assert out["repeats_left_out"] == 2 and "2 such repeats are left out" in (tmp_path / "tuning_noise.md").read_text()


def test_seed_splits_counts_a_split_label_once_and_its_pairs_wherever_judged(tmp_path, monkeypatch):
    """s splits (0.00, 0.02 | 0.90, 0.91, 0.92: gap 0.88); a ran it beside x, g gathered it
    beside x and z: s is counted at a, and its pairs are (s, x) at a and (s, z) at g."""
    s = _label([0.0, 0.02, 0.9, 0.92, 0.91], 600.0)
    a = _comparison({"x": X, "s": s})
    a["lr_tuning_by_seed"] = {"s": {"0.0001": {"5": 0.95, "6": 0.3}, "0.0003": {"5": 0.2, "6": 0.2}}}
    a["lr_tuning"]["s"] = {"0.0001": 0.625, "0.0003": 0.2}  # their means
    _write(tmp_path, {"a": a, "g": _comparison({"x2": X, "s2": s, "z": Z})})
    ss = experiment_script("seed_splits")
    monkeypatch.setattr(ss, "RESULTS", tmp_path)
    ss.main()
    out = json.loads((tmp_path / "seed_splits" / "results.json").read_text())
    (row,) = out["splits"]
    assert (row["report"], row["label"], row["low"], row["gap"]) == ("a", "s", {"0": 0.0, "1": 0.02}, pytest.approx(0.88))
    assert row["tuning"] == 0.625 and row["tuning_side"] == "high"  # 0.625 >= (0.02 + 0.9) / 2 = 0.46
    # each tuning seed against the same middle: seed 5 high, seed 6 low (the mean hid it)
    assert row["tuning_by_seed"] == {"5": {"score": 0.95, "side": "high"}, "6": {"score": 0.3, "side": "low"}}
    # x, s (at a) and z (at g) were tuned at 1e-4 with 3e-4 next, under half their score: all three beside a collapse
    next_lr = {"collapsed": {"labels": 3, "split": 1}, "held": {"labels": 0, "split": 0}, "fisher_p": 1.0}
    assert out["summary"] == {"labels": 3, "split": 1, "next_lr": next_lr, "one_low_seed": 0, "one_high_seed": 0, "tuned": 1,
                              "tuning_high": 1, "pairs": 2, "beats_or_beaten": 0, "tuned_by_seed": 1, "tuning_seed_low": 1}
    # by hand, s - x per seed: 0.90, 0.90, 0.01, 0.01, -0.01 (mean 0.362, sd 0.491, t interval ±0.61): no verdict
    assert row["judged"] == {"pairs": 2, "beats": 0, "beaten": 0, "none": 2}
    text = " ".join((tmp_path / "seed_splits.md").read_text().split())
    assert out["repeats_left_out"] == 2 and "**1 of the 3 labels split**" in text
    assert "of the 1 whose report keeps each tuning seed's score, 1 had a tuning seed on the low side" in text
    assert "0.625 (high); seed 5 0.950 (high), seed 6 0.300 (low)" in text


def test_runs_reused_at_a_fixed_lr_are_the_same_runs_and_keep_their_tuning(tmp_path, monkeypatch):
    """f fixes s's lr in its overrides (no grid) and holds s's runs alone: it is their home (one
    label), and the check reads s's tuning from a, the report that tuned them."""
    s = _label([0.0, 0.02, 0.9, 0.92, 0.91], 600.0)
    fixed = {**s, "overrides": {"lr": 1e-4}}
    assert shared_runs.fingerprint(fixed) == shared_runs.fingerprint(s)
    assert shared_runs.fingerprint({**fixed, "lr": 3e-4}) != shared_runs.fingerprint(s)  # the lr the runs used counts
    a = _comparison({"x": X, "s": s})
    a["lr_tuning_by_seed"] = {"s": {"0.0001": {"5": 0.9, "6": 0.7}, "0.0003": {"5": 0.2, "6": 0.2}}}
    f = {"seeds": list(range(5)), "labels": {"s": fixed}, "rule": verdicts.RULE, "test_prompts": 500, "verdicts": []}
    _write(tmp_path, {"a": a, "f": f})
    ss = experiment_script("seed_splits")
    monkeypatch.setattr(ss, "RESULTS", tmp_path)
    ss.main()
    out = json.loads((tmp_path / "seed_splits" / "results.json").read_text())
    (row,) = out["splits"]
    assert (row["report"], row["tuning"], row["tuning_side"]) == ("f", 0.8, "high")
    assert row["tuning_by_seed"] == {"5": {"score": 0.9, "side": "high"}, "6": {"score": 0.7, "side": "high"}}
    assert out["summary"]["labels"] == 2 and out["summary"]["next_lr"]["collapsed"] == {"labels": 2, "split": 1}


def test_seed_splits_fisher_p_and_its_sentence():
    ss = experiment_script("seed_splits")
    # 8 of 10 against 1 of 6 (k = 9): P(x) * C(16, 9) = 120, 1260, 3780, 4200, 1800, 270, 10 for
    # x = 3..9; the tables no likelier than x = 8 (270) sum to 400, and 400 / 11440 = 0.034965
    assert ss.fisher_p(8, 10, 1, 6) == pytest.approx(400 / 11440)
    assert ss.fisher_p(1, 6, 8, 10) == pytest.approx(400 / 11440) and ss.fisher_p(2, 10, 1, 5) == pytest.approx(1.0)
    told = ss.next_lr_text({"collapsed": {"labels": 10, "split": 8}, "held": {"labels": 6, "split": 1}, "fisher_p": 0.035})
    assert "8 of 10 labels split; where it did not, 1 of 6" in told and "split more often at the 0.05 level" in told
    untold = ss.next_lr_text({"collapsed": {"labels": 10, "split": 2}, "held": {"labels": 5, "split": 1}, "fisher_p": 1.0})
    assert "the two rates are not told apart" in untold and "more often" not in untold
    grid = {"lr_tuning": {"a": {"1e-05": 0.5, "3e-05": 0.9, "0.0001": 0.44}, "b": {"1e-05": 0.5, "3e-05": 0.9, "0.0001": 0.46},
                          "c": {"1e-05": 0.5, "3e-05": 0.9}}, "chosen_lr": {"a": 3e-5, "b": 3e-5, "c": 3e-5}}
    assert [ss.next_lr_collapsed(grid, label) for label in "abc"] == [True, False, None]  # 0.44 < 0.45 <= 0.46; c: none larger


def test_rule_level_takes_each_pair_of_runs_once(tmp_path):
    rl = experiment_script("rule_level")
    _write(tmp_path, {"a": _comparison({"x": X, "y": Y}), "g": _comparison({"x2": X, "y2": Y, "z": Z})})
    rows = rl.observed_differences(tmp_path)
    assert rows.shape == (3, 5)  # x-y once, x2-z, y2-z
    assert sorted(np.abs(rows[:, 0]).round(3).tolist()) == pytest.approx([0.2, 0.2, 0.4])


CHECKS = ("tuning_noise", "multiple_comparisons", "greedy_vs_sampled", "seed_splits")


def test_the_committed_instrument_checks_count_every_published_report(tmp_path, monkeypatch):
    """Regenerated from the committed reports, the committed checks come out unchanged:
    publishing a report (``experiments/run.py``) regenerates them, so none lags. ``rule_level``
    keeps its committed simulation and recomputes the committed pairs' skew."""
    committed = Path(__file__).resolve().parents[1] / "docs" / "results"
    for path in committed.glob("*/results.json"):
        if path.parent.name not in CHECKS:
            (tmp_path / path.parent.name).mkdir()
            (tmp_path / path.parent.name / "results.json").write_bytes(path.read_bytes())
    for name in CHECKS + ("rule_level",):
        script = experiment_script(name)
        monkeypatch.setattr(script, "RESULTS", tmp_path)
        script.refresh_observed() if name == "rule_level" else script.main()
        for part in (f"{name}.md", f"{name}/results.json"):
            fresh, kept = (tmp_path / part).read_text(), (committed / part).read_text()
            hint = "--observed-only" if name == "rule_level" else ""
            assert fresh == kept, f"docs/results/{part} is stale: run python experiments/{name}.py {hint}"


def test_the_findings_quote_the_committed_instrument_checks():
    """Findings 8-12 of docs/results/README.md quote counts of the instrument checks; a
    published report moves those counts (the checks regenerate themselves), and this names
    each phrase the prose must then carry."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "results"
    prose = " ".join((docs / "README.md").read_text().replace("**", "").split())
    for name in CHECKS + ("rule_level",):
        out = json.loads((docs / name / "results.json").read_text())
        for phrase in experiment_script(name).quoted(out):
            assert phrase in prose, f"docs/results/README.md should quote {phrase!r} (from docs/results/{name}.md)"


def test_a_probe_measured_on_the_runs_afterwards_does_not_make_them_other_runs():
    probed = {**X, "final": {s: {**f, "probe/p_ref": 0.9} for s, f in X["final"].items()}}
    assert shared_runs.fingerprint(probed) == shared_runs.fingerprint(X)
    homes = shared_runs.pair_homes({"a": {"labels": {"x": X, "y": Y}}, "p": {"labels": {"x": probed, "y": Y, "z": Z}}})
    assert homes["p", "x", "y"] == "a"


def test_seed_splits_counts_a_rerun_and_a_seed_subset_of_a_split_label_once(tmp_path, monkeypatch):
    """a ran x and s (s splits); e ran s's config again beside z and got the same metrics; f
    reported s's seeds 0-2 at the lr a chose: s is one label, counted at a, tuned at a."""
    s = _label([0.0, 0.02, 0.9, 0.92, 0.91], 600.0)
    a = _comparison({"x": X, "s": s})
    e = _comparison({"s": _label([0.0, 0.02, 0.9, 0.92, 0.91], 900.0), "z": Z})
    subset = {**s, "overrides": {"lr": 1e-4}, "final": {k: f for k, f in s["final"].items() if k in "012"}}
    f = {"seeds": [0, 1, 2], "labels": {"s": subset}, "rule": verdicts.RULE, "test_prompts": 500, "verdicts": []}
    _write(tmp_path, {"a": a, "e": e, "f": f})
    ss = experiment_script("seed_splits")
    monkeypatch.setattr(ss, "RESULTS", tmp_path)
    ss.main()
    out = json.loads((tmp_path / "seed_splits" / "results.json").read_text())
    (row,) = out["splits"]
    assert (row["report"], row["label"], row["tuning"]) == ("a", "s", 0.8)
    assert out["repeats_left_out"] == 2 and (out["summary"]["labels"], out["summary"]["split"]) == (3, 1)
    assert row["judged"]["pairs"] == 2  # (s, x) at a and (s, z) at e: the rerun's verdicts judged the same runs
