"""Suffix fade's and Prune-OPD's per-rollout stops: the summary against by-hand values, and the
counts against what the rollouts themselves say (a change point that is never accepted keeps
every token; one that is keeps whole steps; Prune-OPD stopping at its first drift event, the
student's and the teacher's argmax computed here from full logits); the clean prefix against
the oracle's own deviation count."""

import pytest
import torch

from opd.run.setup import build_setup
from opd.testbed.oracle import OracleTeacher
from opd.testbed.tokenizer import build_tokenizer
from run_helpers import experiment_script

stops = experiment_script("fade_stops")


def test_kept_stats_matches_by_hand_values():
    kept = [63, 63, 63, 56, 70, 63, 7, 63, 111, 63]
    s = stops.kept_stats(kept)
    assert s["rollouts"] == 10 and s["min"] == 7 and s["max"] == 111
    assert s["mean"] == pytest.approx(622 / 10)
    assert s["sd"] == pytest.approx((sum((k - 62.2) ** 2 for k in kept) / 9) ** 0.5)
    # sorted: 7 56 63 63 63 63 63 63 70 111; index floor(q * 10)
    assert s["percentiles"] == {"0.1": 56, "0.25": 63, "0.5": 63, "0.75": 63, "0.9": 111}
    assert (s["mode"], s["mode_share"]) == (63, 0.6)
    assert s["shares"] == {"7": 0.1, "56": 0.1, "63": 0.6, "70": 0.1, "111": 0.1}
    with pytest.raises(ValueError, match="at least 2"):
        stops.kept_stats([3])


def _setup(tiny_cfg, **changes):
    settings = dict(oracle_decay=0.05, oracle_decay_mode="position") | changes
    return build_setup(tiny_cfg(method="suffix_fade", task="modchain_labeled", horizon=4, max_new_tokens=48,
                                group_size=2, **settings))


def _rollouts(setup, prompts: int, batch: int) -> list[list[int]]:
    """The same rollouts as ``kept_tokens`` samples (same generator stream): their token ids."""
    generator, rows = torch.Generator().manual_seed(0), []
    for start in range(0, prompts, batch):
        exp = setup.method.rollout(setup.env, setup.train_pool[start:min(start + batch, prompts)], generator)
        teacher, context = setup.method.context(setup.env, exp)
        teacher.score(context, topk=setup.method.teacher_request.topk, full=True, temperature=1.0)
        for ids, mask in zip(exp.batch.completion_ids_BT.tolist(), exp.batch.completion_mask_BT.tolist()):
            rows.append([t for t, m in zip(ids, mask) if m])
    return rows


def test_a_change_point_never_accepted_keeps_every_generated_token(tiny_cfg):
    setup = _setup(tiny_cfg, fade_penalty=1e9)
    kept = stops.kept_tokens(setup, prompts=6, batch=4)
    assert len(kept) == 6 * 2
    assert kept == [len(row) for row in _rollouts(_setup(tiny_cfg, fade_penalty=1e9), prompts=6, batch=4)]


def test_an_accepted_change_point_keeps_whole_steps(tiny_cfg):
    setup = _setup(tiny_cfg, fade_penalty=0.0)
    kept = stops.kept_tokens(setup, prompts=6, batch=4)
    rows = _rollouts(_setup(tiny_cfg, fade_penalty=0.0), prompts=6, batch=4)
    assert all(0 < k <= len(row) for k, row in zip(kept, rows))
    cut = [(k, row) for k, row in zip(kept, rows) if k < len(row)]
    assert cut, "no rollout had an accepted change point"
    assert all(row[k - 1] in setup.env.boundary_ids for k, row in cut)  # the last kept token ends a step


def test_kept_tokens_refuses_another_method(tiny_cfg):
    with pytest.raises(SystemExit, match="not one of suffix_fade, prune_opd"):
        stops.kept_tokens(build_setup(tiny_cfg(method="opd")), prompts=2)


def _prune(tiny_cfg, **knobs):
    """Prune-OPD on the shipped addition base (a trained student: its argmax agrees with the
    teacher's on most clean prefixes), under a strong decay keyed on deviations."""
    return build_setup(tiny_cfg(method="prune_opd", student="testbed", task="addition", horizon=4, max_new_tokens=40,
                                group_size=2, oracle_decay=0.9, oracle_decay_mode="deviations", **knobs))


@torch.no_grad()
def _before_second_drift(setup, prompts: int, batch: int) -> list[int]:
    """Per rollout (the same generator stream as ``stops``), the completion positions before
    the second drift event, a drift event being a position where the student's argmax is not
    among the teacher's most likely ids (ties as a set): one full forward pass per rollout,
    the full vocabulary."""
    generator, out = torch.Generator().manual_seed(0), []
    model = setup.env.student
    for start in range(0, prompts, batch):
        stops.full_length(setup.method)
        exp = setup.method.rollout(setup.env, setup.train_pool[start:min(start + batch, prompts)], generator)
        teacher, context = setup.method.context(setup.env, exp)
        logits_BTV = teacher.score(context, topk=1, full=True, temperature=1.0).logits_BTV.float()
        model.eval()
        for i, (prompt, y) in enumerate(zip(exp.batch.prompts(), exp.batch.completions())):
            ids = torch.tensor([prompt + y])
            student_T = model(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) - 1 + len(y)].argmax(-1)
            t_logp_TV = logits_BTV[i, :len(y)].log_softmax(-1)
            best_T = t_logp_TV.max(-1, keepdim=True).values
            agrees_T = t_logp_TV.gather(-1, student_T[:, None])[:, 0] >= best_T[:, 0] - 1e-6
            drifts = [t for t, ok in enumerate(agrees_T.tolist()) if not ok]
            out.append(drifts[1] if len(drifts) > 1 else len(y))
    return out


def test_prune_opd_stops_at_its_second_drift_event_and_generates_at_the_cap(tiny_cfg):
    setup = _prune(tiny_cfg, prune_eta=0.5)  # w = 0.5 after one drift event, 0.25 < w_min 0.3 after two
    setup.method.state.set_next(1)  # a budget a run left at 1 token: reset to the cap here
    rows = stops.stops(setup, prompts=8, batch=4)
    assert [k for k, _, _ in rows] == _before_second_drift(_prune(tiny_cfg, prune_eta=0.5), prompts=8, batch=4)
    assert any(k == n for k, _, n in rows) and any(0 < k < n for k, _, n in rows)  # some kept whole, some stopped
    never = stops.stops(_prune(tiny_cfg, prune_w_min=0.0), prompts=8, batch=4)  # w >= 0 always: nothing stops
    assert [k for k, _, _ in never] == [n for _, _, n in never]


TOK = build_tokenizer()
ADD = TOK("add 2 7 4 5 + 5 1 9 8 =").input_ids  # solution: 2 5 0 = 0 7 ; 7 1 0 = 0 8 ; ...


def test_clean_prefix_ends_after_the_first_wrong_word():
    oracle = OracleTeacher(tokenizer=TOK, decay=0.3, decay_mode="deviations", recovers=False)
    right = TOK("2 5 0 = 0 7 ; 7 1 0 = 0 8 ;").input_ids
    assert stops.clean_prefix(oracle, ADD, right) == len(right)  # no deviation: the whole rollout
    wrong = TOK("2 5 0 = 0 8 ; 7 1 0 = 0 8 ;").input_ids  # token 5 ("8" for "7") is the first deviation
    assert stops.clean_prefix(oracle, ADD, wrong) == 6
    assert stops.clean_prefix(oracle, ADD, TOK("3 5 0").input_ids) == 1
    assert stops.clean_prefix(object(), ADD, wrong) is None  # a teacher that cannot trace


def test_against_deviations_matches_by_hand_values():
    # (kept, clean prefix, length): three deviate (lags -3, 0, +2), two clean (one kept whole)
    rows = [(10, 13, 40), (20, 20, 40), (30, 28, 40), (40, 40, 40), (21, 40, 40)]
    d = stops.against_deviations(rows)
    assert d["deviating"] == pytest.approx(3 / 5)
    assert d["clean_prefix_percentiles"] == {"0.1": 13, "0.25": 13, "0.5": 20, "0.75": 28, "0.9": 28}  # 13 20 28
    assert d["lag_percentiles"] == {"0.1": -3, "0.25": -3, "0.5": 0, "0.75": 2, "0.9": 2}  # sorted -3 0 2
    assert d["within_2"] == pytest.approx(2 / 3)
    assert d["clean_kept_whole"] == pytest.approx(1 / 2)
    assert stops.against_deviations([(5, None, 9), (9, None, 9)]) is None
    none_deviate = stops.against_deviations([(9, 9, 9), (9, 9, 9)])
    assert none_deviate["lag_percentiles"] is None and none_deviate["clean_prefix_percentiles"] is None
    assert none_deviate["clean_kept_whole"] == 1.0


def test_stops_pair_each_rollout_with_the_oracles_count(tiny_cfg):
    decayed = dict(oracle_decay_mode="deviations", oracle_decay=0.3, fade_penalty=0.0)
    setup = _setup(tiny_cfg, **decayed)
    rows = stops.stops(setup, prompts=6, batch=4)
    ys = _rollouts(_setup(tiny_cfg, **decayed), prompts=6, batch=4)
    prompts = [setup.env.encode_prompt(p) for p in setup.train_pool[:6] for _ in range(2)]
    assert [n for _, _, n in rows] == [len(y) for y in ys]
    for (k, c, n), x, y in zip(rows, prompts, ys):
        devs = [t.deviations for t in setup.env.teacher.trace(x, y)]
        assert all(d == 0 for d in devs[:c]) and (c == n or devs[c] > 0)
    assert any(c < n for _, c, n in rows), "the tiny student made no mistake: the check saw nothing"
