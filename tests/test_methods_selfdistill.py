"""OPSD and DASD (privileged self-teacher), and GKD's seq_kd / lmbda=1 rollouts."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.batch import make_batch
from opd.losses import entropy
from opd.methods import dasd as dasd_method
from opd.methods import gkd as gkd_method
from opd.methods.base import Experience, StudentView
from opd.methods.opsd import opsd_full_loss, opsd_sampled_loss, opsd_signal
from opd.run.metrics_log import read_metrics
from opd.models.base import Scores
from opd.models.hf import HFTeacher, completion_logits
from opd.run.runner import Run, train
from opd.run.loop import make_optimizer, train_step
from opd.run.setup import build_setup
from opd.signals.dasd import (
    dasd_advantages,
    dasd_router,
    entropy_threshold,
    mean_abs_deviation,
    normalized_log_ratio,
    teacher_log_ratio,
)
from opd.config.train import TrainConfig

D = torch.float64


def _mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- OPSD
def _naive_entry_terms(s_logits, t_logits, kind, beta, temp):
    s, t = torch.log_softmax(s_logits / temp, -1), torch.log_softmax(t_logits / temp, -1)
    if kind == "fkl":
        return t.exp() * (t - s)
    if kind == "rkl":
        return s.exp() * (s - t)
    m = torch.log(beta * t.exp() + (1 - beta) * s.exp())
    return beta * t.exp() * (t - m) + (1 - beta) * s.exp() * (s - m)


@pytest.mark.parametrize("kind", ["fkl", "jsd", "rkl"])
@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_opsd_loss_is_the_per_entry_clipped_sum(kind, clip):
    g = torch.Generator().manual_seed(0)
    base, t = torch.randn(2, 4, 9, generator=g, dtype=D) * 2, torch.randn(2, 4, 9, generator=g, dtype=D) * 2
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, metrics = opsd_full_loss(StudentView(a, None), {"teacher_logits_BTV": t}, kind=kind, beta=0.3, clip=clip, loss_temperature=1.1)
    terms = _naive_entry_terms(b, t, kind, 0.3, 1.1)
    ref = (torch.minimum(terms, torch.tensor(clip, dtype=D)) if clip > 0 else terms).sum(-1)  # Σ_v min(ℓ_v, τ)
    assert torch.allclose(loss, ref, atol=1e-10, rtol=0) and f"loss/{kind}" in metrics
    loss.sum().backward()
    ref.sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-10, rtol=0)
    if clip > 0:  # per vocabulary entry, not per position: differs from min(Σ_v ℓ_v, τ)
        assert not torch.allclose(loss, terms.sum(-1).clamp(max=clip))


def test_opsd_loss_is_finite_on_extreme_inputs():
    s = torch.zeros(2, 3, 5, dtype=D)
    s[..., 1] = 1e4
    t = torch.full((2, 3, 5), -math.inf, dtype=D)
    t[..., 1] = 0.0
    s.requires_grad_()
    for kind in ("fkl", "jsd", "rkl"):
        loss, _ = opsd_full_loss(StudentView(s, None), {"teacher_logits_BTV": t}, kind=kind, beta=0.5, clip=0.05, loss_temperature=1.0)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()


def _fake_experience(lengths, T, group_size=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    completions = [torch.randint(3, 20, (n,), generator=g).tolist() for n in lengths]
    batch = make_batch([[5, 6]] * B, completions, 0, width=T)
    mask = batch.completion_mask_BT
    sampler = torch.where(mask, -torch.rand(B, T, generator=g, dtype=D) * 3, 0.0)
    rewards = torch.tensor([float(i % 3 == 0) for i in range(B)])
    group = torch.arange(B // group_size).repeat_interleave(group_size)
    entropy_BT = torch.where(mask, torch.rand(B, T, generator=g, dtype=D) * 2, 0.0)
    exp = Experience(batch, [None] * B, group, sampler_logp_BT=sampler, rewards_B=rewards, extra={"student_entropy_BT": entropy_BT})
    teacher = -torch.rand(B, T, generator=g, dtype=D) * 3
    scores = Scores(teacher, torch.zeros(B, T), torch.zeros(B, T, 1, dtype=torch.long), torch.zeros(B, T, 1))
    return exp, scores


def test_opsd_sampled_advantage_and_loss():
    exp, scores = _fake_experience([5, 3, 0, 2], 5)
    signal = opsd_signal(exp, scores, sampled=True)
    mask = exp.batch.completion_mask_BT
    ref = torch.where(mask, scores.token_logp_BT - exp.sampler_logp_BT, 0.0)
    assert torch.equal(signal["adv_BT"], ref) and torch.equal(signal["mask_BT"], mask)
    logp = exp.sampler_logp_BT.clone().requires_grad_()  # on-policy: ratio 1, gradient -A
    loss, metrics = opsd_sampled_loss(StudentView(None, logp), signal)
    loss.sum().backward()
    assert torch.allclose(logp.grad, -ref, atol=1e-12) and "loss/pg" in metrics


@pytest.fixture(scope="module")
def opsd_setup(tiny_student_dir, tmp_path_factory):
    cfg = TrainConfig(student=tiny_student_dir, teacher=None, method="opsd", group_size=1, max_new_tokens=12,
                      run_dir=str(tmp_path_factory.mktemp("unused")))
    return build_setup(cfg)


def test_opsd_teacher_is_the_frozen_student_behind_the_privileged_prompt(opsd_setup):
    env, method = opsd_setup.env, opsd_setup.method
    assert env.teacher is None and env.reference is not None and env.reference is not env.student
    assert not any(p.requires_grad for p in env.reference.parameters())
    exp = method.rollout(env, opsd_setup.train_pool[:3], torch.Generator().manual_seed(0))
    teacher, batch = method.context(env, exp)
    assert isinstance(teacher, HFTeacher) and teacher.model is env.reference
    assert batch.prompts() == [env.encode_privileged(p) for p in exp.problems]
    assert batch.completions() == exp.batch.completions()
    assert torch.equal(batch.completion_mask_BT, exp.batch.completion_mask_BT)
    assert method.teacher_request.full and method.needs == ("reference", "solutions")


def test_opsd_trains_without_a_teacher(tiny_cfg):
    cfg = tiny_cfg(method="opsd", teacher=None, group_size=1, max_new_tokens=12, eval_size=2, eval_k=1)
    run = Run(cfg)
    run.fit()
    rows = read_metrics(cfg.run_dir)
    assert all(math.isfinite(r["loss/fkl"]) and r["loss/fkl"] >= 0 for r in rows[1:])
    before = _weights(cfg.student)
    assert _changed(before, _weights(f"{cfg.run_dir}/checkpoints/step_000002"))
    assert not _changed(before, run.setup.env.reference.state_dict())  # the self-teacher stays frozen


# ----------------------------------------------------------------------------- DASD
def _kept(x, m, b):
    return [float(x[b, t]) for t in range(x.shape[1]) if m[b, t]]


def test_entropy_threshold_is_the_row_quantile():
    g = torch.Generator().manual_seed(1)
    H = torch.rand(4, 11, generator=g, dtype=D) * 3
    m = _mask([11, 5, 1, 0], 11)
    H[1, 5:] = 1e9  # padding must not count
    for rho in (0.2, 0.5, 0.0, 1.0):
        tau = entropy_threshold(H, m, rho)
        for b in range(3):
            assert abs(float(tau[b]) - float(np.quantile(_kept(H, m, b), 1 - rho))) < 1e-10
        assert float(tau[3]) == 0.0


def test_mean_abs_deviation_and_normalized_ratio():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, generator=g, dtype=D)
    m = _mask([7, 3, 0], 7)
    mad, norm = mean_abs_deviation(x, m), normalized_log_ratio(x, m)
    for b in range(2):
        k = _kept(x, m, b)
        mean = sum(k) / len(k)
        assert abs(float(mad[b]) - sum(abs(v - mean) for v in k) / len(k)) < 1e-12
        scale = sum(abs(v) for v in k) / len(k)
        for t in range(7):
            assert abs(float(norm[b, t]) - (float(x[b, t]) / scale if m[b, t] else 0.0)) < 1e-12
    assert float(mad[2]) == 0.0 and norm[2].abs().sum() == 0


def _naive_dasd(H, d, m, A_G, rho, beta):
    B, T = H.shape
    out = torch.zeros(B, T, dtype=D)
    for b in range(B):
        h, dd = _kept(H, m, b), _kept(d, m, b)
        if not h:
            continue
        tau = float(np.quantile(h, 1 - rho))
        mean_h = sum(h) / len(h)
        sigma = max(sum(abs(v - mean_h) for v in h) / len(h), 1e-6)
        scale = max(sum(abs(v) for v in dd) / len(dd), 1e-6)
        for t in range(T):
            if m[b, t]:
                dbar = float(d[b, t]) / scale
                omega = math.tanh((tau - float(H[b, t])) / sigma) / (1 + math.exp(-(abs(dbar) - 1)))
                out[b, t] = float(A_G[b]) + beta * omega * dbar
    return out


def test_dasd_advantages_match_loops():
    g = torch.Generator().manual_seed(3)
    H, d = torch.rand(4, 9, generator=g, dtype=D) * 2, torch.randn(4, 9, generator=g, dtype=D)
    m = _mask([9, 6, 2, 0], 9)
    A_G = torch.randn(4, generator=g, dtype=D)
    dbar = normalized_log_ratio(d, m)
    out = dasd_advantages(A_G, dasd_router(H, dbar, m, rho=0.2), dbar, m, beta=0.1)
    assert torch.allclose(out, _naive_dasd(H, d, m, A_G, 0.2, 0.1), atol=1e-10, rtol=0)


def test_dasd_attracts_at_confident_tokens_and_repels_at_forks():
    # one trajectory: tokens 0..3 confident, token 4 a high-entropy fork; the teacher prefers every token
    H = torch.tensor([[0.1, 0.1, 0.1, 0.1, 2.0]], dtype=D)
    teacher, student = torch.full((1, 5), -0.5, dtype=D), torch.full((1, 5), -2.0, dtype=D)
    m = _mask([5], 5)
    dbar = normalized_log_ratio(teacher_log_ratio(teacher, student, m), m)
    adv = dasd_advantages(torch.zeros(1, dtype=D), dasd_router(H, dbar, m, rho=0.2), dbar, m, beta=0.1)
    assert (adv[0, :4] > 0).all() and adv[0, 4] < 0


def test_dasd_signal_is_finite_on_extreme_inputs():
    H = torch.tensor([[0.3, 0.3, 0.3], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]], dtype=D)  # constant row, fully masked row
    teacher = torch.tensor([[-math.inf, -1.0, -1.0], [-1e30, 0.0, -math.inf], [-math.inf] * 3], dtype=D)
    student = torch.tensor([[-1.0, -1.0, -1.0], [-0.01, -math.inf, -math.inf], [0.0] * 3], dtype=D)
    m = _mask([3, 3, 0], 3)
    d = teacher_log_ratio(teacher, student, m)
    dbar = normalized_log_ratio(d, m)
    omega = dasd_router(H, dbar, m, rho=0.2)
    adv = dasd_advantages(torch.tensor([1.0, -1.0, 0.0], dtype=D), omega, dbar, m, beta=0.1)
    for x in (d, dbar, omega, adv):
        assert torch.isfinite(x).all()
    # clamped; a -inf teacher log-prob is floored at -100 first (opd.signals.teacher_logp), so
    # against a -inf student it is +inf, clamped at +20
    assert float(d[0, 0]) == -20.0 and float(d[1, 2]) == 20.0
    assert omega[0].abs().sum() == 0 and adv[2].abs().sum() == 0  # constant entropies: no routing


def test_dasd_signal_end_to_end_on_fabricated_scores():
    exp, scores = _fake_experience([6, 4, 5, 0], 6, group_size=2, seed=4)
    signal = dasd_method.dasd_signal(exp, scores, rho=0.2, beta=0.1, adv_scale="std")
    m = exp.batch.completion_mask_BT
    r = exp.rewards_B.view(2, 2).double()
    A_G = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).reshape(-1)
    A_G = torch.where(r.amax(1, keepdim=True) == r.amin(1, keepdim=True), 0.0, A_G.view(2, 2)).reshape(-1)
    ref = _naive_dasd(exp.extra["student_entropy_BT"], scores.token_logp_BT - exp.sampler_logp_BT, m, A_G, 0.2, 0.1)
    assert torch.allclose(signal["adv_BT"].double(), ref, atol=1e-6, rtol=0)
    assert {"signal/router", "signal/attract_frac"} <= set(signal)


def test_dasd_rollout_measures_the_students_entropy(tiny_student_dir, tmp_path):
    cfg = TrainConfig(student=tiny_student_dir, method="dasd", group_size=2, max_new_tokens=10, run_dir=str(tmp_path))
    setup = build_setup(cfg)
    exp = setup.method.rollout(setup.env, setup.train_pool[:2], torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = entropy(completion_logits(setup.env.student, exp.batch))
    m = exp.batch.completion_mask_BT
    H = exp.extra["student_entropy_BT"]
    assert torch.allclose(H[m], ref[m], atol=1e-5) and (H[~m] == 0).all()
    assert setup.method.min_group_size == 2 and "verifier" in setup.method.needs


def test_dasd_trains_two_steps(tiny_cfg):
    cfg = tiny_cfg(method="dasd", prompts_per_step=2, max_new_tokens=12, eval_size=2, eval_k=1)
    train(cfg)
    rows = read_metrics(cfg.run_dir)
    for row in rows[1:]:
        assert all(math.isfinite(row[k]) for k in ("loss/pg", "signal/router", "optim/grad_norm"))
    # a random student never solves a problem (A_G = 0): the routed self-teacher term moves the weights
    assert rows[-1]["optim/grad_norm"] > 0
    assert _changed(_weights(cfg.student), _weights(f"{cfg.run_dir}/checkpoints/step_000002"))


# ----------------------------------------------------------------------------- GKD rollouts
@pytest.fixture(scope="module")
def gkd_setup(tiny_student_dir, tmp_path_factory):
    cfg = TrainConfig(student=tiny_student_dir, method="gkd", seq_kd=True, lmbda=0.0, max_new_tokens=12,
                      run_dir=str(tmp_path_factory.mktemp("unused")))
    return build_setup(cfg)


def test_seq_kd_trains_on_teacher_samples(gkd_setup):
    env, method, problems = gkd_setup.env, gkd_setup.method, gkd_setup.train_pool[:3]
    assert "solutions" not in method.needs
    for seed in range(2):
        exp = method.rollout(env, problems, torch.Generator().manual_seed(seed))
        replay = torch.Generator().manual_seed(seed)
        torch.rand((), generator=replay)  # the on/off-policy coin
        expected = env.teacher.generate([env.encode_prompt(p) for p in problems], max_new_tokens=env.max_new_tokens,
                                        temperature=env.temperature, top_p=env.top_p, generator=replay)
        assert exp.batch.completions() == expected
        assert exp.on_policy is False and exp.teacher_tokens == exp.batch.num_tokens > 0


def test_lmbda_one_is_always_on_policy(gkd_setup, monkeypatch):
    calls = []
    monkeypatch.setattr(gkd_method, "student_rollout", lambda env, problems, gen: calls.append("student") or "on")
    monkeypatch.setattr(gkd_method, "teacher_rollout", lambda *a: calls.append("teacher"))
    monkeypatch.setattr(gkd_method, "solution_rollout", lambda *a: calls.append("solution"))
    on = gkd_method.build(lmbda=1.0, seq_kd=True)
    for seed in range(200):
        assert on.rollout(None, [], torch.Generator().manual_seed(seed)) == "on"
    assert calls == ["student"] * 200
    calls.clear()
    mixed = gkd_method.build(lmbda=0.5, seq_kd=True)
    for seed in range(200):
        mixed.rollout(None, [], torch.Generator().manual_seed(seed))
    assert set(calls) == {"student", "teacher"}  # lmbda < 1 does go off-policy, to teacher samples
    assert gkd_method.build(lmbda=1.0).needs == ("teacher", "full_teacher")
    assert "teacher_generate" in gkd_method.build(lmbda=0.5, seq_kd=True).needs
    assert "solutions" in gkd_method.build(lmbda=0.5).needs


def test_lmbda_one_rollout_is_the_students(gkd_setup):
    env = gkd_setup.env
    exp = gkd_method.build(lmbda=1.0).rollout(env, gkd_setup.train_pool[:2], torch.Generator().manual_seed(0))
    assert exp.on_policy is True and exp.teacher_tokens == 0 and exp.sampler_logp_BT is not None
    assert exp.batch.input_ids_BL.shape[0] == 2 * env.group_size


def test_seq_kd_step_trains_on_teacher_tokens_and_counts_them(gkd_setup):
    env, method = gkd_setup.env, gkd_setup.method
    before = {k: v.clone() for k, v in env.student.state_dict().items()}
    optimizer = make_optimizer(env.student, 1e-3, 0.0)
    metrics, usage = train_step(env, method, gkd_setup.train_pool[:3], torch.Generator().manual_seed(0), optimizer,
                                micro_batch_size=2, max_grad_norm=1.0, ppo_epochs=1)
    assert metrics["rollout/on_policy"] == 0.0 and math.isfinite(metrics["loss/jsd"])
    # the teacher generated the completions (one per prompt), then scored them
    generated = round(metrics["rollout/length"] * 3)
    assert usage["sequences"] == 3 and usage["teacher_tokens"] == 2 * generated > 0
    assert _changed(before, env.student.state_dict())
