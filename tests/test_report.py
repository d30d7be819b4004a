"""The quickstart report: table, verdict in words, plot file."""

from opd.report import table_rows, verdict, write_report


def _history(accs, per_step=32):
    return [{"eval/accuracy": a, "eval/sample_accuracy": a / 2, "usage/sequences": i * per_step * 4,
             "usage/teacher_tokens": i * 1000} for i, a in enumerate(accs)]


SUMMARY = {
    "teacher_accuracy": 1.0,
    "results": {
        "sft": {"lr": 1e-3, "history": _history([0.4, 0.6, 0.7]), "wall_s": 10.0},
        "grpo": {"lr": 3e-4, "history": _history([0.4, 0.45, 0.5]), "wall_s": 12.0},
        "opd": {"lr": 1e-3, "history": _history([0.4, 0.8, 0.95]), "wall_s": 11.0},
    },
    "lr_info": {"grid": {m: {"0.0003": 0.1, "0.001": 0.2} for m in ("sft", "grpo", "opd")},
                "chosen": {"sft": 1e-3, "grpo": 3e-4, "opd": 1e-3}, "budget_sequences": 256},
}


def test_table_rows_report_before_after_and_reach():
    rows = {r[0]: r for r in table_rows(SUMMARY)}
    assert rows["opd"][2:4] == ["0.400", "0.950"]
    assert rows["opd"][-1] == "256"  # first evaluation at >= 0.9 x teacher
    assert rows["grpo"][-1] == "not reached"


def test_the_one_seed_verdict_states_measurements_and_no_ranking():
    text = verdict({**SUMMARY, "lr_info": {**SUMMARY["lr_info"], "tuning_seed": 1}})
    assert "Seeds 0 (means below); learning rates tuned on the mean over seed(s) 1, never reported" in text and "rank nothing" in text
    assert "- opd: greedy held-out accuracy 0.400 → 0.950; sequences to reach 90% of the teacher's accuracy" in text
    for ranking in ("beats", "above", "Highest", "best", "**"):
        assert ranking not in text


def test_several_seeds_give_verdicts_by_the_rule():
    finals = {"sft": {0: 0.70, 1: 0.72, 2: 0.69}, "grpo": {0: 0.50, 1: 0.52, 2: 0.49}, "opd": {0: 0.71, 1: 0.68, 2: 0.72}}
    from opd.compare.verdicts import RULE, all_verdicts

    text = verdict({**SUMMARY, "seeds": [0, 1, 2], "rule": RULE, "verdicts": all_verdicts(finals)})
    assert "- sft beats grpo (mean difference +0.200" in text and "- opd beats grpo" in text
    assert "- no difference measured between sft and opd" in text and "rank nothing" not in text


def test_write_report_makes_markdown_and_png(tmp_path):
    path = write_report(tmp_path, SUMMARY)
    text = path.read_text()
    assert "| opd | 0.001 | 0.400 | 0.950 |" in text
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_verdict_says_when_nothing_improved():
    flat = {**SUMMARY, "results": {m: {**r, "history": _history([0.4, 0.35, 0.3])} for m, r in SUMMARY["results"].items()}}
    assert "No method improved on the student base" in verdict(flat)
    assert "No method improved" not in verdict(SUMMARY)
