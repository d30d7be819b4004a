"""The greedy-vs-sampled check classes each pair by both metrics' verdicts and judges the
difference of the two gains, each against a by-hand paired t interval."""

import json
import math

import pytest

from run_helpers import experiment_script

gvs = experiment_script("greedy_vs_sampled")
T_975_DF4 = 2.7764451051977987  # the 97.5% quantile of Student's t with 4 degrees of freedom


def _label(greedy: list[float], sampled: list[float], method: str = "opd", wall: float = 100.0) -> dict:
    return {"method": method, "overrides": {}, "lr": 1e-4, "student_base": "s",
            "final": {str(i): {"accuracy": g, "pass@1": p, "wall_s": wall + i} for i, (g, p) in enumerate(zip(greedy, sampled))}}


def _naive_t(diffs: list[float]) -> tuple[float, float]:
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return mean - T_975_DF4 * sd / math.sqrt(n), mean + T_975_DF4 * sd / math.sqrt(n)


# a gains on its argmax alone: +0.2 greedy on every seed (give or take 0.01), the same pass@1 as b give or take noise
A = _label([0.90, 0.91, 0.89, 0.90, 0.92], [0.50, 0.52, 0.49, 0.51, 0.50], "sft", 300.0)
B = _label([0.70, 0.70, 0.70, 0.71, 0.71], [0.51, 0.50, 0.50, 0.50, 0.52], "opd", 200.0)
C = _label([0.50, 0.51, 0.50, 0.49, 0.50], [0.30, 0.31, 0.29, 0.30, 0.32], "grpo", 100.0)  # lower on both


def test_the_classes_cover_every_pair_of_verdicts():
    assert [gvs.kind(g, p) for g, p in [("a", "a"), ("b", "b"), ("a", "none"), ("none", "b"), ("a", "b"), ("none", "none")]] \
        == ["same winner", "same winner", "greedy only", "pass@1 only", "opposite", "neither"]


def test_a_greedy_only_gain_is_judged_a_wider_gap_against_a_naive_t_interval():
    got = gvs.judge_pair({"b": B, "a": A}, "b", "a")  # the winner is a though it is named second
    assert (got["winner"], got["loser"], got["class"], "sft") \
        == ("a", "b", "greedy only", "sft")
    greedy = [a - b for a, b in zip([0.90, 0.91, 0.89, 0.90, 0.92], [0.70, 0.70, 0.70, 0.71, 0.71])]
    sampled = [a - b for a, b in zip([0.50, 0.52, 0.49, 0.51, 0.50], [0.51, 0.50, 0.50, 0.50, 0.52])]
    assert _naive_t(greedy)[0] > 0 and _naive_t(sampled)[0] < 0 < _naive_t(sampled)[1]  # the class, by hand
    assert got["greedy_gain"] == pytest.approx(sum(greedy) / 5) and got["pass1_gain"] == pytest.approx(sum(sampled) / 5)
    gap = [g - s for g, s in zip(greedy, sampled)]
    assert _naive_t(gap)[0] > 0 and got["wider_gap"] == "winner" and got["gap_gain"] == pytest.approx(sum(gap) / 5)


def test_a_gain_on_both_with_equal_gaps_is_not_called_wider():
    got = gvs.judge_pair({"b": B, "c": C}, "c", "b")
    assert (got["winner"], got["class"]) == ("b", "same winner")
    gap = [(g - s) - (g2 - s2) for g, s, g2, s2 in zip([0.70, 0.70, 0.70, 0.71, 0.71], [0.51, 0.50, 0.50, 0.50, 0.52],
                                                       [0.50, 0.51, 0.50, 0.49, 0.50], [0.30, 0.31, 0.29, 0.30, 0.32])]
    lo, hi = _naive_t(gap)
    assert lo < 0 < hi and got["wider_gap"] == "no difference measured"


def test_each_pair_of_runs_is_counted_once_and_reports_without_pass1_are_left_out(tmp_path, monkeypatch):
    no_pass = {"labels": {"x": {**A, "final": {s: {"accuracy": f["accuracy"]} for s, f in A["final"].items()}}}}
    reports = {"a": {"labels": {"a": A, "b": B}}, "g": {"labels": {"a2": A, "b2": B, "c": C}}, "n": no_pass}
    for name, results in reports.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    monkeypatch.setattr(gvs, "RESULTS", tmp_path)
    gvs.main()
    out = json.loads((tmp_path / "greedy_vs_sampled" / "results.json").read_text())
    assert out["reports"] == ["a", "g"] and out["summary"]["pairs"] == 3  # a-b once (at a), a2-c, b2-c
    assert out["summary"]["classes"] == {"same winner": 2, "greedy only": 1, "pass@1 only": 0, "opposite": 0, "neither": 0}
    assert out["summary"]["by_winner_method"]["sft"] == {"greedy_beats": 2, "same winner": 1, "greedy only": 1,
                                                         "opposite": 0, "winner_gap_wider": 2}  # a over c too: gaps 0.40 vs 0.20
    text = (tmp_path / "greedy_vs_sampled.md").read_text()
    assert "Of the 3 greedy \"beats\", 2 hold on pass@1, 1 are not told apart" in " ".join(text.split()) and "| a | a over b | +0.200 |" in text
