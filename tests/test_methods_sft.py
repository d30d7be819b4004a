"""SFT's rejection-sampling source (``sft_source=teacher_correct``): its loss against a naive
reference, its needs, and a two-step run on the tiny testbed."""

import math

import pytest
import torch

from opd.batch import make_batch
from opd.errors import UserError
from opd.methods import build_method
from opd.methods.base import Experience, StudentView
from opd.run.metrics_log import read_metrics
from opd.run.runner import train

V = 11
COMPLETIONS = [[5, 6, 2], [7, 2], [4, 4, 4, 2], [8, 9, 3, 2], [6, 2]]
REWARDS = [1.0, 0.0, 1.0, 0.5, 0.0]  # 0.5: a partial reward is not an accepted answer


def _case(rewards):
    batch = make_batch([[1, 5]] * len(COMPLETIONS), COMPLETIONS, 0)
    exp = Experience(batch=batch, problems=[None] * len(COMPLETIONS), group_B=torch.arange(len(COMPLETIONS)),
                     rewards_B=torch.tensor(rewards))
    B, T = batch.completion_mask_BT.shape
    logits_BTV = torch.randn(B, T, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_(True)
    logp_BT = torch.log_softmax(logits_BTV, -1).gather(-1, batch.completion_ids_BT[..., None]).squeeze(-1)
    return exp, logits_BTV, StudentView(logits_BTV, logp_BT)


def _loop_loss(source, rewards):
    """The loop's reduction: Σ loss·mask / Σ mask over the step."""
    exp, logits_BTV, view = _case(rewards)
    method = build_method("sft", {"sft_source": source})
    signal = method.signal(exp, None)
    loss_BT, _ = method.loss(view, signal)
    loss = (loss_BT * signal["mask_BT"]).sum() / signal["mask_BT"].sum().clamp(min=1)
    return loss, logits_BTV, signal


def _naive_nll(logits_BTV, rows):
    total, n = 0.0, 0
    for b in rows:
        for t, tok in enumerate(COMPLETIONS[b]):
            total, n = total - torch.log_softmax(logits_BTV[b, t], -1)[tok], n + 1
    return total / n


def test_rejection_sampling_is_the_nll_of_the_accepted_samples_alone():
    loss, logits_BTV, signal = _loop_loss("teacher_correct", REWARDS)
    torch.testing.assert_close(loss, _naive_nll(logits_BTV, [0, 2]), rtol=1e-12, atol=0)
    assert float(signal["signal/accepted_frac"]) == pytest.approx(2 / 5)
    loss.backward()
    assert logits_BTV.grad[[1, 3, 4]].abs().max() == 0  # rejected rows get no gradient
    assert logits_BTV.grad[[0, 2]].abs().max() > 0


def test_with_every_sample_accepted_it_is_sft_on_teacher_samples():
    every = [1.0] * len(COMPLETIONS)
    filtered, logits_BTV, _ = _loop_loss("teacher_correct", every)
    plain, _, _ = _loop_loss("teacher", every)
    torch.testing.assert_close(filtered, plain, rtol=0, atol=0)
    torch.testing.assert_close(filtered, _naive_nll(logits_BTV, range(len(COMPLETIONS))), rtol=1e-12, atol=0)


def test_with_every_sample_rejected_the_step_has_no_gradient():
    loss, logits_BTV, signal = _loop_loss("teacher_correct", [0.0] * len(COMPLETIONS))
    loss.backward()
    assert float(loss.detach()) == 0 and logits_BTV.grad.abs().max() == 0
    assert float(signal["signal/accepted_frac"]) == 0


def test_rejection_sampling_needs_a_verifier_and_a_teacher_that_samples(tiny_cfg):
    needs = build_method("sft", {"sft_source": "teacher_correct"}).needs
    assert {"teacher", "teacher_generate", "verifier"} <= set(needs)
    with pytest.raises(UserError, match="needs a teacher"):
        train(_two_steps_cfg(tiny_cfg, teacher=None))


def _two_steps_cfg(tiny_cfg, **changes):
    return tiny_cfg(method="sft", sft_source="teacher_correct", prompts_per_step=8, eval_size=2, eval_k=1, **changes)


def test_trains_two_steps_and_logs_the_accepted_share(tiny_cfg):
    cfg = _two_steps_cfg(tiny_cfg, temperature=1.5)  # a hot oracle: some samples wrong
    train(cfg)
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["signal/accepted_frac"] == pytest.approx(r["rollout/reward"])  # 0/1 rewards: the same share
        assert math.isfinite(r["loss/nll"])
    assert any(0 < r["signal/accepted_frac"] < 1 for r in rows[1:])  # this config accepts some and rejects some
    assert all(r["signal/kept_frac"] < 1 for r in rows[1:])  # the rejected samples' tokens are not trained on
