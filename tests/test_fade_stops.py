"""Suffix fade's per-rollout stops: the summary against by-hand values, and the counts against
what the rollouts themselves say (a change point that is never accepted keeps every token;
one that is keeps whole steps)."""

import pytest
import torch

from opd.run.setup import build_setup
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
    return build_setup(tiny_cfg(method="suffix_fade", task="modchain_labeled", horizon=4, max_new_tokens=48,
                                oracle_decay=0.05, oracle_decay_mode="position", group_size=2, **changes))


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
    with pytest.raises(SystemExit, match="not suffix_fade"):
        stops.kept_tokens(build_setup(tiny_cfg(method="opd")), prompts=2)
