"""Finished runs on disk (:mod:`opd.compare.saved_runs`): a run stopped at a smaller budget is
continued from its last checkpoint instead of recomputed, and the continued run equals the
one trained straight to the larger budget (the naive reference)."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from opd.compare.saved_runs import RESULT_FILE, extendable, run_or_reuse
from opd.run.checkpoint import latest_checkpoint


def _cfg(tiny_cfg, tmp_path, where: str, budget: int, **changes):
    settings = dict(steps=100, budget_kind="sequences", budget=budget, eval_every=2,
                    run_dir=str(tmp_path / where), overwrite=True)
    return tiny_cfg(**{**settings, **changes})


def _evals(history: list[dict]) -> list[tuple]:
    return [(r["step"], r["usage/sequences"], r["eval/accuracy"], r["eval/pass@2"]) for r in history]


def _weights(run_dir) -> dict:
    return AutoModelForCausalLM.from_pretrained(latest_checkpoint(run_dir)).state_dict()


def test_a_larger_budget_continues_the_shorter_run_and_equals_the_straight_one(tiny_cfg, tmp_path):
    short = run_or_reuse(_cfg(tiny_cfg, tmp_path, "run", 24))  # 8 sequences a step: 3 steps
    assert not short["reused"] and short["history"][-1]["step"] == 3
    longer_cfg = _cfg(tiny_cfg, tmp_path, "run", 48)
    assert extendable(longer_cfg) is not None
    longer = run_or_reuse(longer_cfg)
    straight = run_or_reuse(_cfg(tiny_cfg, tmp_path, "straight", 48))
    assert longer["extended"] and not straight["extended"]
    # the stop's evaluation at step 3 is dropped (eval_every=2 skips it); the rest are the straight run's
    assert [r["step"] for r in longer["history"]] == [0, 2, 4, 6]
    assert _evals(longer["history"]) == _evals(straight["history"])
    a, b = _weights(tmp_path / "run"), _weights(tmp_path / "straight")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    saved = json.loads((tmp_path / "run" / RESULT_FILE).read_text())
    assert saved["config"]["budget"] == 48 and saved["machine"] == straight["machine"]
    again = run_or_reuse(longer_cfg)  # now finished at 48: reused, not extended again
    assert again["reused"] and not again["extended"]


def test_only_the_same_run_stopped_earlier_is_extended(tiny_cfg, tmp_path):
    run_or_reuse(_cfg(tiny_cfg, tmp_path, "run", 24))
    assert extendable(_cfg(tiny_cfg, tmp_path, "run", 48, lr=3e-3)) is None  # another run, not a longer one
    assert extendable(_cfg(tiny_cfg, tmp_path, "run", 16)) is None  # a smaller budget: not a continuation
    assert extendable(_cfg(tiny_cfg, tmp_path, "run", 48, budget_kind="steps")) is None  # another counter
    assert extendable(_cfg(tiny_cfg, tmp_path, "run", 48)) is not None
    for ckpt in (tmp_path / "run" / "checkpoints").iterdir():  # no checkpoint at its last step: recomputed
        ckpt.rename(ckpt.with_name("moved_" + ckpt.name))
    assert extendable(_cfg(tiny_cfg, tmp_path, "run", 48)) is None
    fresh = run_or_reuse(_cfg(tiny_cfg, tmp_path, "run", 48), force=False)
    assert not fresh["extended"] and fresh["history"][0]["step"] == 0 and fresh["history"][-1]["step"] == 6
