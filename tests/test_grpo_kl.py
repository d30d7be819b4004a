"""GRPO's KL penalty to the frozen initial student (k3, DeepSeekMath Eq. 4), against a direct
computation; off by default; on the testbed it pulls a drifted student back."""

import math

import pytest
import torch

from opd.config.train import TrainConfig
from opd.losses import masked_token_mean
from opd.methods import build_method
from opd.methods.base import Experience, StudentView
from opd.methods.grpo import grpo_loss, grpo_signal, k3_kl_BT
from opd.batch import make_batch
from opd.run.loop import pick_problems, step_generator, train_step
from opd.run.setup import build_setup

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_k3_matches_the_formula_and_its_gradient():
    logp = (-torch.rand(3, 5, generator=_gen(0), dtype=D) * 3).requires_grad_()
    ref = -torch.rand(3, 5, generator=_gen(1), dtype=D) * 3
    got = k3_kl_BT(logp, ref)
    want = torch.tensor([[math.exp(r - l) - (r - l) - 1 for l, r in zip(lr, rr)] for lr, rr in zip(logp.tolist(), ref.tolist())], dtype=D)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got >= 0).all() and float(k3_kl_BT(ref, ref).abs().max()) == 0.0
    (g,) = torch.autograd.grad(got.sum(), logp)
    torch.testing.assert_close(g, 1 - torch.exp(ref - logp.detach()), rtol=0, atol=1e-12)  # (1 - π_ref/π_θ)


def test_k3_is_an_unbiased_estimate_of_the_kl():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=D)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=D)
    exact = float((p * (p.log() - q.log())).sum())  # KL(π_θ ‖ π_ref)
    expected = float((p * k3_kl_BT(p.log(), q.log())).sum())  # E_{y ~ π_θ}[k3]
    assert abs(expected - exact) < 1e-12


def _fake(B=4, T=5, group=2, seed=0):
    g = _gen(seed)
    lengths = torch.tensor([5, 3, 4, 1])[:B]
    batch = make_batch([[1, 2]] * B, [torch.randint(3, 9, (int(n),), generator=g).tolist() for n in lengths], pad_id=0, width=T)
    sampler = -torch.rand(B, T, generator=g, dtype=D) * 2
    exp = Experience(batch, [None] * B, torch.arange(B) // group, sampler_logp_BT=sampler, rewards_B=torch.tensor([1.0, 0.0, 0.0, 1.0])[:B])
    exp.extra["ref_logp_BT"] = sampler + torch.randn(B, T, generator=g, dtype=D) * 0.3
    return exp


@pytest.mark.parametrize("beta", [0.0, 0.04, 1.0])
def test_grpo_loss_with_kl_matches_a_direct_computation(beta):
    exp = _fake()
    sig = grpo_signal(exp, None, adv_scale="std")
    logp = (exp.sampler_logp_BT + torch.randn(4, 5, generator=_gen(7), dtype=D) * 0.2).requires_grad_()
    loss, metrics = grpo_loss(StudentView(None, logp), sig, clip_eps=0.2, kl_beta=beta)
    mask = sig["mask_BT"]
    want = torch.zeros(4, 5, dtype=D)
    rewards = exp.rewards_B.tolist()
    for b in range(4):
        grp = rewards[2 * (b // 2): 2 * (b // 2) + 2]
        mean, std = sum(grp) / 2, math.sqrt(sum((r - sum(grp) / 2) ** 2 for r in grp))  # sample std, G - 1 = 1
        adv = 0.0 if max(grp) == min(grp) else (rewards[b] - mean) / (std + 1e-6)
        for t in range(5):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logp[b, t] - exp.sampler_logp_BT[b, t])
            pg = torch.maximum(-ratio * adv, -ratio.clamp(0.8, 1.2) * adv)
            d = exp.extra["ref_logp_BT"][b, t] - logp[b, t]
            want[b, t] = pg + beta * (torch.exp(d) - d - 1)
    n = mask.sum()
    got_mean, want_mean = masked_token_mean(loss, mask, n), want.sum() / n
    tol = dict(rtol=0, atol=1e-8)  # the signal stores the group advantage in float32
    torch.testing.assert_close(got_mean, want_mean, **tol)
    (g_got,) = torch.autograd.grad(got_mean, logp)
    (g_want,) = torch.autograd.grad(want_mean, logp)
    torch.testing.assert_close(g_got, g_want, **tol)
    assert ("loss/ref_kl" in metrics) == (beta > 0)


def test_kl_is_off_by_default_and_loads_the_reference_when_on():
    off, on = build_method("grpo", {}), build_method("grpo", {"grpo_kl_beta": 0.04})
    assert "reference" not in off.needs and "reference" in on.needs
    with pytest.raises(ValueError):
        build_method("grpo", {"grpo_kl_beta": -1.0})


def test_kl_pulls_a_drifted_student_back_on_the_testbed(tiny_student_dir, tmp_path):
    """A random student never solves a problem, so GRPO's own gradient is 0; with the KL on,
    a student moved away from its initial weights gets a gradient, and only then."""

    def step(beta):
        cfg = TrainConfig(student=tiny_student_dir, teacher="oracle", method="grpo", grpo_kl_beta=beta, steps=2,
                          prompts_per_step=4, group_size=2, max_new_tokens=20, eval_size=2, eval_k=1,
                          run_dir=str(tmp_path / f"r{beta}"), progress=False, max_grad_norm=0.0)
        setup = build_setup(cfg)
        with torch.no_grad():
            for p in setup.env.student.parameters():
                p.add_(torch.randn(p.shape, generator=_gen(3)) * 0.05)
        generator = step_generator(0, 0)
        problems = pick_problems(setup.train_pool, 4, generator)
        opt = torch.optim.SGD(setup.env.student.parameters(), lr=0.0)
        metrics, _ = train_step(setup.env, setup.method, problems, generator, opt, micro_batch_size=8, max_grad_norm=0.0, ppo_epochs=1)
        return metrics

    off, on = step(0.0), step(0.1)
    assert off["rollout/reward"] == 0.0 and off["optim/grad_norm"] == 0.0 and "loss/ref_kl" not in off
    assert on["loss/ref_kl"] > 0 and on["optim/grad_norm"] > 0
