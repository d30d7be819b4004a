"""Every method does what its name says: degeneracy is detected and said, degenerate settings
really are the other method, and at its defaults no method is OPD under another name."""

import pytest
import torch

from opd.compare.report import final_rows
from opd.config.train import TrainConfig
from opd.methods import METHODS, build_method
from opd.methods.degeneracy import RunFacts, degenerate_knobs, first_step_record, static_facts
from opd.run.loop import pick_problems, step_generator, train_step
from opd.run.setup import build_setup

TESTBED = dict(vocab_size=24, max_new_tokens=96)
ORACLE_ENTROPY = torch.full((200,), 0.0617)  # the noise-free oracle: the same entropy at every token


def _facts(entropy=None, **first_step):
    return RunFacts(**TESTBED, teacher_entropy_N=entropy, first_step=first_step or None)


# --- the checks, from facts ------------------------------------------------------------

DEGENERATE = [  # method, knobs, facts -> the knob the warning names
    ("eopd", dict(eopd_tau=0.8), _facts(ORACLE_ENTROPY), "eopd_tau"),
    ("eopd", dict(eopd_lambda=0.0), _facts(), "eopd_lambda"),
    ("eopd", dict(eopd_mode="switch"), _facts(ORACLE_ENTROPY), "eopd_mode"),  # no threshold splits a constant entropy
    ("eopd", dict(eopd_mode="switch", eopd_quantile=0.0), _facts(torch.linspace(0.01, 2.0, 100)), "eopd_quantile"),
    ("trunc", dict(trunc_tokens=100), _facts(), "trunc_tokens"),
    ("trunc", {}, _facts(**{"rollout/truncated": 0.0}), "trunc_tokens"),
    ("topd", dict(horizon_frac=1.0), _facts(), "horizon_frac"),
    ("popd", dict(popd_start_frac=1.0), _facts(), "popd_start_frac"),
    ("popd", dict(popd_ramp_frac=0.0), _facts(), "popd_ramp_frac"),
    ("topk_lsm", dict(lsm_k=32), _facts(), "lsm_k"),
    ("topk_lsm", dict(lsm_k=1), _facts(), "lsm_k"),
    ("skd", dict(skd_topk=25), _facts(), "skd_topk"),
    ("skd", {}, _facts(**{"rollout/on_policy": 1.0}), "skd_topk"),
    ("prune_opd", dict(prune_k=24), _facts(), "prune_k"),
    ("prune_opd", dict(prune_eta=1.0), _facts(), "prune_eta"),
    ("prune_opd", dict(prune_delta=0.0), _facts(), "prune_delta"),
    ("prune_opd", dict(prune_k=8), _facts(**{"signal/drift_rate": 0.0}), "prune_k"),
    ("suffix_fade", {}, _facts(**{"signal/change_rate": 0.0}), "fade_penalty"),
    ("tip", dict(tip_rho=1.0), _facts(), "tip_rho"),
    ("gopd", dict(gopd_lambda=1.0), _facts(), "gopd_lambda"),
    ("dasd", dict(dasd_beta=0.0), _facts(), "dasd_beta"),
    ("stable_opd", dict(gold_coef=0.0, ref_kl_coef=0.0), _facts(), "gold_coef"),
    ("trd", dict(trd_refine="prefix", trd_topk=30), _facts(), "trd_topk"),
    ("trd", dict(trd_refine="prefix"), _facts(**{"rollout/refine_kept": 1.0}), "trd_topk"),
    ("srpo", {}, _facts(ORACLE_ENTROPY, **{"signal/correct_frac": 0.0}), "group_size"),
    ("srpo", dict(srpo_weight="none"), _facts(**{"signal/correct_frac": 0.0}), "group_size"),
]


@pytest.mark.parametrize("method,knobs,facts,knob", DEGENERATE)
def test_degenerate_settings_name_the_knob(method, knobs, facts, knob):
    note = build_method(method, {"max_new_tokens": 96, **knobs}).degenerate(facts)
    assert note is not None and note.knob == knob
    line = note.line(method)
    assert line.startswith(f"warning: method {method!r} reduces to ") and line.endswith(f"change {knob}") and "\n" not in line


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_method_is_degenerate_on_the_testbed_at_its_defaults(method):
    """The testbed: 24 ids, max_new_tokens 96, the oracle's constant entropy, and a first step
    in which rollouts were cut, the teacher rewrote, drifts and change points happened."""
    first = {"rollout/truncated": 0.5, "rollout/on_policy": 0.0, "signal/drift_rate": 0.1, "signal/change_rate": 0.3,
             "rollout/refine_kept": 0.6, "signal/correct_frac": 0.3}
    m = build_method(method, {"max_new_tokens": 96, "steps": 30})
    assert m.degenerate(RunFacts(**TESTBED)) is None
    assert m.degenerate(_facts(ORACLE_ENTROPY, **first)) is None


def test_eopd_threshold_reads_the_entropy():
    spread = torch.linspace(0.01, 2.0, 100)
    assert build_method("eopd", {"eopd_tau": 0.8}).degenerate(_facts(spread)) is None  # some tokens above 0.8
    note = build_method("eopd", {"eopd_tau": 0.8}).degenerate(_facts(ORACLE_ENTROPY))
    assert note.becomes == "opd" and "0.0617" in note.why
    assert build_method("eopd", {"eopd_mode": "switch"}).degenerate(_facts(spread)) is None  # the top 20% only


def test_checks_wait_for_the_facts_they_need():
    for method, knobs, facts, _ in DEGENERATE:
        needs_first_step = facts.teacher_entropy_N is not None or facts.first_step is not None
        note = build_method(method, {"max_new_tokens": 96, **knobs}).degenerate(RunFacts(**TESTBED))
        assert (note is None) == needs_first_step, (method, knobs)


def test_degenerate_knobs_and_the_compare_row():
    rows = [{"step": 0}, {"step": 1, "degenerate/eopd_tau": 1.0, "loss/pg": 0.1}, {"step": 2}]
    assert degenerate_knobs(rows) == ["eopd_tau"] and degenerate_knobs(rows[:1]) == []
    history = [{"eval/accuracy": 0.5, "eval/pass@2": 0.6, "usage/sequences": 8, "usage/teacher_tokens": 9, "usage/wall_s": 1.0}]
    summary = {"labels": {
        "eopd": {"method": "eopd", "lr": 1e-4, "runs": {0: {"history": history}}, "degenerate": ["eopd_tau"]},
        "opd": {"method": "opd", "lr": 1e-4, "runs": {0: {"history": history}}, "degenerate": []},
    }}
    table = final_rows(summary)
    assert table[0][-1] == "yes: change `eopd_tau`" and table[1][-1] == "-"


# --- on the testbed: degenerate settings are OPD, defaults are not ----------------------


def _cfg(student_dir, tmp_path, **changes):
    base = dict(student=student_dir, teacher="oracle", steps=30, prompts_per_step=4, group_size=2, micro_batch_size=3,
                max_new_tokens=40, eval_size=2, eval_k=1, run_dir=str(tmp_path / "run"), progress=False, max_grad_norm=0.0)
    base.update(changes)
    return TrainConfig(**base)


def one_step(cfg):
    """One training step from the saved student with plain SGD at lr 1, so the parameter
    change is exactly minus the gradient: ``(grad, metrics)``. The same prompts and random
    stream for every method."""
    setup = build_setup(cfg)
    student = setup.env.student
    before = [p.detach().clone() for p in student.parameters()]
    generator = step_generator(cfg.seed, 0)
    problems = pick_problems(setup.train_pool, cfg.prompts_per_step, generator)
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    metrics, _ = train_step(setup.env, setup.method, problems, generator, optimizer,
                            micro_batch_size=cfg.micro_batch_size, max_grad_norm=0.0, ppo_epochs=1)
    grad = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, student.parameters())])
    return grad, metrics


@pytest.fixture(scope="module")
def opd_grad(tiny_student_dir, tmp_path_factory):
    return one_step(_cfg(tiny_student_dir, tmp_path_factory.mktemp("opd")))[0]


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("method,knobs,knob", [
    ("eopd", dict(eopd_tau=0.8), "eopd_tau"),  # the code's threshold: the oracle never exceeds it
    ("eopd", dict(eopd_lambda=0.0), "eopd_lambda"),
    ("trunc", dict(trunc_tokens=100), "trunc_tokens"),  # clamped to max_new_tokens=40
    ("topd", dict(horizon_frac=1.0), "horizon_frac"),
    ("popd", dict(popd_start_frac=1.0), "popd_start_frac"),
    ("gopd", dict(gopd_lambda=1.0), "gopd_lambda"),
    ("prune_opd", dict(prune_eta=1.0), "prune_eta"),
    ("stable_opd", dict(gold_coef=0.0, ref_kl_coef=0.0), "gold_coef"),
])
def test_a_degenerate_setting_is_opd_and_is_said(method, knobs, knob, tiny_student_dir, tmp_path, opd_grad, capsys):
    grad, metrics = one_step(_cfg(tiny_student_dir, tmp_path, method=method, **knobs))
    assert _rel(grad, opd_grad) < 1e-4  # the same step as OPD's (up to float rounding)
    assert metrics[f"degenerate/{knob}"] == 1.0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].endswith(f"change {knob}")  # one line, said once


# the tiny random student never solves a problem: SRPO then has no GRPO term, and the
# noise-free oracle's constant entropy makes its confidence weights uniform, which is exactly
# OPD (and said so); a noisy oracle gives the weights something to weigh
NON_DEGENERATE = {"srpo": dict(oracle_noise=0.1)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_method_is_opd_under_another_name(method, tiny_student_dir, tmp_path, opd_grad, capsys):
    """One step of every method at its defaults on the same prompts and random stream: the
    gradient differs from OPD's (OPD itself, the control, gives exactly OPD's), and no method
    reports itself degenerate."""
    grad, metrics = one_step(_cfg(tiny_student_dir, tmp_path, method=method, **NON_DEGENERATE.get(method, {})))
    assert torch.isfinite(grad).all()
    if method == "opd":
        assert torch.equal(grad, opd_grad)
    else:
        assert _rel(grad, opd_grad) > 1e-2, f"{method}'s step is OPD's"
    assert not [k for k in metrics if k.startswith("degenerate/")]
    assert "warning:" not in capsys.readouterr().err


def test_srpo_on_a_student_that_never_solves_is_opd_and_is_said(tiny_student_dir, tmp_path, opd_grad, capsys):
    grad, metrics = one_step(_cfg(tiny_student_dir, tmp_path, method="srpo"))
    assert metrics["signal/correct_frac"] == 0.0 and metrics["degenerate/group_size"] == 1.0
    assert _rel(grad, opd_grad) < 1e-4 and "change group_size" in capsys.readouterr().err


def test_first_step_record_says_only_what_setup_did_not(tiny_student_dir, tmp_path, capsys):
    cfg = _cfg(tiny_student_dir, tmp_path, method="trunc", trunc_tokens=100)
    setup = build_setup(cfg)
    said = capsys.readouterr().err
    assert "trunc_tokens" in said and setup.method.degenerate(static_facts(setup.env)).knob == "trunc_tokens"
    exp_like = type("E", (), {})()
    record = first_step_record(setup.method, setup.env, exp_like, None, {})
    assert record == {"degenerate/trunc_tokens": 1.0} and capsys.readouterr().err == ""


def test_compare_marks_a_degenerate_row(tiny_student_dir, tmp_path):
    import yaml

    from opd.compare.driver import compare

    spec = {
        "base": {"student": tiny_student_dir, "teacher": "oracle", "prompts_per_step": 2, "group_size": 2,
                 "max_new_tokens": 20, "eval_size": 2, "eval_k": 1},
        "methods": {"eopd": {}, "eopd_code": {"method": "eopd", "eopd_tau": 0.8}}, "seeds": 1, "budget": 1,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    summary = compare(str(path), str(tmp_path / "out"))
    assert summary["labels"]["eopd"]["degenerate"] == [] and summary["labels"]["eopd_code"]["degenerate"] == ["eopd_tau"]
    report = (tmp_path / "out/report.md").read_text()
    assert "| eopd_code | eopd |" in report and "yes: change `eopd_tau` |" in report
